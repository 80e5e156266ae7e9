"""Per-account SMTP settings: load, validate, encrypt, save, delete, test; the global fallback."""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from marshmallow import ValidationError

from smtp_service.caches import FileCache
from smtp_service.schemas.stored import StoredOAuthSettings, StoredSmtpSettings
from smtp_service.services.crypto import SecretBox, SecretError, is_encrypted
from smtp_service.services.errors import InvalidInput
from smtp_service.services.hostnames import InvalidHost, normalise_host
from smtp_service.services.netguard import REFUSED_TEXT, HostGuard, HostRefused
from smtp_service.services.transport import (
    DEFAULT_EHLO_NAME,
    AccessTokens,
    ConnectionCheck,
    OAuthLogin,
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
_STORED_OAUTH = StoredOAuthSettings()

SETTINGS_FILE = "smtp-settings.json"


class StoredSettingsUnusable(Exception):
    """The account's stored settings exist but cannot be parsed, validated or decrypted."""


@dataclass(frozen=True)
class OAuthInfo:
    """What may be shown of an account's OAuth2 sign-in: never a token or a secret."""

    provider: str
    grant: str  # "authorization_code" (delegated) or "client_credentials" (app-only)
    has_refresh_token: bool
    needs_reauthorization: bool
    tenant_id: str | None = None
    client_id: str | None = None


@dataclass(frozen=True)
class StoredGrant:
    """An account's delegated OAuth2 grant as the file holds it now (read past the cache):
    which sign-in it is, its refresh token (decrypted) and whether the provider refused it."""

    grant_id: str
    refresh_token: Secret | None
    needs_reauthorization: bool


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
    oauth: OAuthInfo | None = None  # set when the account signs in with OAuth2


@dataclass(frozen=True)
class ActiveSettings:
    """The server an account's mail goes through: its own (is_global False), else the global
    one (is_global True; endpoint None when there is none either)."""

    endpoint: SmtpEndpoint | None
    is_global: bool
    host_as_stored: str | None = None  # see StoredSettings
    failover: bool = False  # see StoredSettings (own settings only)
    oauth: OAuthInfo | None = None  # see StoredSettings


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
        # Where OAuth2 endpoints get access tokens (services.oauth, set by the app's container)
        self.tokens: AccessTokens | None = None
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
        if isinstance(raw, dict) and raw.get("auth") == "oauth2":
            return self._load_oauth(account_id, raw)
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

    def _load_oauth(self, account_id: str, raw: dict[str, Any]) -> StoredSettings:
        """An OAuth2 settings file: the endpoint signs in with XOAUTH2. The refresh token is
        decrypted here only to prove it belongs to this account (a file copied from another
        account is unusable); connections read it afresh when they need a new access token."""
        try:
            data = _STORED_OAUTH.load(raw)
        except ValidationError as exc:
            raise StoredSettingsUnusable(_validation_failure(exc.messages)) from None
        try:
            if data["refreshToken"]:
                self.box.decrypt(account_id, data["refreshToken"])
            client_secret = (
                Secret(self.box.decrypt(account_id, data["clientSecret"]))
                if data["clientSecret"]
                else None
            )
        except SecretError as exc:
            raise StoredSettingsUnusable(str(exc)) from None
        login = OAuthLogin(
            account_id=account_id,
            provider=data["provider"],
            grant=data["grant"],
            grant_id=data["grantId"],
            needs_reauthorization=data["needsReauthorization"],
            tenant_id=data["tenantId"],
            client_id=data["clientId"],
            client_secret=client_secret,
        )
        endpoint = SmtpEndpoint(
            host=data["host"],
            port=data["port"],
            secure=data["secure"],
            user=data["user"],
            password=None,
            require_tls=data["requireTls"],
            max_connections=data.get("maxConnections"),
            oauth=login,
        )
        info = OAuthInfo(
            provider=data["provider"],
            grant=data["grant"],
            has_refresh_token=bool(data["refreshToken"]),
            needs_reauthorization=data["needsReauthorization"],
            tenant_id=data["tenantId"],
            client_id=data["clientId"],
        )
        as_stored = raw["host"] if raw["host"] != endpoint.host else None
        return StoredSettings(
            endpoint,
            data["updatedAt"],
            data["updatedBy"],
            as_stored,
            self._failover(endpoint),  # OAuth2 settings take no "failover": SMTP_FAILOVER
            oauth=info,
        )

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
                oauth=own.oauth,
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
        self._store(account_id, endpoint, document)
        log.info(
            "account %s: SMTP settings saved by %s (host %s:%s)",
            account_id,
            user_id,
            endpoint.host,
            endpoint.port,
        )
        return stored

    def _store(self, account_id: str, endpoint: SmtpEndpoint, document: dict[str, Any]) -> None:
        """Write a settings document (with maxConnections when set: files without it stay as
        they were) and tell the pool and the token cache."""
        if endpoint.max_connections is not None:
            document["maxConnections"] = endpoint.max_connections
        if endpoint.failover is not None:  # absent: the deployment's SMTP_FAILOVER
            document["failover"] = endpoint.failover
        if endpoint.rate_limit is not None:
            document["rateLimit"] = endpoint.rate_limit
        self.files.write(account_id, SETTINGS_FILE, document)
        self._cache.discard(account_id)
        self.on_change(account_id)

    def save_oauth(
        self,
        account_id: str,
        user_id: str,
        endpoint: SmtpEndpoint,
        refresh_token: Secret | None = None,
    ) -> StoredSettings:
        """Store settings that sign in with OAuth2: `endpoint.oauth` says the provider and the
        grant (client credentials: tenant, client id and secret, the secret encrypted);
        `refresh_token` (delegated sign-in) is encrypted for the account. Every save is a new
        sign-in (a new grantId): connections and access tokens of the one before are not reused.

        Returns what was stored. InvalidInput on "host" when the host may not be used (SSRF)."""
        login = endpoint.oauth
        if login is None:
            raise ValueError("save_oauth needs an endpoint with oauth")
        try:
            self.guard.check(endpoint.host, endpoint.port)
        except HostRefused:
            raise InvalidInput.field("host", REFUSED_TEXT) from None
        login = dataclasses.replace(
            login, account_id=account_id, grant_id=secrets.token_hex(8), needs_reauthorization=False
        )
        endpoint = dataclasses.replace(endpoint, password=None, oauth=login)
        info = OAuthInfo(
            provider=login.provider,
            grant=login.grant,
            has_refresh_token=bool(refresh_token),
            needs_reauthorization=False,
            tenant_id=login.tenant_id,
            client_id=login.client_id,
        )
        stored = StoredSettings(endpoint, iso_utc(), user_id, oauth=info)
        document: dict[str, Any] = {
            "auth": "oauth2",
            "provider": login.provider,
            "grant": login.grant,
            "grantId": login.grant_id,
            "host": endpoint.host,
            "port": endpoint.port,
            "secure": endpoint.secure,
            "user": endpoint.user,
            "requireTls": endpoint.require_tls,
            "needsReauthorization": False,
            "updatedAt": stored.updated_at,
            "updatedBy": stored.updated_by,
        }
        if refresh_token:
            document["refreshToken"] = self.box.encrypt(account_id, refresh_token.reveal())
        if login.grant == "client_credentials":
            assert login.client_secret is not None
            document["tenantId"] = login.tenant_id
            document["clientId"] = login.client_id
            document["clientSecret"] = self.box.encrypt(account_id, login.client_secret.reveal())
        self._store(account_id, endpoint, document)
        log.info(
            "account %s: OAuth2 SMTP settings saved by %s (%s, host %s:%s)",
            account_id,
            user_id,
            login.provider,
            endpoint.host,
            endpoint.port,
        )
        return stored

    def read_grant(self, account_id: str) -> StoredGrant | None:
        """The account's delegated OAuth2 grant as the file holds it now (not the cache: a
        worker refreshing a token must see the refresh token another one saved a moment ago);
        None when the account has no such settings or they cannot be read."""
        try:
            raw = self.files.read(account_id, SETTINGS_FILE)
            if not isinstance(raw, dict) or raw.get("auth") != "oauth2":
                return None
            data = _STORED_OAUTH.load(raw)
            token = (
                Secret(self.box.decrypt(account_id, data["refreshToken"]))
                if data["refreshToken"]
                else None
            )
        except (ValueError, ValidationError, SecretError):
            return None
        return StoredGrant(data["grantId"], token, data["needsReauthorization"])

    def store_refresh_token(
        self, account_id: str, grant_id: str, used: Secret, new: Secret
    ) -> bool:
        """Replace the refresh token `used` by the provider's rotated `new` one, atomically,
        only while the file still holds sign-in `grant_id` with `used` (compare-and-swap: a
        new sign-in or a deletion in between wins). True when it was written."""
        encrypted = self.box.encrypt(account_id, new.reveal())
        return self._swap(account_id, grant_id, used, {"refreshToken": encrypted})

    def mark_needs_reauthorization(self, account_id: str, grant_id: str, used: Secret) -> bool:
        """Note that the provider refused the refresh token `used` (invalid_grant): the account
        must sign in again. Compare-and-swap as store_refresh_token; True when written. The
        account's pooled connections are given up (their endpoint changed)."""
        changed = self._swap(account_id, grant_id, used, {"needsReauthorization": True})
        if changed:
            self._cache.discard(account_id)
            self.on_change(account_id)
            log.warning(
                "account %s: the OAuth2 provider refused the refresh token; the account needs "
                "reauthorization",
                account_id,
            )
        return changed

    def _swap(
        self, account_id: str, grant_id: str, used: Secret, fields: dict[str, Any]
    ) -> bool:
        """Set `fields` in the settings file, under its lock, only while it holds sign-in
        `grant_id` with refresh token `used`; True when written."""
        changed = False

        def _change(doc: Any) -> Any:
            nonlocal changed
            if not self._holds(account_id, doc, grant_id, used):
                return doc
            changed = True
            return {**doc, **fields}

        self.files.update(account_id, SETTINGS_FILE, _change)
        return changed

    def _holds(self, account_id: str, doc: Any, grant_id: str, token: Secret) -> bool:
        if not isinstance(doc, dict) or doc.get("grantId") != grant_id:
            return False
        stored = doc.get("refreshToken")
        try:
            return isinstance(stored, str) and self.box.decrypt(account_id, stored) == (
                token.reveal()
            )
        except SecretError:
            return False

    def needs_reauthorization(self, account_id: str) -> bool:
        """True when the account signs in with OAuth2 and the provider refused its grant (the
        account must sign in again); for the health report."""
        try:
            own = self.load(account_id)
        except StoredSettingsUnusable:
            return False
        return bool(own and own.oauth and own.oauth.needs_reauthorization)

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
                endpoint,
                timeouts=self.timeouts,
                guard=self.guard,
                ehlo_name=self.ehlo_name,
                tokens=self.tokens,
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

    def test_saved_oauth(self, account_id: str) -> ConnectionCheck:
        """The connection test of the account's saved OAuth2 settings (a delegated sign-in has
        no secret a caller could send again): InvalidInput when it has none."""
        try:
            own = self.load(account_id)
        except StoredSettingsUnusable:
            own = None
        if own is None or own.oauth is None:
            raise InvalidInput.field(
                "auth",
                "The account has no saved OAuth2 sign-in to test: sign in with "
                "POST /api/smtp/oauth/start first",
            )
        return self.test(own.endpoint, account_id)

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
                if isinstance(doc, dict) and doc.get("auth") == "oauth2":
                    return self._reencrypt_oauth(account_id, doc, only_plaintext, report)
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


    def _reencrypt_oauth(
        self, account_id: str, doc: dict[str, Any], only_plaintext: bool, report: ReencryptReport
    ) -> Any:
        """reencrypt_all for an OAuth2 file: its refresh token and client secret (always
        stored encrypted, so encrypt-existing has nothing to do)."""
        errors = _STORED_OAUTH.validate(doc)
        if errors:
            report.failed[account_id] = _validation_failure(errors)
            return doc
        secret_fields = [k for k in ("refreshToken", "clientSecret") if doc.get(k)]
        if only_plaintext or all(self.box.is_current(doc[k]) for k in secret_fields):
            report.unchanged += 1
            return doc
        try:
            plain = {k: self.box.decrypt(account_id, doc[k]) for k in secret_fields}
        except SecretError as exc:
            report.failed[account_id] = str(exc)
            return doc
        report.updated += 1
        return {**doc, **{k: self.box.encrypt(account_id, v) for k, v in plain.items()}}


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
    "OAuthInfo",
    "StoredGrant",
    "ConnectionCheck",
    "ReencryptReport",
    "SettingsService",
    "StoredSettings",
    "StoredSettingsUnusable",
    "TransportError",
]
