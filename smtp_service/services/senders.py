"""Sender addresses of an account, and their verification for the global server.

On the account's own SMTP server every sender of the list may send (that server decides, as
before). The global server is the operator's: with GLOBAL_SENDER_VERIFICATION=confirm (the
default) a sender added there is `pending` until its owner proves the address, as Postmark's
sender signatures are: a message with a code goes to the address through the global server, and
the code, given to POST /api/senders/<email>/confirm within CONFIRMATION_HOURS, makes it
`confirmed`. The code is an HMAC over the account, the address, a nonce and the expiry, under a
key derived from the encryption key: senders.json holds no secret, and a code is good for one
address of one account. With `manual`, every sender added is confirmed at once (the behaviour
before verification existed, for operators who vouch for every account).

Senders stored before this existed have no status: they read as `legacy` and keep working where
they worked, on both routes; an operator confirms them (or takes them back to pending) in bulk
with `flask --app wsgi smtp senders confirm|revoke`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from smtp_service.caches import FileCache
from smtp_service.services.addresses import MAX_MAILBOX_LENGTH, address_key, parse_mailbox
from smtp_service.services.errors import (
    ConfirmationNotSent,
    InvalidInput,
    SenderExists,
    SenderNotFound,
    shown,
)
from smtp_service.storage.files import AccountFiles
from smtp_service.timestamps import iso_utc

log = logging.getLogger(__name__)

SENDERS_FILE = "senders.json"
_CACHE_SIZE = 10_000  # accounts whose parsed senders a worker keeps
CONFIRMATION_HOURS = 24
VERIFICATION_MODES = ("confirm", "manual")
STATUSES = ("pending", "confirmed", "legacy")

# Sends the confirmation message: (account, address, code, expires at); ConfirmationNotSent.
Notifier = Callable[[str, str, str, str], None]


@dataclass(frozen=True)
class Sender:
    """A sender address of an account, and how far it is verified."""

    email: str
    name: str | None
    created_at: str | None
    status: str = "legacy"  # pending | confirmed | legacy (stored before statuses existed)
    nonce: str | None = None  # of the pending confirmation
    expires_at: str | None = None  # of the pending confirmation
    confirmed_at: str | None = None

    def as_stored(self) -> dict[str, Any]:
        """The entry as senders.json holds it (a legacy entry is written back as it was)."""
        stored: dict[str, Any] = {
            "email": self.email,
            "name": self.name,
            "createdAt": self.created_at,
        }
        if self.status != "legacy":
            stored["status"] = self.status
        if self.status == "pending":
            stored["confirmation"] = {"nonce": self.nonce, "expiresAt": self.expires_at}
        if self.confirmed_at:
            stored["confirmedAt"] = self.confirmed_at
        return stored

    @classmethod
    def from_stored(cls, entry: dict[str, Any]) -> Sender:
        """An entry of senders.json; anything but a known status reads as legacy."""
        status = entry.get("status")
        confirmation = entry.get("confirmation")
        confirmation = confirmation if isinstance(confirmation, dict) else {}
        return cls(
            email=entry["email"],
            name=entry.get("name"),
            created_at=entry.get("createdAt"),
            status=status if status in ("pending", "confirmed") else "legacy",
            nonce=confirmation.get("nonce"),
            expires_at=confirmation.get("expiresAt"),
            confirmed_at=entry.get("confirmedAt"),
        )


@dataclass(frozen=True)
class _Senders:
    """One version of an account's senders.json, parsed."""

    senders: tuple[Sender, ...]
    emails: frozenset[str]  # address_key() of each: lower-cased, the domain in IDNA form
    proven: frozenset[str]  # the same of those confirmed or legacy


