"""Per-account SMTP settings: load, validate, encrypt, save, delete, test; the global fallback."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from marshmallow import ValidationError

from smtp_service.caches import FileCache
from smtp_service.schemas.stored import StoredSmtpSettings
from smtp_service.services.crypto import SecretBox, SecretError, is_encrypted
from smtp_service.services.errors import InvalidInput
from smtp_service.services.hostnames import InvalidHost, normalise_host
from smtp_service.services.netguard import REFUSED_TEXT, HostGuard, HostRefused
from smtp_service.services.transport import (
    DEFAULT_EHLO_NAME,
    ConnectionCheck,
    Secret,
    SmtpEndpoint,
    Timeouts,
    TransportError,
    check_connection,
)
from smtp_service.storage.files import AccountFiles
from smtp_service.timestamps import iso_utc

log = logging.getLogger(__name__)

_CACHE_SIZE = 10_000  # parsed settings kept per worker (a few hundred bytes each)
_STORED_SCHEMA = StoredSmtpSettings()  # schemas hold no per-load state; build once

SETTINGS_FILE = "smtp-settings.json"


class StoredSettingsUnusable(Exception):
    """The account's stored settings exist but cannot be parsed, validated or decrypted."""


@dataclass(frozen=True)
class StoredSettings:
    """An account's own SMTP server, as stored (password decrypted, kept in a Secret)."""

    endpoint: SmtpEndpoint
    updated_at: str | None
    updated_by: str | None
    # The host as the file spells it, when that is not endpoint.host's normalised form (a file
    # written by hand or by the old service: "SMTP.Example.com."); the view shows it as stored.
    host_as_stored: str | None = None
    # Whether a failure to connect fails over to the global server: the file's "failover",
    # else SMTP_FAILOVER.
    failover: bool = False


@dataclass(frozen=True)
class ActiveSettings:
    """The server an account's mail goes through: its own (is_global False), else the global
    one (is_global True; endpoint None when there is none either)."""

    endpoint: SmtpEndpoint | None
    is_global: bool
    host_as_stored: str | None = None  # see StoredSettings
    failover: bool = False  # see StoredSettings (own settings only)


