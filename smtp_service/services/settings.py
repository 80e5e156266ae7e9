"""Per-account SMTP settings: load, validate, encrypt, save, delete, test; the global fallback."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from marshmallow import ValidationError

from smtp_service.errors import ValidationFailed
from smtp_service.schemas import StoredSmtpSettings
from smtp_service.services.crypto import SecretBox, SecretError
from smtp_service.services.netguard import REFUSED_TEXT, HostGuard, HostRefused
from smtp_service.services.transport import (
    Secret,
    SmtpEndpoint,
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

    def public_view(self) -> dict[str, Any]:
        """The fields a caller may see: never the password."""
        e = self.endpoint
        return {
            "host": e.host,
            "port": e.port,
            "secure": e.secure,
            "user": e.user,
            "requireTls": e.require_tls,
            "updatedAt": self.updated_at,
            "updatedBy": self.updated_by,
        }


class SettingsService:
    """The settings half of the product, independent of HTTP."""

    def __init__(
        self,
        files: AccountFiles,
        box: SecretBox,
        guard: HostGuard,
        global_endpoint: SmtpEndpoint | None,
        timeout: float,
    ) -> None:
        self.files = files
        self.box = box
        self.guard = guard
        self.global_endpoint = global_endpoint
        self.timeout = timeout
        # Called with the account id after a save or delete (the sending pool drops its
        # connections); other workers notice the change through the settings fingerprint.
        self.on_change: Callable[[str], None] = lambda _account_id: None
        self._cache: dict[str, tuple[tuple[int, int, int, int], StoredSettings]] = {}

    # -- reading -----------------------------------------------------------------------------

    def load(self, account_id: str) -> StoredSettings | None:
        """The account's own settings, None when it has none; StoredSettingsUnusable if broken.

        Every call looks at the file (one stat), so a change made by another worker or instance
        is seen at once; the parsed, decrypted result is reused while the file is unchanged
        (every save replaces the file, so its inode, mtime and size identify one version).
        """
        path = self.files.path(account_id, SETTINGS_FILE)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._cache.pop(account_id, None)
            return None
        signature = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        cached = self._cache.get(account_id)
        if cached is not None and cached[0] == signature:
            return cached[1]
        loaded = self._load_file(account_id)
        if loaded is not None:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)), None)
            self._cache[account_id] = (signature, loaded)
        return loaded

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
            fields = ", ".join(sorted(exc.messages)) if isinstance(exc.messages, dict) else "?"
            raise StoredSettingsUnusable(f"settings file fails validation ({fields})") from None
        try:
            password = self.box.decrypt(account_id, data["password"])
        except SecretError as exc:
            raise StoredSettingsUnusable(str(exc)) from None
        endpoint = SmtpEndpoint(
            host=data["host"],
            port=data["port"],
            secure=data["secure"],
            user=data["user"],
            password=Secret(password),
            require_tls=data["requireTls"],
        )
        return StoredSettings(endpoint, data["updatedAt"], data["updatedBy"])

    def view(self, account_id: str) -> dict[str, Any]:
        """GET /api/smtp/settings: the account's settings, or the global server's with isGlobal."""
        try:
            own = self.load(account_id)
        except StoredSettingsUnusable as exc:
            log.warning(
                "account %s: stored SMTP settings unusable, using global: %s", account_id, exc
            )
            own = None
        if own is not None:
            e = own.endpoint
            return {
                "host": e.host,
                "port": e.port,
                "secure": e.secure,
                "user": e.user,
                "hasPassword": bool(e.password),
                "isGlobal": False,
                "requireTls": e.require_tls,
            }
        g = self.global_endpoint
        return {
            "host": g.host if g else None,
            "port": g.port if g else None,
            "secure": g.secure if g else False,
            "user": g.user if g else None,
            "hasPassword": bool(g and g.password),
            "isGlobal": True,
            "requireTls": g.require_tls if g else True,
        }

    # -- writing -----------------------------------------------------------------------------

    def save(self, account_id: str, user_id: str, data: dict[str, Any]) -> dict[str, Any]:
        """Check the host, encrypt the password and store; returns the public view."""
        try:
            self.guard.check(data["host"], data["port"])
        except HostRefused:
            raise ValidationFailed({"host": [REFUSED_TEXT]}) from None
        document = {
            "host": data["host"],
            "port": data["port"],
            "secure": data["secure"],
            "user": data["user"],
            "pass": self.box.encrypt(account_id, data["password"]),
            "requireTls": data["requireTls"],
            "updatedAt": iso_utc(),
            "updatedBy": user_id,
        }
        self.files.write(account_id, SETTINGS_FILE, document)
        self._cache.pop(account_id, None)
        self.on_change(account_id)
        log.info(
            "account %s: SMTP settings saved by %s (host %s:%s)",
            account_id,
            user_id,
            data["host"],
            data["port"],
        )
        return {k: v for k, v in document.items() if k != "pass"}

    def delete(self, account_id: str) -> bool:
        """Remove the account's settings; True when there were some."""
        existed = self.files.delete(account_id, SETTINGS_FILE)
        self._cache.pop(account_id, None)
        self.on_change(account_id)
        if existed:
            log.info("account %s: SMTP settings removed", account_id)
        return existed

    # -- testing -----------------------------------------------------------------------------

    def test(self, data: dict[str, Any]) -> None:
        """Connect with the given (unsaved) settings; raise TransportError with a safe text."""
        endpoint = SmtpEndpoint(
            host=data["host"],
            port=data["port"],
            secure=data["secure"],
            user=data["user"],
            password=Secret(data["password"]),
            require_tls=data["requireTls"],
        )
        check_connection(endpoint, timeout=self.timeout, guard=self.guard)

    # -- maintenance (CLI) -------------------------------------------------------------------

    def reencrypt_all(self, only_plaintext: bool) -> dict[str, int]:
        """Re-encrypt every stored password with the current key.

        only_plaintext=True touches only legacy plaintext passwords (encrypt-existing);
        otherwise every password not already under the current key is rewritten (rotate-key).
        Idempotent: values already in the wanted form are left alone.
        """
        counts = {"updated": 0, "unchanged": 0, "failed": 0}
        for account_id in self.files.accounts():

            def _change(doc: Any, account_id: str = account_id) -> Any:
                if not isinstance(doc, dict) or not isinstance(doc.get("pass"), str):
                    counts["failed"] += 1
                    return doc
                stored = doc["pass"]
                if self.box.is_current(stored) or (only_plaintext and stored.startswith("enc:")):
                    counts["unchanged"] += 1
                    return doc
                try:
                    plain = self.box.decrypt(account_id, stored)
                except SecretError as exc:
                    log.error("account %s: cannot re-encrypt: %s", account_id, exc)
                    counts["failed"] += 1
                    return doc
                counts["updated"] += 1
                return {**doc, "pass": self.box.encrypt(account_id, plain)}

            if os.path.exists(self.files.path(account_id, SETTINGS_FILE)):
                self.files.update(account_id, SETTINGS_FILE, _change)
        return counts


__all__ = ["SettingsService", "StoredSettings", "StoredSettingsUnusable", "TransportError"]