class SenderService:
    """Per-account sender addresses, in DATA_DIR/shared-data/{id}/senders.json.

    The list is read on every send: the parsed file is kept per worker while it is unchanged
    (one stat per call), so a change by another worker is seen at once.
    """

    def __init__(
        self,
        files: AccountFiles,
        *,
        verification: str = "confirm",
        secret: bytes | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        if verification not in VERIFICATION_MODES:
            raise ValueError(f"verification must be one of {VERIFICATION_MODES}")
        self.files = files
        self.verification = verification
        self._secret = secret or secrets.token_bytes(32)
        self.notifier = notifier  # set by the app once the mailer exists
        self._cache: FileCache[_Senders] = FileCache(_CACHE_SIZE)

    def list(self, account_id: str) -> tuple[Sender, ...]:
        """The account's senders, oldest first (none when it has no file)."""
        return self._load(account_id).senders

    def emails(self, account_id: str) -> frozenset[str]:
        """The account's sender addresses as address_key() spells them (lower-cased, the domain
        in IDNA form)."""
        return self._load(account_id).emails

    def may_send(self, account_id: str, address: str, *, own_server: bool) -> bool:
        """True when the account may send as `address` through its own server (any sender of
        its list) or through the global one (a confirmed or legacy sender; any in manual mode)."""
        loaded = self._load(account_id)
        key = address_key(address)
        if own_server or self.verification == "manual":
            return key in loaded.emails
        return key in loaded.proven

    def add(self, account_id: str, email: str, name: str | None) -> Sender:
        """Add a sender: confirmed at once in manual mode; else pending, and a confirmation
        code sent to the address through the global server.

        InvalidInput for a bad address, SenderExists if it is one already (in any spelling),
        ConfirmationNotSent when the global server did not take the confirmation (the sender
        is then not kept, so that adding it again is a retry)."""
        address = parse_mailbox(email, "email").address
        now = datetime.now(UTC)
        if self.verification == "manual":
            sender = Sender(address, name, iso_utc(now), "confirmed", confirmed_at=iso_utc(now))
        else:
            expires = iso_utc(now + timedelta(hours=CONFIRMATION_HOURS))
            nonce = secrets.token_urlsafe(12)
            sender = Sender(address, name, iso_utc(now), "pending", nonce, expires)

        def _add(doc: Any) -> Any:
            current = doc.get("senders", []) if isinstance(doc, dict) else []
            if any(address_key(str(s.get("email", ""))) == address_key(address) for s in current):
                raise SenderExists(address)
            return {"senders": [*current, sender.as_stored()]}

        self.files.update(account_id, SENDERS_FILE, _add)
        self._cache.discard(account_id)
        if sender.status == "pending":
            if self.notifier is None:
                log.warning(
                    "account %s: sender %s is pending, but no confirmation can be sent (no "
                    "global server or no SMTP_FROM); an operator can confirm it",
                    account_id,
                    address,
                )
                return sender
            code = self._code(account_id, sender)
            try:
                self.notifier(account_id, address, code, sender.expires_at or "")
            except ConfirmationNotSent:
                self._forget(account_id, sender)
                raise
        return sender

    def confirm(self, account_id: str, email: str, code: str) -> Sender:
        """Confirm a pending sender with the code sent to it. A sender already confirmed (or
        legacy) is returned as it is. SenderNotFound, or InvalidInput on `code` for a wrong or
        expired code."""
        key = address_key(email)
        given = "".join(ch for ch in code.upper() if ch.isalnum())
        outcome: dict[str, Sender] = {}

        def _confirm(doc: Any) -> Any:
            current = doc.get("senders", []) if isinstance(doc, dict) else []
            for index, entry in enumerate(current):
                if not isinstance(entry, dict) or address_key(str(entry.get("email", ""))) != key:
                    continue
                sender = Sender.from_stored(entry)
                if sender.status != "pending":
                    outcome["sender"] = sender
                    return doc
                if not sender.expires_at or sender.expires_at < iso_utc():
                    raise InvalidInput.field(
                        "code",
                        "The confirmation code has expired; remove the sender and add it "
                        "again for a new one.",
                    )
                expected = self._code(account_id, sender).replace("-", "")
                if not hmac.compare_digest(given.encode(), expected.encode()):
                    raise InvalidInput.field("code", "The confirmation code is not right.")
                confirmed = replace(
                    sender, status="confirmed", nonce=None, expires_at=None, confirmed_at=iso_utc()
                )
                outcome["sender"] = confirmed
                changed = list(current)
                changed[index] = confirmed.as_stored()
                return {"senders": changed}
            raise SenderNotFound(shown(email, 100))

        if len(email) > MAX_MAILBOX_LENGTH:
            raise SenderNotFound(shown(email, 100))
        self.files.update(account_id, SENDERS_FILE, _confirm)
        self._cache.discard(account_id)
        return outcome["sender"]

    def set_status(
        self,
        status: str,
        *,
        accounts: Iterable[str] | None = None,
        emails: Iterable[str] = (),
        domains: Iterable[str] = (),
        only: Iterable[str] = ("pending", "legacy"),
    ) -> int:
        """The operator's bulk change: every sender of the accounts (all by default) whose
        address is one of `emails` or at one of `domains` (any when both are empty) and whose
        status is in `only` gets `status` (confirmed, or pending without a code: its owner
        removes and adds it again for one). Returns how many changed."""
        if status not in ("confirmed", "pending"):
            raise ValueError("status must be confirmed or pending")
        keys = {address_key(e) for e in emails}
        wanted_domains = {address_key(f"x@{d}").partition("@")[2] for d in domains}
        only = set(only)
        changed = 0
        for account_id in self.files.accounts() if accounts is None else list(accounts):

            def _change(doc: Any) -> Any:
                nonlocal changed
                current = doc.get("senders", []) if isinstance(doc, dict) else []
                out = []
                for entry in current:
                    if not isinstance(entry, dict) or not isinstance(entry.get("email"), str):
                        out.append(entry)
                        continue
                    sender = Sender.from_stored(entry)
                    key = address_key(sender.email)
                    chosen = (not keys and not wanted_domains) or (
                        key in keys or key.partition("@")[2] in wanted_domains
                    )
                    if chosen and sender.status in only and sender.status != status:
                        sender = replace(
                            sender,
                            status=status,
                            nonce=None,
                            expires_at=None,
                            confirmed_at=iso_utc() if status == "confirmed" else None,
                        )
                        changed += 1
                    out.append(sender.as_stored())
                return {"senders": out} if out != current else doc

            self.files.update(account_id, SENDERS_FILE, _change)
            self._cache.discard(account_id)
        return changed

    def remove(self, account_id: str, email: str) -> None:
        """Remove a sender, named as it was written or with its domain in IDNA (punycode) or
        Unicode form, in any case; SenderNotFound when the account has none such."""
        if len(email) > MAX_MAILBOX_LENGTH:  # never added (add refuses it); not quoted whole
            raise SenderNotFound(shown(email, 100))
        key = address_key(email)

        def _remove(doc: Any) -> Any:
            current = doc.get("senders", []) if isinstance(doc, dict) else []
            kept = [s for s in current if address_key(str(s.get("email", ""))) != key]
            if len(kept) == len(current):
                raise SenderNotFound(email)
            return {"senders": kept}

        self.files.update(account_id, SENDERS_FILE, _remove)
        self._cache.discard(account_id)

    def _forget(self, account_id: str, sender: Sender) -> None:
        """Take back a pending sender whose confirmation was not sent (only that very one)."""

        def _drop(doc: Any) -> Any:
            current = doc.get("senders", []) if isinstance(doc, dict) else []
            kept = [s for s in current if s != sender.as_stored()]
            return {"senders": kept} if len(kept) != len(current) else doc

        self.files.update(account_id, SENDERS_FILE, _drop)
        self._cache.discard(account_id)

    def _code(self, account_id: str, sender: Sender) -> str:
        """The confirmation code of a pending sender: 80 bits of an HMAC, in base32 groups."""
        material = "\n".join(
            [account_id, address_key(sender.email), sender.nonce or "", sender.expires_at or ""]
        )
        digest = hmac.new(self._secret, material.encode("utf-8"), hashlib.sha256).digest()
        text = base64.b32encode(digest[:10]).decode("ascii")
        return "-".join(text[i : i + 4] for i in range(0, 16, 4))

    def _load(self, account_id: str) -> _Senders:
        path = self.files.path(account_id, SENDERS_FILE)
        return self._cache.get(account_id, path, lambda: self._read(account_id)) or _NONE

    def _read(self, account_id: str) -> _Senders:
        try:
            doc = self.files.read(account_id, SENDERS_FILE)
        except ValueError:  # unparseable: no senders (the next add replaces it)
            doc = None
        entries = doc.get("senders") if isinstance(doc, dict) else None
        senders = tuple(
            Sender.from_stored(s)
            for s in entries or []
            if isinstance(s, dict) and isinstance(s.get("email"), str)
        )
        return _Senders(
            senders,
            frozenset(address_key(s.email) for s in senders),
            frozenset(address_key(s.email) for s in senders if s.status != "pending"),
        )


_NONE = _Senders((), frozenset(), frozenset())