class SettingsService:
    """The settings half of the product, independent of HTTP."""

    def __init__(
        self,
        files: AccountFiles,
        box: SecretBox,
        guard: HostGuard,
        global_endpoint: SmtpEndpoint | None,
        timeouts: Timeouts | float,
        ehlo_name: str = DEFAULT_EHLO_NAME,
        failover_default: bool = False,
    ) -> None:
        self.files = files
        self.failover_default = failover_default  # SMTP_FAILOVER: settings without "failover"
        self.box = box
        self.guard = guard
        self.global_endpoint = global_endpoint
        # the connection test's stage timeouts and deadline (a number: every stage that long)
        self.timeouts = timeouts if isinstance(timeouts, Timeouts) else Timeouts.uniform(timeouts)
        self.ehlo_name = ehlo_name
        # Called with the account id after a save or delete (the sending pool drops its
        # connections); other workers notice the change: their pool compares the endpoint.
        self.on_change: Callable[[str], None] = lambda _account_id: None
        # Called after a connection test of the account's saved server: (account, "host:port",
        # the TransportError or None); the health records count it.
        self.on_test: Callable[[str, str, TransportError | None], None] = lambda *_args: None
        self._cache: FileCache[StoredSettings] = FileCache(_CACHE_SIZE)

    # -- reading -----------------------------------------------------------------------------

    def load(self, account_id: str) -> StoredSettings | None:
        """The account's own settings, None when it has none; StoredSettingsUnusable if broken.

        Every call looks at the file (one stat), so a change made by another worker or instance
        is seen at once; the parsed, decrypted result is reused while the file is unchanged
        (every save replaces the file, so its inode, mtime and size identify one version).
        """
        path = self.files.path(account_id, SETTINGS_FILE)
        return self._cache.get(account_id, path, lambda: self._load_file(account_id))

    def _load_file(self, account_id: str) -> StoredSettings | None:
        try:
            raw = self.files.read(account_id, SETTINGS_FILE)
        except ValueError:
            raise StoredSettingsUnusable("settings file is not valid JSON") from None
        if raw is None:
            return None
        try:
            data = _STORED_SCHEMA.load(raw if isinstance(raw, dict) else {})
        except ValidationError as exc:
            raise StoredSettingsUnusable(_validation_failure(exc.messages)) from None
        try:
            password = self.box.decrypt(account_id, data["password"])
        except SecretError as exc:
            raise StoredSettingsUnusable(str(exc)) from None
        endpoint = _endpoint({**data, "password": password})
        as_stored = raw["host"] if raw["host"] != endpoint.host else None
        return StoredSettings(
            endpoint,
            data["updatedAt"],
            data["updatedBy"],
            as_stored,
            self._failover(endpoint),
        )

    def _failover(self, endpoint: SmtpEndpoint) -> bool:
        return self.failover_default if endpoint.failover is None else endpoint.failover

    def active(self, account_id: str) -> ActiveSettings:
        """The account's own settings when usable, else the global server's (is_global)."""
        try:
            own = self.load(account_id)
        except StoredSettingsUnusable as exc:
            log.warning(
                "account %s: stored SMTP settings unusable, using global: %s", account_id, exc
            )
            own = None
        if own is not None:
            return ActiveSettings(
                own.endpoint,
                is_global=False,
                host_as_stored=own.host_as_stored,
                failover=own.failover,
            )
        return ActiveSettings(self.global_endpoint, is_global=True)

    # -- writing -----------------------------------------------------------------------------

    def save(
        self, account_id: str, user_id: str, settings: SmtpEndpoint | Mapping[str, Any]
    ) -> StoredSettings:
        """Check the host, encrypt the password and store the account's settings.

        `settings` is an SmtpEndpoint (what SmtpSettingsInput loads), or a mapping with its
        fields (host, port, secure, user, password, requireTls, maxConnections and rateLimit
        optional; a mapping's rateLimit is not checked here, the schemas check it) for
        callers written before.
        Returns what was stored (updated now, by user_id). InvalidInput on "host" when the
        host is not one (a mapping's host is normalised here, as the schema does for an
        SmtpEndpoint) or is one accounts may not use (SSRF guard).
        """
        if isinstance(settings, SmtpEndpoint):
            endpoint = settings
        else:
            try:
                endpoint = _endpoint({**settings, "host": normalise_host(settings["host"])})
            except InvalidHost as exc:
                raise InvalidInput.field("host", str(exc)) from None
        try:
            self.guard.check(endpoint.host, endpoint.port)
        except HostRefused:
            raise InvalidInput.field("host", REFUSED_TEXT) from None
        password = endpoint.password.reveal() if endpoint.password else ""
        stored = StoredSettings(
            endpoint,
            updated_at=iso_utc(),
            updated_by=user_id,
            failover=self._failover(endpoint),
        )
        document = {
            "host": endpoint.host,
            "port": endpoint.port,
            "secure": endpoint.secure,
            "user": endpoint.user,
            "pass": self.box.encrypt(account_id, password),
            "requireTls": endpoint.require_tls,
            "updatedAt": stored.updated_at,
            "updatedBy": stored.updated_by,
        }
        if endpoint.max_connections is not None:  # files without it stay as they were
            document["maxConnections"] = endpoint.max_connections
        if endpoint.failover is not None:  # absent: the deployment's SMTP_FAILOVER
            document["failover"] = endpoint.failover
        if endpoint.rate_limit is not None:
            document["rateLimit"] = endpoint.rate_limit
        self.files.write(account_id, SETTINGS_FILE, document)
        self._cache.discard(account_id)
        self.on_change(account_id)
        log.info(
            "account %s: SMTP settings saved by %s (host %s:%s)",
            account_id,
            user_id,
            endpoint.host,
            endpoint.port,
        )
        return stored

    def delete(self, account_id: str) -> bool:
        """Remove the account's settings; True when there were some."""
        existed = self.files.delete(account_id, SETTINGS_FILE)
        self._cache.discard(account_id)
        self.on_change(account_id)
        if existed:
            log.info("account %s: SMTP settings removed", account_id)
        return existed

    # -- testing -----------------------------------------------------------------------------

    def test(self, endpoint: SmtpEndpoint, account_id: str | None = None) -> ConnectionCheck:
        """Connect with the given (unsaved) settings, within the SMTP deadline (seconds, each
        stage within its timeout): whether the credentials were used (a server that offers no
        AUTH gets none) and TLS was on. Raises TransportError with a safe text.

        With `account_id`, a test of exactly the account's saved server (host, port, TLS
        mode, user, password) is reported to `on_test(account_id, "host:port", error or
        None)`: the health records and the circuit breaker count it like a send."""
        try:
            found = check_connection(
                endpoint, timeouts=self.timeouts, guard=self.guard, ehlo_name=self.ehlo_name
            )
        except TransportError as exc:
            self._tested(account_id, endpoint, exc)
            raise
        self._tested(account_id, endpoint, None)
        return found

    def _tested(
        self, account_id: str | None, endpoint: SmtpEndpoint, error: TransportError | None
    ) -> None:
        if account_id is None:
            return
        try:
            own = self.load(account_id)
        except StoredSettingsUnusable:
            return
        if own is None or own.endpoint != endpoint:  # other settings: not the account's server
            return
        try:
            self.on_test(account_id, f"{endpoint.host}:{endpoint.port}", error)
        except Exception as exc:  # noqa: BLE001 - the test's answer stands
            name = type(exc).__name__
            log.error("account %s: connection test not recorded (%s)", account_id, name)

    # -- maintenance (CLI) -------------------------------------------------------------------

    def reencrypt_all(self, only_plaintext: bool) -> ReencryptReport:
        """Re-encrypt every stored password with the current key.

        only_plaintext=True touches only legacy plaintext passwords (encrypt-existing);
        otherwise every password not already under the current key is rewritten (rotate-key).
        Idempotent: values already in the wanted form are left alone. A file that cannot be
        used (not JSON, failing the stored schema, a password that does not decrypt) is left
        as it is and reported in `failed` with the reason, never counted as updated.
        """
        report = ReencryptReport()
        for account_id in self.files.accounts():

            def _change(doc: Any, account_id: str = account_id) -> Any:
                problem = _document_problem(doc)
                if problem is not None:
                    report.failed[account_id] = problem
                    return doc
                stored = doc["pass"]
                if self.box.is_current(stored) or (only_plaintext and is_encrypted(stored)):
                    report.unchanged += 1
                    return doc
                try:
                    plain = self.box.decrypt(account_id, stored)
                except SecretError as exc:
                    log.error("account %s: cannot re-encrypt: %s", account_id, exc)
                    report.failed[account_id] = str(exc)
                    return doc
                report.updated += 1
                return {**doc, "pass": self.box.encrypt(account_id, plain)}

            if os.path.exists(self.files.path(account_id, SETTINGS_FILE)):
                self.files.update(account_id, SETTINGS_FILE, _change)
        return report


