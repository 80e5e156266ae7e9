"""Manual sender verification: the addresses an account may send from."""

from __future__ import annotations

from typing import Any

from smtp_service.errors import ApiError, NotFound
from smtp_service.services.compose import parse_mailbox
from smtp_service.storage.files import AccountFiles
from smtp_service.timestamps import iso_utc

SENDERS_FILE = "senders.json"


class SenderService:
    """Per-account list of verified sender addresses, in DATA_DIR/shared-data/{id}/senders.json."""

    def __init__(self, files: AccountFiles) -> None:
        self.files = files

    def list(self, account_id: str) -> list[dict[str, Any]]:
        """The account's senders, oldest first."""
        try:
            doc = self.files.read(account_id, SENDERS_FILE)
        except ValueError:
            doc = None
        senders = doc.get("senders") if isinstance(doc, dict) else None
        return [s for s in senders or [] if isinstance(s, dict) and "email" in s]

    def emails(self, account_id: str) -> set[str]:
        """The account's sender addresses, lower-cased."""
        return {s["email"].lower() for s in self.list(account_id)}

    def add(self, account_id: str, email: str, name: str | None) -> dict[str, Any]:
        """Add a sender; 409 when it is already there."""
        address = parse_mailbox(email, "email").address
        sender = {"email": address, "name": name, "createdAt": iso_utc()}

        def _add(doc: Any) -> Any:
            current = doc.get("senders", []) if isinstance(doc, dict) else []
            if any(s.get("email", "").lower() == address.lower() for s in current):
                raise ApiError(f"Sender {address} already exists", 409)
            return {"senders": [*current, sender]}

        self.files.update(account_id, SENDERS_FILE, _add)
        return sender

    def remove(self, account_id: str, email: str) -> None:
        """Remove a sender; 404 when it is not there."""

        def _remove(doc: Any) -> Any:
            current = doc.get("senders", []) if isinstance(doc, dict) else []
            kept = [s for s in current if s.get("email", "").lower() != email.lower()]
            if len(kept) == len(current):
                raise NotFound(f"Sender {email} not found")
            return {"senders": kept}

        self.files.update(account_id, SENDERS_FILE, _remove)
