"""The sending path: checks, transport choice with fallback, pooled delivery, bounces, the log."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer

from smtp_service.errors import ApiError, ValidationFailed
from smtp_service.services.bounces import Refusal, classify_smtp_error
from smtp_service.services.compose import (
    Mailbox,
    build_message,
    decode_attachment,
    new_message_id,
    parse_mailbox,
    parse_mailboxes,
    with_open_pixel,
)
from smtp_service.services.pool import TransportPool
from smtp_service.services.senders import SenderService
from smtp_service.services.session import Envelope, SendFailed
from smtp_service.services.settings import SettingsService, StoredSettingsUnusable
from smtp_service.services.transport import SmtpEndpoint
from smtp_service.storage.messages import MessageLog

log = logging.getLogger(__name__)

GLOBAL_KEY = "__global__"  # not a valid account id, so it cannot collide with one


@dataclass(frozen=True)
class Route:
    """Which server a message goes through, and the pool key for it."""

    name: str  # "custom" or "global"
    endpoint: SmtpEndpoint
    pool_account: str  # the pool keeps connections per (pool_account, endpoint)
    allowed_senders: frozenset[str]


class OpenTracker:
    """Signed pixel tokens that name an account and a message."""

    def __init__(self, secret: bytes, base_url: str) -> None:
        self._signer = URLSafeSerializer(secret, salt="smtp-service-open-pixel")
        self.base_url = base_url

    def url(self, account_id: str, message_id: str) -> str:
        """The pixel URL for one message."""
        token = self._signer.dumps({"a": account_id, "m": message_id})
        return f"{self.base_url}/t/open/{token}.gif"

    def read(self, token: str) -> tuple[str, str] | None:
        """(account, message) of a valid token, else None."""
        try:
            data = self._signer.loads(token)
        except BadSignature:
            return None
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("a"), str)
            or not isinstance(data.get("m"), str)
        ):
            return None
        return data["a"], data["m"]


class Mailer:
    """Sends one request's message and records what happened."""

    def __init__(
        self,
        *,
        settings: SettingsService,
        senders: SenderService,
        pool: TransportPool,
        messages: MessageLog,
        tracker: OpenTracker,
        global_from: str | None,
        max_message_bytes: int,
        max_recipients: int,
    ) -> None:
        self.settings = settings
        self.senders = senders
        self.pool = pool
        self.messages = messages
        self.tracker = tracker
        self.global_from = global_from
        self.max_message_bytes = max_message_bytes
        self.max_recipients = max_recipients

    # -- choosing the server ---------------------------------------------------------------

    def route(self, account_id: str) -> Route:
        """Custom settings when present and usable; the global server otherwise."""
        try:
            own = self.settings.load(account_id)
        except StoredSettingsUnusable as exc:
            log.warning(
                "account %s: stored SMTP settings unusable, falling back to global: %s",
                account_id,
                exc,
            )
            own = None
        if own is not None:
            e = own.endpoint
            allowed = {e.user.lower()} if e.user and "@" in e.user else set()
            return Route("custom", e, account_id, frozenset(allowed))
        g = self.settings.global_endpoint
        if g is None:
            raise ApiError("No SMTP server is configured for this account", 503)
        allowed = {self.global_from.lower()} if self.global_from else set()
        return Route("global", g, GLOBAL_KEY, frozenset(allowed))

    # -- the request -----------------------------------------------------------------------

    def send(
        self, account_id: str, data: dict[str, Any], idempotency_key: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Send, answering (status, body); idempotent replays answer the first response."""
        self._check_counts(data)
        if idempotency_key is None:
            return self._send(account_id, data)
        body_hash = hashlib.sha256(
            json.dumps(data, sort_keys=True, default=str).encode()
        ).hexdigest()
        state, status, body = self.messages.claim(account_id, idempotency_key, body_hash)
        if state == "replay":
            return status or 200, body or {}
        if state == "conflict":
            raise ApiError("Idempotency-Key was already used with a different request", 409)
        if state == "pending":
            raise ApiError("A request with this Idempotency-Key is still being processed", 409)
        try:
            status, body = self._send(account_id, data)
        except BaseException:
            self.messages.release(account_id, idempotency_key)
            raise
        if status == 200 or body.get("uncertain"):
            # Delivered, or perhaps delivered (the content went out, no reply came back):
            # a retry with this key answers the same and never sends a second copy.
            self.messages.complete(account_id, idempotency_key, status, body)
        else:  # nothing was delivered: the same key may be retried
            self.messages.release(account_id, idempotency_key)
        return status, body

    def _check_counts(self, data: dict[str, Any]) -> None:
        """Counted as given, before any address is parsed or a header built: 10,000 entries (or
        one address 10,000 times) would cost seconds of parsing and folding first."""
        limit = self.max_recipients
        if len(data["to"]) + len(data["cc"]) + len(data["bcc"]) > limit:
            raise ValidationFailed(
                {"to": [f"At most {limit} recipients (to, cc and bcc together)."]}
            )
        if len(data["replyTo"]) > limit:
            raise ValidationFailed({"replyTo": [f"At most {limit} addresses."]})

    def _send(self, account_id: str, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        sender = parse_mailbox(data["from_"], "from")
        to = parse_mailboxes(data["to"], "to")
        cc = parse_mailboxes(data["cc"], "cc")
        bcc = parse_mailboxes(data["bcc"], "bcc")
        reply_to = parse_mailboxes(data["replyTo"], "replyTo")
        recipients = _unique([m.address for m in to + cc + bcc])  # _check_counts bounded them
        suppressed = self.messages.suppressed(account_id, recipients)
        if suppressed:
            raise ApiError(
                f"Recipient {', '.join(suppressed)} is on the suppression list "
                "(hard bounce); remove it with DELETE /api/suppressions/<email> "
                "to send again",
                422,
                suppressed=suppressed,
            )
        route = self.route(account_id)
        address = sender.address.lower()
        if address not in route.allowed_senders and address not in self.senders.emails(account_id):
            raise ApiError(f"Sender {sender.address} is not verified for this account", 403)

        message_id = new_message_id(sender)
        tracking = bool(data["html"] is not None and data["trackOpens"])
        html = data["html"]
        if tracking:
            html = with_open_pixel(html, self.tracker.url(account_id, message_id))
        attachments = [
            (a["filename"], a["contentType"], decode_attachment(a, i))
            for i, a in enumerate(data["attachments"])
        ]
        smtputf8 = sender.needs_smtputf8 or any(m.needs_smtputf8 for m in to + cc + bcc + reply_to)
        raw = build_message(
            message_id=message_id,
            sender=sender,
            to=to,
            cc=cc,
            reply_to=reply_to,
            subject=data["subject"],
            text=data["text"],
            html=html,
            headers=data["headers"],
            attachments=attachments,
            smtputf8=smtputf8,
        )
        if len(raw) > self.max_message_bytes:
            raise ApiError(
                f"Message is {len(raw)} bytes; the limit is {self.max_message_bytes}", 413
            )
        envelope = Envelope(sender.address, tuple(recipients), raw, smtputf8)
        return self._deliver(
            account_id, route, envelope, message_id, sender, data["subject"], tracking
        )

    def _deliver(
        self,
        account_id: str,
        route: Route,
        envelope: Envelope,
        message_id: str,
        sender: Mailbox,
        subject: str,
        tracking: bool,
    ) -> tuple[int, dict[str, Any]]:
        started = time.perf_counter()
        record = {
            "message_id": message_id,
            "account_id": account_id,
            "from_addr": sender.address,
            "recipients": list(envelope.recipients),
            "subject": subject,
            "transport": route.name,
            "tracking": tracking,
        }
        try:
            delivery = self.pool.send(route.pool_account, route.endpoint, envelope)
        except SendFailed as exc:
            return self._failed(
                account_id, route, exc, record, (time.perf_counter() - started) * 1000
            )
        rejected = [
            classify_smtp_error(email, code, _text(reply))
            for email, (code, reply) in delivery.refused.items()
        ]
        self._suppress_hard(account_id, rejected, message_id)
        self.messages.record(
            **record,
            status="sent",
            accepted=list(delivery.accepted),
            rejected=[r.as_dict() for r in rejected],
            smtp_reply=delivery.reply,
            duration_ms=delivery.duration_ms,
        )
        return 200, {
            "success": True,
            "messageId": message_id,
            "transport": route.name,
            "accepted": list(delivery.accepted),
            "rejected": [r.email for r in rejected],
        }

    def _failed(
        self,
        account_id: str,
        route: Route,
        exc: SendFailed,
        record: dict[str, Any],
        duration_ms: float,
    ) -> tuple[int, dict[str, Any]]:
        message_id = record["message_id"]
        if exc.transport is not None:
            text = exc.transport.text
            if exc.uncertain:
                text += (
                    " after the message content was sent; the server may have accepted it, "
                    "so it is not retried"
                )
            log.warning("account %s: %s transport failed: %s", account_id, route.name, text)
            self.messages.record(
                **record,
                status="failed",
                accepted=[],
                rejected=[],
                smtp_reply=text,
                duration_ms=duration_ms,
            )
            body = {
                "success": False,
                "messageId": message_id,
                "transport": route.name,
                "error": f"SMTP send failed: {text}",
                "bounce": None,
            }
            if exc.uncertain:
                body["uncertain"] = True
            return 502, body
        if exc.refused:
            refusals = [
                classify_smtp_error(email, code, _text(reply))
                for email, (code, reply) in exc.refused.items()
            ]
        else:  # MAIL or DATA refused: the whole message bounced for every recipient
            refusals = [
                classify_smtp_error(email, exc.code, exc.reply) for email in record["recipients"]
            ]
        if exc.phase == "rcpt":
            # Only a refusal of the recipient itself says the address is bad; a refused sender
            # (MAIL) or a refused message (DATA: policy, content) says nothing about it.
            self._suppress_hard(account_id, refusals, message_id)
        first = refusals[0]
        self.messages.record(
            **record,
            status="bounced",
            accepted=[],
            rejected=[r.as_dict() for r in refusals],
            smtp_reply=exc.reply or first.reply,
            duration_ms=duration_ms,
        )
        return 502, {
            "success": False,
            "messageId": message_id,
            "transport": route.name,
            "error": f"SMTP server refused the message: {first.code} {first.reply}",
            "bounce": {
                "type": first.type,
                "code": first.code,
                "enhancedCode": first.enhanced_code,
                "recipients": [r.email for r in refusals],
            },
        }

    def _suppress_hard(self, account_id: str, refusals: list[Refusal], message_id: str) -> None:
        for r in refusals:
            if r.type == "hard":
                self.messages.suppress(
                    account_id,
                    r.email,
                    reason="hard bounce",
                    code=r.code,
                    enhanced_code=r.enhanced_code,
                    message_id=message_id,
                )

    # -- tracking ---------------------------------------------------------------------------

    def record_open(self, token: str) -> bool:
        """Count an open for a valid token; False for anything else."""
        named = self.tracker.read(token)
        return bool(named) and self.messages.record_open(*named)


def _text(reply: Any) -> str | None:
    if isinstance(reply, bytes):
        return reply.decode("utf-8", "replace")
    return reply


def _unique(addresses: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for a in addresses:
        if a.lower() not in seen:
            seen.add(a.lower())
            out.append(a)
    return out