@dataclass
class ReencryptReport:
    """What encrypt-existing or rotate-key did: counts, and each file left alone and why."""

    updated: int = 0
    unchanged: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # account id -> reason (no secret)


def _validation_failure(messages: Any) -> str:
    fields = ", ".join(sorted(messages)) if isinstance(messages, dict) else "?"
    return f"settings file fails validation ({fields})"


def _document_problem(doc: Any) -> str | None:
    """Why a stored document cannot be used (its password aside), or None when it can."""
    if doc is None:  # AccountFiles.update passes None for a document that is not JSON
        return "settings file is not valid JSON"
    errors = _STORED_SCHEMA.validate(doc if isinstance(doc, dict) else {})
    return _validation_failure(errors) if errors else None


def _endpoint(fields: Mapping[str, Any]) -> SmtpEndpoint:
    """An SmtpEndpoint from a mapping of the settings' fields."""
    return SmtpEndpoint(
        host=fields["host"],
        port=fields["port"],
        secure=fields["secure"],
        user=fields["user"],
        password=Secret(fields["password"]),
        require_tls=fields["requireTls"],
        max_connections=fields.get("maxConnections"),
        failover=fields.get("failover"),
        rate_limit=fields.get("rateLimit"),
    )


__all__ = [
    "ActiveSettings",
    "ConnectionCheck",
    "ReencryptReport",
    "SettingsService",
    "StoredSettings",
    "StoredSettingsUnusable",
    "TransportError",
]
