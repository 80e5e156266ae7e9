"""The values the sending path takes and returns: a SendRequest in, a SendResult out."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from smtp_service.services.bounces import Refusal

Outcome = Literal["sent", "failed", "bounced"]
OUTCOMES: frozenset[str] = frozenset({"sent", "failed", "bounced"})


@dataclass(frozen=True)
class Attachment:
    """One attached file: its name, MIME type ("type/subtype") and bytes."""

    filename: str
    content_type: str
    content: bytes
    cid: str | None = None  # a Content-ID: an inline part of the html, referenced as cid:<cid>


@dataclass(frozen=True, kw_only=True)
class SendRequest:
    """One message to send, as the caller gave it (addresses not yet parsed or checked).

    Lists may be given as any iterable and `headers` as a mapping: they are kept as tuples, so a
    request is immutable. Each address string may hold an RFC 5322 address list
    ("a@b.example, Name <c@d.example>, Team: e@f.example;"; see services.addresses).
    """

    sender: str
    to: tuple[str, ...]
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    reply_to: tuple[str, ...] = ()
    subject: str
    text: str | None = None
    html: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    attachments: tuple[Attachment, ...] = ()
    track_opens: bool = True

    def __post_init__(self) -> None:
        for name in ("to", "cc", "bcc", "reply_to", "attachments"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        headers: Mapping[str, str] | Iterable[tuple[str, str]] = self.headers
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        object.__setattr__(self, "headers", tuple((str(k), str(v)) for k, v in pairs))

    @property
    def recipient_count(self) -> int:
        """Entries in to, cc and bcc together, as given (duplicates counted)."""
        return len(self.to) + len(self.cc) + len(self.bcc)

    def digest(self) -> str:
        """A stable digest of what is asked, for idempotency: equal requests, equal digests.

        Two JSON bodies that differ only in spelling (key order, white space, a single address
        given as a string or as a one-item list, a default given or left out) parse to equal
        requests and so have the same digest. The attachments' bytes are hashed as they are
        (their lengths are in the header part, so no two requests run together).
        """
        head = json.dumps(
            [
                self.sender,
                self.to,
                self.cc,
                self.bcc,
                self.reply_to,
                self.subject,
                self.text,
                self.html,
                self.headers,
                # a cid only when there is one: digests of requests without one are unchanged
                [
                    (a.filename, a.content_type, len(a.content), *((a.cid,) if a.cid else ()))
                    for a in self.attachments
                ],
                self.track_opens,
            ]
        )
        digest = hashlib.sha256(head.encode("ascii"))
        for attachment in self.attachments:
            digest.update(attachment.content)
        return digest.hexdigest()


@dataclass(frozen=True)
class Bounce:
    """Why the server did not take a message: the first refusal's class and codes, and every
    recipient the message bounced for."""

    type: str  # "hard" (5xx) or "soft" (4xx)
    code: int | None
    enhanced_code: str | None
    recipients: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class SendResult:
    """What became of a SendRequest.

    - outcome "sent": the server took the message for `accepted`; `rejected` holds the
      recipients it refused while taking it for the others.
    - outcome "bounced": the server refused the message; `bounce` says how, `rejected` holds
      every refusal, `error` the text.
    - outcome "failed": no answer from the server (connection, TLS, authentication, timeout);
      `error` says what failed. `uncertain` is true when the content had been sent before the
      failure: the server may have the message, so it must not be sent again.
    """

    outcome: Outcome
    message_id: str
    transport: str  # "custom" or "global"
    accepted: tuple[str, ...] = ()
    rejected: tuple[Refusal, ...] = ()
    bounce: Bounce | None = None
    error: str | None = None
    uncertain: bool = False
    # For a message not sent: whether a later retry can succeed, and whose fault it was (a
    # services.bounces class for a refusal, the transport failure's kind otherwise).
    temporary: bool | None = None
    category: str | None = None
    # True when the account's own server failed to connect (or its circuit was open) and the
    # message went through the global server instead (`transport` is then "global").
    failover: bool = False

    @property
    def sent(self) -> bool:
        """True when the server took the message (for some recipients at least)."""
        return self.outcome == "sent"

    @property
    def settled(self) -> bool:
        """True when a retry must not send again: sent, or perhaps sent (uncertain)."""
        return self.sent or self.uncertain

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; from_dict() reads it back."""
        bounce = self.bounce
        return {
            "outcome": self.outcome,
            "message_id": self.message_id,
            "transport": self.transport,
            "accepted": list(self.accepted),
            "rejected": [r.as_dict() for r in self.rejected],
            "bounce": None
            if bounce is None
            else {
                "type": bounce.type,
                "code": bounce.code,
                "enhanced_code": bounce.enhanced_code,
                "recipients": list(bounce.recipients),
            },
            "error": self.error,
            "uncertain": self.uncertain,
            "temporary": self.temporary,
            "category": self.category,
            "failover": self.failover,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SendResult:
        """The result to_dict() wrote; KeyError or ValueError for anything else."""
        if data["outcome"] not in OUTCOMES:
            raise ValueError(f"unknown outcome {data['outcome']!r}")
        bounce = data.get("bounce")
        return cls(
            outcome=data["outcome"],
            message_id=data["message_id"],
            transport=data["transport"],
            accepted=tuple(data.get("accepted", ())),
            rejected=tuple(Refusal.from_dict(r) for r in data.get("rejected", ())),
            bounce=None
            if bounce is None
            else Bounce(
                type=bounce["type"],
                code=bounce["code"],
                enhanced_code=bounce["enhanced_code"],
                recipients=tuple(bounce["recipients"]),
            ),
            error=data.get("error"),
            uncertain=bool(data.get("uncertain", False)),
            temporary=data.get("temporary"),
            category=data.get("category"),
            failover=bool(data.get("failover", False)),
        )

