"""The sending path: checks, transport choice with fallback, pooled delivery, bounces, the log."""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer

from smtp_service.services.addresses import MAX_MAILBOX_LENGTH, Entry, address_key
from smtp_service.services.bounces import MAILBOX_FULL, Refusal, classify_smtp_error
from smtp_service.services.compose import (
    Mailbox,
    build_message,
    check_attachments,
    mailboxes,
    new_message_id,
    parse_address_list,
    parse_mailbox,
    with_open_pixel,
)
from smtp_service.services.domain import Attachment, Bounce, SendRequest, SendResult
from smtp_service.services.errors import (
    CircuitOpen,
    ConfirmationNotSent,
    IdempotencyConflict,
    IdempotencyPending,
    InvalidInput,
    MessageTooLarge,
    NoServerConfigured,
    RecipientsSuppressed,
    SenderNotVerified,
    SmtpPoolBusy,
)
from smtp_service.services.health import (
    CUSTOM,
    GLOBAL,
    AccountHealth,
    Admission,
    CircuitBreaker,
    counts_against,
    may_fail_over,
)
from smtp_service.services.pool import TransportPool
from smtp_service.services.send_rate import Rate, Reservation, SendRateLimiter
from smtp_service.services.senders import SenderService
from smtp_service.services.session import Envelope, SendFailed
from smtp_service.services.settings import SettingsService, StoredSettingsUnusable
from smtp_service.services.transport import SmtpEndpoint
from smtp_service.storage.idempotency import IdempotencyStore
from smtp_service.storage.messages import MessageLog
from smtp_service.storage.suppressions import SuppressionList

__all__ = ["Attachment", "Mailer", "OpenTracker", "Route", "SendRequest", "SendResult"]

log = logging.getLogger(__name__)

GLOBAL_KEY = "__global__"  # not a valid account id, so it cannot collide with one
# Seconds beyond the send deadline before a pending Idempotency-Key claim counts as abandoned:
# parsing, building the message and the database writes around the send.
ABANDON_MARGIN_SECONDS = 30.0


@dataclass(frozen=True)
class Route:
    """Which server a message goes through, and the pool key for it."""

    name: str  # "custom" or "global"
    endpoint: SmtpEndpoint
    pool_account: str  # the pool keeps connections per (pool_account, endpoint)
    allowed_senders: frozenset[str]
    pool_size: int | None = None  # connections kept for it; None: the pool's own size
    failover: bool = False  # "custom": a failure to connect sends through the global server
    rates: tuple[Rate, ...] = ()  # the account's send rate limits (none: not counted)

    @property
    def server(self) -> str:
        """"host:port", as health records name the server (never a credential)."""
        return f"{self.endpoint.host}:{self.endpoint.port}"


@dataclass(frozen=True)
class _Draft:
    """A message ready to go, and how to build it again with another From and Reply-To (a
    failover that must rewrite the From)."""

    message_id: str
    sender: Mailbox  # the caller's From (a rewritten one is only in `envelope`)
    reply_to: tuple[Entry, ...]  # as the caller gave it
    subject: str
    tracking: bool
    envelope: Envelope
    compose: Callable[[Mailbox, list[Entry]], Envelope]


OPEN_WINDOW_SECONDS = 600  # fetches of one message by one reader within it count as one open
MAX_OPENS = 100  # opens (and open events) recorded per message; later ones are not written
_RECENT_OPENS = 10_000  # (message, reader) pairs a worker remembers, to skip the database


