"""Domain errors: what went wrong, in the service's words, with the data a caller needs.

They carry a message safe to show and plain data, never an HTTP status: the edge
(smtp_service/errors.py) decides how each one is answered.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def shown(text: str, limit: int) -> str:
    """A client's value as an error message may quote it: at most `limit` characters."""
    return text if len(text) <= limit else text[:limit] + "..."


class DomainError(Exception):
    """A failure raised on purpose; `message` is safe to show to the caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(DomainError):
    """Input the services checked and refused; `fields` maps each field to its messages
    (nested like marshmallow's: {"attachments": {"0": {"content": [...]}}})."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        super().__init__("Validation failed")
        self.fields = dict(fields)

    @classmethod
    def field(cls, name: str, message: str) -> InvalidInput:
        """One message about one field."""
        return cls({name: [message]})


class NotFound(DomainError):
    """The thing asked for does not exist for this account."""


class SenderNotFound(NotFound):
    """The account has no such verified sender."""

    def __init__(self, email: str) -> None:
        super().__init__(f"Sender {email} not found")
        self.email = email


class SuppressionNotFound(NotFound):
    """The address is not on the account's suppression list."""

    def __init__(self, email: str) -> None:
        super().__init__(f"{email} is not suppressed")
        self.email = email


class MessageNotFound(NotFound):
    """The account has no such message (another account's id reads the same)."""

    def __init__(self, message_id: str) -> None:
        super().__init__("Message not found")
        self.message_id = message_id


class SenderExists(DomainError):
    """The sender is already verified for this account."""

    def __init__(self, email: str) -> None:
        super().__init__(f"Sender {email} already exists")
        self.email = email


class SenderNotVerified(DomainError):
    """The From address is not one the account may send from."""

    def __init__(self, email: str) -> None:
        super().__init__(f"Sender {email} is not verified for this account")
        self.email = email


class ConfirmationNotSent(DomainError):
    """The global server did not take a sender's confirmation message."""

    def __init__(self, email: str, reason: str) -> None:
        super().__init__(f"The confirmation message to {email} could not be sent: {reason}")
        self.email = email


class RecipientsSuppressed(DomainError):
    """Some recipients hard-bounced before; nothing is sent until they are removed."""

    def __init__(self, addresses: Iterable[str]) -> None:
        self.addresses = tuple(addresses)
        super().__init__(
            f"Recipient {', '.join(self.addresses)} is on the suppression list "
            "(hard bounce); remove it with DELETE /api/suppressions/<email> to send again"
        )


class MessageTooLarge(DomainError):
    """The built message is over the configured limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"Message is {size} bytes; the limit is {limit}")
        self.size = size
        self.limit = limit


class IdempotencyConflict(DomainError):
    """The Idempotency-Key was used before with a different request."""

    def __init__(self) -> None:
        super().__init__("Idempotency-Key was already used with a different request")


class IdempotencyPending(DomainError):
    """The first request with this Idempotency-Key is still running."""

    def __init__(self) -> None:
        super().__init__("A request with this Idempotency-Key is still being processed")


class NoServerConfigured(DomainError):
    """The account has no usable SMTP server and there is no global one."""

    def __init__(self) -> None:
        super().__init__("No SMTP server is configured for this account")


class SmtpPoolBusy(DomainError):
    """Every connection to the account's SMTP server stayed busy (or the server refused more)
    while the request waited: nothing was sent, and the same request may be retried after
    `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            "All connections to the SMTP server are busy; nothing was sent. "
            f"Retry after {retry_after} s"
        )
        self.retry_after = retry_after


class CircuitOpen(DomainError):
    """The account's own SMTP server failed to connect SMTP_CIRCUIT_FAILURES times in a row,
    so it is skipped until `retry_after` seconds have passed (then one request tries it again),
    and the account does not fail over to the global server: nothing was sent."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            "The account's SMTP server failed repeatedly and is not tried for now; nothing "
            f"was sent. Retry after {retry_after} s"
        )
        self.retry_after = retry_after


class SendRateLimited(DomainError):
    """The account reached one of its send rate limits (SEND_RATE_LIMIT or its own rateLimit):
    nothing was sent, and the window frees up in `retry_after` seconds."""

    def __init__(self, retry_after: int, rate: str) -> None:
        super().__init__(
            f"Send rate limit reached for this account ({rate}); nothing was sent. "
            f"Retry after {retry_after} s"
        )
        self.retry_after = retry_after
        self.rate = rate


class OAuthNotConfigured(DomainError):
    """OAuth2 sign-in with this provider cannot start: the operator configured no application
    for it (OAUTH_<PROVIDER>_CLIENT_ID) or no PUBLIC_BASE_URL for the callback."""

    def __init__(self, what: str) -> None:
        super().__init__(f"OAuth2 sign-in is not configured: {what}")


class OAuthStateInvalid(DomainError):
    """The callback's `state` is not one this service issued, has expired or was used."""

    def __init__(self) -> None:
        super().__init__(
            "The OAuth2 sign-in link is invalid, expired or was already used; "
            "start the sign-in again"
        )


class OAuthSignInFailed(DomainError):
    """The provider did not authorize the sign-in or refused its code; `reason` is the OAuth2
    error code (RFC 6749 sections 4.1.2.1 and 5.2), never a token."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"OAuth2 sign-in failed: {reason}")
        self.reason = reason


class OAuthProviderUnavailable(OAuthSignInFailed):
    """The provider's token endpoint could not be reached or answered with a server error."""
