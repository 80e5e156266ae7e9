"""What was sent and who bounced: an account's message records and its suppression list."""

from __future__ import annotations

from typing import Any

from smtp_service.services.addresses import MAX_MAILBOX_LENGTH, address_forms
from smtp_service.services.errors import MessageNotFound, SuppressionNotFound, shown
from smtp_service.storage.messages import MessageLog
from smtp_service.storage.suppressions import SuppressionList


class MessageRecords:
    """Read an account's message log; lift a suppression. Every call is scoped to one account."""

    def __init__(self, messages: MessageLog, suppressions: SuppressionList) -> None:
        self.messages = messages
        self.suppression_list = suppressions

    def get(self, account_id: str, message_id: str) -> dict[str, Any]:
        """The account's message with its events (the shape of MessageLog.get).

        MessageNotFound when the account has no such message, also when another account has.
        """
        record = self.messages.get(account_id, message_id)
        if record is None:
            raise MessageNotFound(message_id)
        return record

    def suppressions(self, account_id: str) -> list[dict[str, Any]]:
        """The account's suppressed addresses, newest first (the shape of
        SuppressionList.list)."""
        return self.suppression_list.list(account_id)

    def unsuppress(self, account_id: str, email: str) -> None:
        """Allow sending to the address again, named as it was written or with its domain in
        IDNA (punycode) or Unicode form; SuppressionNotFound when it is not suppressed."""
        # An address longer than any that can be sent to was never suppressed: not looked up.
        if len(email) > MAX_MAILBOX_LENGTH or not self.suppression_list.unsuppress(
            account_id, email, address_forms(email)
        ):
            raise SuppressionNotFound(shown(email, 100))