class OpenTracker:
    """Signed pixel tokens that name an account and a message; off without a base URL.

    A worker remembers the (message, reader) pairs it counted lately, so that a client fetching
    a pixel over and over reaches the database once per window (the database enforces the same
    rules across workers and instances)."""

    def __init__(self, secret: bytes, base_url: str | None) -> None:
        self._signer = URLSafeSerializer(secret, salt="smtp-service-open-pixel")
        self._reader_key = hashlib.sha256(b"reader:" + secret).digest()
        self.base_url = base_url
        self._recent: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Pixels are added only when the service knows the URL readers reach it at."""
        return self.base_url is not None

    def reader(self, client: str) -> str:
        """A short keyed digest naming a reader (client address and user agent) in the message
        log without storing either."""
        digest = hmac.new(self._reader_key, client.encode("utf-8", "replace"), "sha256")
        return digest.hexdigest()[:16]

    def seen(self, account_id: str, message_id: str, reader: str, now: float) -> bool:
        """True when this worker counted this message for this reader within the window;
        otherwise note it and return False."""
        key = (account_id, message_id, reader)
        with self._lock:
            last = self._recent.get(key)
            if last is not None and now - last < OPEN_WINDOW_SECONDS:
                return True
            self._recent[key] = now
            self._recent.move_to_end(key)
            while len(self._recent) > _RECENT_OPENS:
                self._recent.popitem(last=False)
        return False

    def url(self, account_id: str, message_id: str) -> str:
        """The pixel URL for one message (the tracker must be enabled)."""
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
        suppressions: SuppressionList,
        idempotency: IdempotencyStore,
        tracker: OpenTracker,
        global_from: str | None,
        max_message_bytes: int,
        max_recipients: int,
        deadline_seconds: float = 150.0,
        global_pool_size: int | None = None,
        transaction: Callable[[], AbstractContextManager[Any]] = nullcontext,
        global_domains: frozenset[str] = frozenset(),
        breaker: CircuitBreaker | None = None,
        failover_from: str = "rewrite",
        send_rates: SendRateLimiter | None = None,
    ) -> None:
        self.settings = settings
        self.senders = senders
        self.pool = pool
        self.messages = messages
        self.suppressions = suppressions
        self.idempotency = idempotency
        self.tracker = tracker
        self.global_from = global_from
        self.max_message_bytes = max_message_bytes
        self.max_recipients = max_recipients
        # Every send ends within this (SMTP_DEADLINE): so a claim on an Idempotency-Key still
        # pending this long after it was made, plus a margin for building and recording the
        # message, belongs to a request that died, and a retry may take it over.
        self.deadline_seconds = deadline_seconds
        self.global_pool_size = global_pool_size  # SMTP_GLOBAL_POOL_SIZE
        self.abandoned_seconds = int(deadline_seconds + ABANDON_MARGIN_SECONDS) + 1
        self.transaction = transaction  # writes inside it commit together (Database.write)
        self.storage_failures = 0  # writes that failed after the server took a message
        # domains whose every address may send through the global server (the operator's)
        self.global_domains = frozenset(
            address_key(f"x@{d}").partition("@")[2] for d in global_domains
        )
        # Health records and the circuit breaker of accounts' own servers (None: neither).
        self.breaker = breaker
        # SMTP_FAILOVER_FROM: what a failover does with a From the global server may not send
        # as: "rewrite" (SMTP_FROM, "Name via Service", Reply-To the original) or "refuse".
        self.failover_from = failover_from
        try:
            self._global_mailbox = parse_mailbox(global_from, "from") if global_from else None
        except InvalidInput:
            self._global_mailbox = None
        self.send_rates = send_rates  # None: no send is counted

    # -- choosing the server ---------------------------------------------------------------

    def route(self, account_id: str, *, own_server: bool = True) -> Route:
        """Custom settings when present and usable; the global server otherwise (always, with
        own_server=False: the service's own messages, such as sender confirmations).

        Raises NoServerConfigured when the account has no usable settings and there is no
        global server.
        """
        try:
            own = self.settings.load(account_id) if own_server else None
        except StoredSettingsUnusable as exc:
            log.warning(
                "account %s: stored SMTP settings unusable, falling back to global: %s",
                account_id,
                exc,
            )
            own = None
        limiter = self.send_rates
        if own is not None:
            e = own.endpoint
            allowed = {e.user.lower()} if e.user and "@" in e.user else set()
            rates = limiter.rates_for(e.rate_limit) if limiter else ()
            return Route(
                "custom", e, account_id, frozenset(allowed), failover=own.failover, rates=rates
            )
        target = self._global_route()
        if target is None:
            raise NoServerConfigured()
        return target

    def _global_route(self) -> Route | None:
        """The global server's route (SMTP_FROM its own sender), None without one."""
        limiter = self.send_rates
        g = self.settings.global_endpoint
        if g is None:
            return None
        allowed = {self.global_from.lower()} if self.global_from else set()
        rates = limiter.default if limiter else ()
        return Route(
            "global", g, GLOBAL_KEY, frozenset(allowed), self.global_pool_size, rates=rates
        )

    # -- the request -----------------------------------------------------------------------

    def send(
        self, account_id: str, request: SendRequest, idempotency_key: str | None = None
    ) -> SendResult:
        """Send one message and record what became of it.

        Returns the SendResult: "sent" (the server took it, perhaps refusing some recipients),
        "bounced" (the server refused it) or "failed" (no answer; `uncertain` when the content
        had gone out). Raises before anything is sent: InvalidInput (too many recipients, a bad
        address), RecipientsSuppressed, NoServerConfigured, SenderNotVerified, MessageTooLarge,
        SendRateLimited (the account's send rate limit is reached: see _deliver for what
        counts), SmtpPoolBusy (no connection to the server became free in time; nothing is
        recorded), CircuitOpen (the account's server is skipped after repeated failures and the
        account does not fail over; nothing is recorded). The whole send, a failover included,
        ends within `deadline_seconds` (SMTP_DEADLINE).

        Failover (services.health for what counts): a certain transport failure of the
        account's own server, or its open circuit, sends the message through the global server
        when the account's settings (or SMTP_FAILOVER) allow it; the result then says
        transport "global" and failover True. See _failover_plan for the From.

        With an idempotency_key, a request equal to an earlier one with the same key (see
        SendRequest.digest) returns that request's result and sends nothing; a different
        request raises IdempotencyConflict, and one while the first still runs
        IdempotencyPending. Only a settled result (sent, or uncertain) is kept for the key:
        after any other outcome the key is free for a retry.
        """
        self._check_counts(request)
        if idempotency_key is None:
            return self._send(account_id, request)
        state, stored = self.idempotency.claim(
            account_id,
            idempotency_key,
            request.digest(),
            abandoned_seconds=self.abandoned_seconds,
        )
        if state == "replay":
            return SendResult.from_dict(stored or {})
        if state == "conflict":
            raise IdempotencyConflict()
        if state == "pending":
            raise IdempotencyPending()
        try:
            # A settled result (delivered, or perhaps delivered: the content went out and no
            # reply came back) completes the key in the transaction that records the message,
            # so a retry with this key answers the same and never sends a second copy.
            result = self._send(account_id, request, idempotency_key)
        except BaseException:
            self.idempotency.release(account_id, idempotency_key)
            raise
        if not result.settled:  # nothing was delivered: the same key may be retried
            self.idempotency.release(account_id, idempotency_key)
        return result

    def _check_counts(self, request: SendRequest) -> None:
        """Counted as given, before any address is parsed or a header built: 10,000 entries (or
        one address 10,000 times) would cost seconds of parsing and folding first."""
        limit = self.max_recipients
        if request.recipient_count > limit:
            raise InvalidInput.field("to", f"At most {limit} recipients (to, cc and bcc together).")
        if len(request.reply_to) > limit:
            raise InvalidInput.field("replyTo", f"At most {limit} addresses.")
        # A string may hold a whole address list: bound the text the parser is given as well.
        text_limit = limit * MAX_MAILBOX_LENGTH
        if sum(len(a) for a in (*request.to, *request.cc, *request.bcc)) > text_limit:
            raise InvalidInput.field("to", f"At most {text_limit} characters of addresses.")
        if sum(len(a) for a in request.reply_to) > text_limit:
            raise InvalidInput.field("replyTo", f"At most {text_limit} characters of addresses.")

    def _send(self, account_id: str, request: SendRequest, key: str | None = None) -> SendResult:
        sender = parse_mailbox(request.sender, "from")
        to = _entries(request.to, "to")
        cc = _entries(request.cc, "cc")
        bcc = _entries(request.bcc, "bcc")
        reply_to = _entries(request.reply_to, "replyTo")
        every = mailboxes(to + cc + bcc)
        if len(every) > self.max_recipients:
            raise InvalidInput.field(
                "to", f"At most {self.max_recipients} recipients (to, cc and bcc together)."
            )
        if len(mailboxes(reply_to)) > self.max_recipients:
            raise InvalidInput.field("replyTo", f"At most {self.max_recipients} addresses.")
        recipients = _unique([m.address for m in every])
        if not recipients:
            raise InvalidInput.field("to", "At least one recipient is required.")
        check_attachments(request.attachments)
        suppressed = self.suppressions.suppressed(account_id, recipients)
        if suppressed:
            raise RecipientsSuppressed(suppressed)
        route = self.route(account_id)
        if not self._may_send_as(account_id, route, sender):
            raise SenderNotVerified(sender.address)

        message_id = new_message_id(sender)
        html = request.html
        tracking = bool(html is not None and request.track_opens and self.tracker.enabled)
        if tracking:
            html = with_open_pixel(html, self.tracker.url(account_id, message_id))

        def compose(frm: Mailbox, replies: list[Entry]) -> Envelope:
            """The message from `frm` with `replies` as its Reply-To; MessageTooLarge."""
            smtputf8 = frm.needs_smtputf8 or any(
                m.needs_smtputf8 for m in every + mailboxes(replies)
            )
            raw = build_message(
                message_id=message_id,
                sender=frm,
                to=to,
                cc=cc,
                reply_to=replies,
                subject=request.subject,
                text=request.text,
                html=html,
                headers=request.headers,
                attachments=request.attachments,
                smtputf8=smtputf8,
            )
            if len(raw) > self.max_message_bytes:
                raise MessageTooLarge(len(raw), self.max_message_bytes)
            return Envelope(frm.address, tuple(recipients), raw, smtputf8)

        draft = _Draft(
            message_id,
            sender,
            tuple(reply_to),
            request.subject,
            tracking,
            compose(sender, reply_to),
            compose,
        )
        return self._deliver(account_id, route, draft, key)

    def _may_send_as(self, account_id: str, route: Route, sender: Mailbox) -> bool:
        """The route's own sender (the account's SMTP user, or SMTP_FROM), an address at a
        domain the operator lists (global route), or a sender of the account that the route
        accepts (services.senders: any on the account's server, proven ones on the global)."""
        if sender.address.lower() in route.allowed_senders:
            return True
        own_server = route.name == "custom"
        domain = address_key(sender.address).rpartition("@")[2]
        if not own_server and domain in self.global_domains:
            return True
        return self.senders.may_send(account_id, sender.address, own_server=own_server)

    def send_confirmation(self, account_id: str, address: str, code: str, expires_at: str) -> None:
        """Send a sender's confirmation code through the global server, from SMTP_FROM.
        ConfirmationNotSent when the server does not take it (or there is none)."""
        if self.global_from is None or self.settings.global_endpoint is None:
            raise ConfirmationNotSent(address, "no global server or SMTP_FROM is configured")
        route = self.route(account_id, own_server=False)
        sender = parse_mailbox(self.global_from, "from")
        recipient = parse_mailbox(address, "email")
        raw = build_message(
            message_id=new_message_id(sender),
            sender=sender,
            to=[recipient],
            cc=[],
            reply_to=[],
            subject="Confirm your sender address",
            text=(
                f"Someone asked to send email as {address} through our mail service.\n\n"
                f"If it was you, confirm the address with this code:\n\n    {code}\n\n"
                f"The code is good until {expires_at}. If it was not you, ignore this message: "
                "nothing is sent as you without it.\n"
            ),
            html=None,
            headers=(("Auto-Submitted", "auto-generated"),),
            attachments=(),
            smtputf8=recipient.needs_smtputf8 or sender.needs_smtputf8,
        )
        envelope = Envelope(sender.address, (recipient.address,), raw, recipient.needs_smtputf8)
        try:
            delivery = self.pool.send(
                route.pool_account,
                route.endpoint,
                envelope,
                deadline=time.monotonic() + self.deadline_seconds,
                size=route.pool_size,
            )
        except SendFailed as exc:
            if exc.transport is not None:
                reason = exc.transport.text
            elif exc.refused:
                code_, reply = next(iter(exc.refused.values()))
                reason = f"{code_} {_text(reply)}"
            else:
                reason = f"{exc.code} {exc.reply}"
            raise ConfirmationNotSent(address, reason) from None
        if delivery.refused:
            code_, reply = next(iter(delivery.refused.values()))
            raise ConfirmationNotSent(address, f"{code_} {_text(reply)}")

    def _deliver(
        self,
        account_id: str,
        route: Route,
        draft: _Draft,
        key: str | None,
        deadline: float | None = None,
        failover: bool = False,
        reservation: Reservation | None = None,
    ) -> SendResult:
        """Send the draft through `route` and record the outcome. On the account's own server
        the circuit breaker decides first (closed, probe, or open: fail over or CircuitOpen);
        a certain transport failure there fails over when the account allows it. A failover
        (`failover` True) is the same message through the global server within the same
        deadline: the whole send still ends within SMTP_DEADLINE.

        With send rate limits (route.rates), a slot is taken in each of the account's windows
        first (SendRateLimited when one is full; nothing is sent) and kept when the send
        reached a server: the server took the message, refused it (a bounce), or may have it
        (uncertain). It is given back when the send ended before that: the circuit was open
        and the account does not fail over, the pool stayed busy, or the connection, TLS or
        AUTH failed before the message content went out (and no failover took it). A failover
        carries the first slot (`reservation`) and takes none of its own; a replay of an
        Idempotency-Key never gets here, so it counts nothing.
        """
        if deadline is None:
            deadline = time.monotonic() + self.deadline_seconds
        if not failover:
            reservation = self._reserve(account_id, route)
        breaker = self.breaker
        admission: Admission | None = None
        if route.name == CUSTOM and breaker is not None:
            admission = breaker.admit(account_id)
            if not admission.use:
                plan = self._failover_plan(route, draft)
                if plan is None:
                    self._release(reservation)
                    raise CircuitOpen(admission.retry_after)
                log.info(
                    "account %s: circuit open for %s; sending through the global server",
                    account_id,
                    route.server,
                )
                return self._deliver(
                    account_id, plan[0], plan[1], key, deadline, True, reservation
                )
        envelope = draft.envelope
        started = time.perf_counter()
        record = {
            "message_id": draft.message_id,
            "account_id": account_id,
            "from_addr": draft.sender.address,
            "recipients": list(envelope.recipients),
            "subject": draft.subject,
            "transport": route.name,
            "tracking": draft.tracking,
        }
        try:
            delivery = self.pool.send(
                route.pool_account,
                route.endpoint,
                envelope,
                deadline=deadline,
                size=route.pool_size,
            )
        except SendFailed as exc:
            if breaker is not None:
                if counts_against(exc):
                    breaker.failed(account_id, route.name, exc, route.server, admission)
                elif admission is not None:
                    breaker.answered(account_id, admission)
            if route.name == CUSTOM and may_fail_over(exc):
                plan = self._failover_plan(route, draft)
                if plan is not None:
                    assert exc.transport is not None
                    log.warning(
                        "account %s: own SMTP server failed (%s); sending through the global "
                        "server",
                        account_id,
                        exc.transport.kind,
                    )
                    return self._deliver(
                        account_id, plan[0], plan[1], key, deadline, True, reservation
                    )
            if reservation is not None and exc.transport is not None and not exc.uncertain:
                self._release(reservation)  # nothing reached a server: the slot is free again
            return self._failed(
                account_id,
                route,
                exc,
                record,
                (time.perf_counter() - started) * 1000,
                key,
                failover,
            )
        except SmtpPoolBusy:  # nothing was sent (any other error keeps the slot: the safe side)
            if admission is not None and breaker is not None:
                breaker.abandoned(account_id, admission)
            self._release(reservation)
            raise
        except BaseException:
            if admission is not None and breaker is not None:
                breaker.abandoned(account_id, admission)  # no verdict: the next one probes
            raise
        if admission is not None and breaker is not None:
            breaker.answered(account_id, admission)
        message_id = draft.message_id
        rejected = [
            classify_smtp_error(email, code, _text(reply), "rcpt")
            for email, (code, reply) in delivery.refused.items()
        ]
        result = SendResult(
            outcome="sent",
            message_id=message_id,
            transport=route.name,
            accepted=tuple(delivery.accepted),
            rejected=tuple(rejected),
            failover=failover,
        )

        def write() -> None:
            self._act_on_refusals(account_id, rejected, message_id)
            self.messages.record(
                **record,
                status="sent",
                accepted=list(delivery.accepted),
                rejected=[r.as_dict() for r in rejected],
                smtp_reply=delivery.reply,
                duration_ms=delivery.duration_ms,
            )

        self._settle(account_id, result, key, write)
        return result

    def _reserve(self, account_id: str, route: Route) -> Reservation | None:
        """A slot in each of the route's send windows (None when it has no rates: nothing is
        counted, and the database is not asked). Raises SendRateLimited."""
        if not route.rates or self.send_rates is None:
            return None
        return self.send_rates.reserve(account_id, route.rates)

    def _release(self, reservation: Reservation | None) -> None:
        """Give a slot back (nothing when there was none)."""
        if reservation is not None and self.send_rates is not None:
            self.send_rates.release(reservation)

    def _settle(
        self, account_id: str, result: SendResult, key: str | None, write: Callable[[], None]
    ) -> None:
        """Record a result the server may have (sent, or uncertain) and complete its
        idempotency key, in one transaction. Nothing here may turn the answer into an error (a
        retry would deliver a second copy): a failing write is logged (no detail that could
        hold a secret) and counted in `storage_failures`, and the key is then completed alone."""
        try:
            with self.transaction():
                write()
                if key is not None:
                    self.idempotency.complete(account_id, key, result.to_dict())
            return
        except Exception as exc:  # noqa: BLE001 - the message went out: answer it as sent
            self.storage_failures += 1
            log.error(
                "account %s: message %s went to the server but could not be recorded (%s)",
                account_id,
                result.message_id,
                type(exc).__name__,
            )
        if key is None:
            return
        try:
            self.idempotency.complete(account_id, key, result.to_dict())
        except Exception as exc:  # noqa: BLE001 - as above
            self.storage_failures += 1
            log.error(
                "account %s: idempotency key of message %s could not be completed (%s)",
                account_id,
                result.message_id,
                type(exc).__name__,
            )

    def _failed(
        self,
        account_id: str,
        route: Route,
        exc: SendFailed,
        record: dict[str, Any],
        duration_ms: float,
        key: str | None = None,
        failover: bool = False,
    ) -> SendResult:
        message_id = record["message_id"]
        if exc.transport is not None:
            text = exc.transport.text
            if exc.uncertain:
                text += (
                    " after the message content was sent; the server may have accepted it, "
                    "so it is not retried"
                )
            log.warning("account %s: %s transport failed: %s", account_id, route.name, text)
            result = SendResult(
                outcome="failed",
                message_id=message_id,
                transport=route.name,
                error=f"SMTP send failed: {text}",
                uncertain=exc.uncertain,
                temporary=exc.transport.temporary and not exc.uncertain,
                category=exc.transport.kind,
                failover=failover,
            )

            def write() -> None:
                self.messages.record(
                    **record,
                    status="failed",
                    accepted=[],
                    rejected=[],
                    smtp_reply=text,
                    duration_ms=duration_ms,
                )

            if exc.uncertain:
                self._settle(account_id, result, key, write)
            else:
                write()
            return result
        if exc.refused:
            refusals = [
                classify_smtp_error(email, code, _text(reply), exc.phase)
                for email, (code, reply) in exc.refused.items()
            ]
        else:  # MAIL or DATA refused: the whole message bounced for every recipient
            refusals = [
                classify_smtp_error(email, exc.code, exc.reply, exc.phase)
                for email in record["recipients"]
            ]
        # Only a refusal of the recipient itself says the address is bad; classify() makes a
        # refused sender (MAIL) or message (DATA: policy, content) say nothing about it.
        self._act_on_refusals(account_id, refusals, message_id)
        first = refusals[0]
        self.messages.record(
            **record,
            status="bounced",
            accepted=[],
            rejected=[r.as_dict() for r in refusals],
            smtp_reply=exc.reply or first.reply,
            duration_ms=duration_ms,
        )
        return SendResult(
            outcome="bounced",
            message_id=message_id,
            transport=route.name,
            rejected=tuple(refusals),
            bounce=Bounce(
                type=first.type,
                code=first.code,
                enhanced_code=first.enhanced_code,
                recipients=tuple(r.email for r in refusals),
            ),
            error=f"SMTP server refused the message: {first.code} {first.reply}",
            temporary=all(r.temporary for r in refusals),
            category=first.category,
            failover=failover,
        )

    def _failover_plan(self, route: Route, draft: _Draft) -> tuple[Route, _Draft] | None:
        """The global route and the message to send through it when `route` (the account's
        own) may fail over; None when it may not: the account does not fail over, there is
        no global server, or the From is not the global server's own and SMTP_FAILOVER_FROM
        is "refuse" (or there is no SMTP_FROM to rewrite it to).

        The global server's own From addresses (it may send as them without failing DMARC):
        SMTP_FROM and every address at a GLOBAL_SENDER_DOMAINS domain; those go unchanged.
        Any other From is rewritten (DMARC, RFC 7489: the global server is not authorised
        for the account's domain; a confirmed sender proves a mailbox, not that): From
        becomes SMTP_FROM with the display name "<original name or address> via <SMTP_FROM's
        name, else its domain>", and Reply-To the original From, unless the caller gave a
        replyTo (then it stays: the caller said where replies go)."""
        target = self._global_route() if route.failover else None
        if target is None:
            return None
        sender = draft.sender
        own = self._global_mailbox
        domain = address_key(sender.address).rpartition("@")[2]
        if (own is not None and sender.address.lower() == own.address.lower()) or (
            domain in self.global_domains
        ):
            return target, draft
        if self.failover_from != "rewrite" or own is None:
            return None
        service = own.name or own.address.rpartition("@")[2]
        rewritten = Mailbox(f"{sender.name or sender.address} via {service}", own.address)
        replies = list(draft.reply_to) or [sender]
        # The record keeps the caller's From (the message log and its filters name it).
        return target, _Draft(
            draft.message_id,
            sender,
            draft.reply_to,
            draft.subject,
            draft.tracking,
            draft.compose(rewritten, replies),
            draft.compose,
        )

    def _act_on_refusals(self, account_id: str, refusals: list[Refusal], message_id: str) -> None:
        """Suppress addresses the server said do not exist; count mailbox-full refusals, which
        suppress only after SOFT_BOUNCE_LIMIT of them (services.bounces has the classes)."""
        for r in refusals:
            details = {
                "code": r.code,
                "enhanced_code": r.enhanced_code,
                "message_id": message_id,
                "reply": r.reply,
            }
            if r.suppresses:
                self.suppressions.suppress(account_id, r.email, reason="hard bounce", **details)
            elif r.category == MAILBOX_FULL:
                self.suppressions.soft_bounce(account_id, r.email, **details)

    # -- health ------------------------------------------------------------------------------

    def health(self, account_id: str) -> AccountHealth:
        """The account's SMTP health (services.health.AccountHealth): the transport its mail
        goes through now, whether it fails over, and per transport the circuit, consecutive
        failures, last success and failure, and send latency p50/p95 of the last hour; and
        whether the account's OAuth2 grant was refused (needs_reauthorization)."""
        active = self.settings.active(account_id)
        g = self.settings.global_endpoint
        servers: dict[str, str | None] = {GLOBAL: f"{g.host}:{g.port}" if g else None}
        if not active.is_global and active.endpoint is not None:
            servers[CUSTOM] = f"{active.endpoint.host}:{active.endpoint.port}"
        if self.breaker is None:
            raise RuntimeError("no health records without a circuit breaker")
        return AccountHealth(
            transport=GLOBAL if active.is_global else CUSTOM,
            failover=active.failover and not active.is_global,
            transports=self.breaker.report(account_id, servers),
            needs_reauthorization=active.oauth is not None and active.oauth.needs_reauthorization,
        )

    # -- tracking ---------------------------------------------------------------------------

    def record_open(self, token: str, client: str = "") -> bool:
        """Count an open for a valid token, once per reader (`client`: its address and user
        agent) and OPEN_WINDOW_SECONDS, at most MAX_OPENS per message; False when nothing was
        counted."""
        named = self.tracker.read(token)
        if not named:
            return False
        reader = self.tracker.reader(client)
        if self.tracker.seen(*named, reader, time.monotonic()):
            return False
        return self.messages.record_open(
            *named, reader=reader, window_ms=OPEN_WINDOW_SECONDS * 1000, cap=MAX_OPENS
        )


def _text(reply: Any) -> str | None:
    if isinstance(reply, bytes):
        return reply.decode("utf-8", "replace")
    return reply


def _entries(items: tuple[str, ...], field: str) -> list[Entry]:
    """Every mailbox and group of an address field's strings, in order."""
    return [entry for item in items for entry in parse_address_list(item, field)]


def _unique(addresses: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for a in addresses:
        if a.lower() not in seen:
            seen.add(a.lower())
            out.append(a)
    return out
