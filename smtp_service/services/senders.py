"""Manual sender verification: the addresses an account may send from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smtp_service.caches import FileCache
from smtp_service.services.addresses import MAX_MAILBOX_LENGTH, address_key, parse_mailbox
from smtp_service.services.errors import SenderExists, SenderNotFound, shown
from smtp_service.storage.files import AccountFiles
from smtp_service.timestamps import iso_utc

SENDERS_FILE = "senders.json"
_CACHE_SIZE = 10_000  # accounts whose parsed senders a worker keeps


@dataclass(frozen=True)
class Sender:
    """A verified sender address of an account."""

    email: str
    name: str | None
    created_at: str | None

    def as_stored(self) -> dict[str, Any]:
        """The entry as senders.json holds it."""
        return {"email": self.email, "name": self.name, "createdAt": self.created_at}


@dataclass(frozen=True)
class _Senders:
    """One version of an account's senders.json, parsed."""

    senders: tuple[Sender, ...]
    emails: frozenset[str]  # address_key() of each: lower-cased, the domain in IDNA form


class SenderService:
    """Per-account list of verified sender addresses, in DATA_DIR/shared-data/{id}/senders.json.

    The list is read on every send: the parsed file is kept per worker while it is unchanged
    (one stat per call), so a change by another worker is seen at once.
    """

    def __init__(self, files: AccountFiles) -> None:
        self.files = files
        self._cache: FileCache[_Senders] = FileCache(_CACHE_SIZE)

    def list(self, account_id: str) -> tuple[Sender, ...]:
        """The account's senders, oldest first (none when it has no file)."""
        return self._load(account_id).senders

    def emails(self, account_id: str) -> frozenset[str]:
        """The account's sender addresses as address_key() spells them (lower-cased, the domain
        in IDNA form)."""
        return self._load(account_id).emails

    def add(self, account_id: str, email: str, name: str | None) -> Sender:
        """Verify a sender address; InvalidInput for a bad address, SenderExists if it is one."""
        address = parse_mailbox(email, "email").address
        sender = Sender(address, name, iso_utc())

        def _add(doc: Any) -> Any:
            current = doc.get("senders", []) if isinstance(doc, dict) else []
            if any(address_key(str(s.get("email", ""))) == address_key(address) for s in current):
                raise SenderExists(address)
            return {"senders": [*current, sender.as_stored()]}

        self.files.update(account_id, SENDERS_FILE, _add)
        self._cache.discard(account_id)
        return sender

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
            Sender(s["email"], s.get("name"), s.get("createdAt"))
            for s in entries or []
            if isinstance(s, dict) and isinstance(s.get("email"), str)
        )
        return _Senders(senders, frozenset(address_key(s.email) for s in senders))


_NONE = _Senders((), frozenset())
