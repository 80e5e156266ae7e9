"""The transporter cache: open, authenticated SMTP connections kept per account and reused.

One pool per worker process. A key names an account's server and everything that makes its
connections differ (`{account}:{fingerprint}`), so changed settings never reuse an old
connection. Each key holds at most `size` connections; a connection is retired after
`max_messages` messages, `max_lifetime` seconds, `idle_seconds` without use, a 421 reply, or any
error. A reused connection that turns out to be dead before the message content went out is
replaced once by a fresh one; after the content went out nothing is resent (the server may have
the message), and the failure says so (`uncertain`).
"""

from __future__ import annotations

import logging
import re
import smtplib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from smtp_service.services.transport import (
    SmtpEndpoint,
    TransportError,
    close_quietly,
    describe_failure,
)

log = logging.getLogger(__name__)

Connect = Callable[[SmtpEndpoint], smtplib.SMTP]


@dataclass(frozen=True)
class Envelope:
    """What goes over the wire: MAIL FROM, RCPT TO and the message bytes."""

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    smtputf8: bool = False


@dataclass(frozen=True)
class Delivery:
    """The server took the message for `accepted`; `refused` maps address -> (code, reply)."""

    accepted: tuple[str, ...]
    refused: dict[str, tuple[int, str]]
    reply: str
    duration_ms: float


class SendFailed(Exception):
    """Nothing was delivered. Either the server refused (code/reply, or per-recipient `refused`)
    or the connection failed (`transport`). `uncertain` is true when the content had been sent
    before the failure, so the server may still deliver it."""

    def __init__(
        self,
        phase: str,
        code: int | None = None,
        reply: str | None = None,
        refused: dict[str, tuple[int, str]] | None = None,
        transport: TransportError | None = None,
        uncertain: bool = False,
    ) -> None:
        super().__init__(transport.text if transport else f"{phase}: {code} {reply}")
        self.phase = phase
        self.code = code
        self.reply = reply
        self.refused = refused or {}
        self.transport = transport
        self.uncertain = uncertain


class _Retry(Exception):
    """A reused connection was dead before any content went out: try a fresh one."""


@dataclass
class _Slot:
    """The connections of one key."""

    idle: list[_Conn] = field(default_factory=list)
    open: int = 0  # idle + in use + being opened
    retired: bool = False
    cond: threading.Condition | None = None


@dataclass
class _Conn:
    smtp: smtplib.SMTP
    created: float
    last_used: float
    # The slot that counts this connection. A key retired while the connection was in use may
    # get a new slot; the connection must not come back into (or be uncounted from) that one.
    slot: _Slot | None = None
    endpoint: SmtpEndpoint | None = None  # where it goes: a replacement is opened alike
    sent: int = 0
    reused: bool = False
    healthy: bool = True


_CRLF = re.compile(rb"\r\n|\r(?!\n)|\n")
_DOT = re.compile(rb"(?m)^\.")


def _wire_data(data: bytes) -> bytes:
    """CRLF line ends, leading dots doubled, terminated by CRLF.CRLF (RFC 5321 4.5.2)."""
    q = _DOT.sub(b"..", _CRLF.sub(b"\r\n", data))
    if not q.endswith(b"\r\n"):
        q += b"\r\n"
    return q + b".\r\n"


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply


class TransportPool:
    """Per-key pools of SMTP connections, safe to use from many threads."""

    def __init__(
        self,
        connect: Connect,
        *,
        size: int = 3,
        max_messages: int = 100,
        idle_seconds: float = 60.0,
        max_lifetime: float = 300.0,
        max_accounts: int = 1000,
        noop_after: float = 1.0,
        acquire_timeout: float = 30.0,
        pipelining: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self.size = size
        self.pipelining = pipelining
        self.max_messages = max_messages
        self.idle_seconds = idle_seconds
        self.max_lifetime = max_lifetime
        self.max_accounts = max_accounts
        self.noop_after = noop_after
        self.acquire_timeout = acquire_timeout
        self._clock = clock
        self._init_state()

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._counts = {"opened": 0, "reused": 0, "retired": 0, "retried": 0}

    def _bump(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    # -- public ------------------------------------------------------------------------------

    def send(self, key: str, endpoint: SmtpEndpoint, envelope: Envelope) -> Delivery:
        """Deliver one envelope through a pooled connection; raises SendFailed."""
        started = time.perf_counter()
        if self.size <= 0:
            conn = self._open(endpoint, "connect")
            try:
                return self._transact(conn, endpoint, envelope, started)
            finally:
                close_quietly(conn.smtp)
        try:
            return self._send_once(key, endpoint, envelope, started, fresh=False)
        except _Retry:
            self._bump("retried")
            return self._send_once(key, endpoint, envelope, started, fresh=True)

    def forget(self, account_id: str) -> None:
        """Close the account's connections (its settings changed or went away)."""
        self._retire(lambda key: key.startswith(f"{account_id}:"))

    def close_all(self) -> None:
        """QUIT every idle connection; connections in use close when they come back."""
        self._retire(lambda _key: True)

    def reset_after_fork(self) -> None:
        """In a forked child: drop the parent's connections without touching them."""
        self._init_state()

    def stats(self) -> dict[str, int]:
        """Counters and sizes, for tests and the benchmark."""
        with self._lock:
            return {
                **self._counts,
                "keys": len(self._slots),
                "open": sum(s.open for s in self._slots.values()),
                "idle": sum(len(s.idle) for s in self._slots.values()),
            }

    def _send_once(
        self, key: str, endpoint: SmtpEndpoint, envelope: Envelope, started: float, fresh: bool
    ) -> Delivery:
        conn = self._acquire(key, endpoint, fresh=fresh)
        try:
            return self._transact(conn, endpoint, envelope, started)
        except SendFailed:
            raise  # a refusal leaves the connection healthy; a failure has marked it
        except BaseException:
            conn.healthy = False  # _Retry, or interrupted mid-transaction: state unknown
            raise
        finally:
            self._release(conn)

    # -- connections -------------------------------------------------------------------------

    def _open(self, endpoint: SmtpEndpoint, phase: str, slot: _Slot | None = None) -> _Conn:
        try:
            smtp = self._connect(endpoint)
        except TransportError as exc:
            raise SendFailed(phase, transport=exc) from None
        now = self._clock()
        self._bump("opened")
        return _Conn(smtp, created=now, last_used=now, slot=slot, endpoint=endpoint)

    def _expired(self, conn: _Conn, now: float) -> bool:
        return (
            now - conn.last_used >= self.idle_seconds
            or now - conn.created >= self.max_lifetime
            or conn.sent >= self.max_messages
        )

    def _acquire(self, key: str, endpoint: SmtpEndpoint, fresh: bool = False) -> _Conn:
        stale: list[_Conn] = []  # closed (QUIT) after the lock is released
        deadline = time.monotonic() + self.acquire_timeout
        timed_out = False
        with self._lock:
            slot = self._slot(key, stale)
            while True:
                if slot.retired:  # forgotten while we waited
                    slot = self._slot(key, stale)
                assert slot.cond is not None
                now = self._clock()
                while slot.idle and not fresh:
                    conn = slot.idle.pop()  # most recently used first: warmest connection
                    if self._expired(conn, now):
                        slot.open -= 1
                        stale.append(conn)
                        continue
                    conn.reused = True
                    self._counts["reused"] += 1
                    break
                else:
                    conn = None
                if conn is not None:
                    break
                if slot.open < self.size:
                    slot.open += 1
                    break
                if fresh and slot.idle:  # retrying: give up an idle one for a new connection
                    stale.append(slot.idle.pop(0))
                    slot.open -= 1
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                slot.cond.wait(remaining)
        self._close_all_quietly(stale)
        if timed_out:
            raise SendFailed(
                "connect",
                transport=TransportError(
                    "timeout",
                    f"No SMTP connection to {endpoint.host}:{endpoint.port} became "
                    f"free within {self.acquire_timeout:g} s",
                ),
            )
        if conn is not None:
            return conn
        try:
            return self._open(endpoint, "connect", slot)
        except BaseException:
            with self._lock:
                slot.open -= 1
                slot.cond.notify()
            raise

    def _slot(self, key: str, stale: list[_Conn]) -> _Slot:
        """The key's slot, made most recent; a new key retires the account's other keys and,
        beyond max_accounts, the least recently used idle ones. Call with the lock held."""
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            return slot
        account = key.split(":", 1)[0]
        for other in [k for k in self._slots if k.split(":", 1)[0] == account]:
            self._retire_locked(other, stale)
        while len(self._slots) >= self.max_accounts:
            victim = next((k for k, s in self._slots.items() if s.open == len(s.idle)), None)
            if victim is None:
                break
            self._retire_locked(victim, stale)
        slot = _Slot(cond=threading.Condition(self._lock))
        self._slots[key] = slot
        return slot

    def _retire_locked(self, key: str, stale: list[_Conn]) -> None:
        slot = self._slots.pop(key)
        slot.retired = True
        stale.extend(slot.idle)
        slot.open -= len(slot.idle)
        slot.idle.clear()
        assert slot.cond is not None
        slot.cond.notify_all()

    def _retire(self, which: Callable[[str], bool]) -> None:
        stale: list[_Conn] = []
        with self._lock:
            for key in [k for k in self._slots if which(k)]:
                self._retire_locked(key, stale)
        self._close_all_quietly(stale)

    def _release(self, conn: _Conn) -> None:
        """Back to its slot's idle list when healthy, young enough and the slot still in use
        (not forgotten meanwhile), else QUIT and close."""
        conn.sent += 1
        conn.last_used = self._clock()
        slot = conn.slot
        assert slot is not None and slot.cond is not None
        with self._lock:
            if not slot.retired and conn.healthy and not self._expired(conn, conn.last_used):
                slot.idle.append(conn)
                slot.cond.notify()
                return
            self._counts["retired"] += 1
            if not slot.retired and conn.healthy:
                # Worn out (max messages or lifetime) while in use: the account is busy. Its
                # place stays counted for a replacement, opened (and the old one QUIT) in the
                # background, so that no request waits for a QUIT or a new TLS + AUTH.
                threading.Thread(
                    target=self._replace, args=(conn,), name="smtp-pool-replace", daemon=True
                ).start()
                return
            slot.open -= 1  # a retired slot's waiters move to the key's new slot
            slot.cond.notify()
        close_quietly(conn.smtp)

    def _replace(self, old: _Conn) -> None:
        """QUIT a worn-out connection and open its replacement into the same slot."""
        slot = old.slot
        assert slot is not None and slot.cond is not None and old.endpoint is not None
        close_quietly(old.smtp)
        try:
            new = self._open(old.endpoint, "connect", slot)
        except Exception:  # noqa: BLE001 - the next request opens one itself and reports it
            log.info("pool: opening a replacement connection failed; the next send will retry")
            new = None
        with self._lock:
            if new is not None and not slot.retired:
                slot.idle.append(new)
                slot.cond.notify()
                return
            slot.open -= 1
            slot.cond.notify()
        if new is not None:  # the key was retired meanwhile
            self._close_all_quietly([new])

    def _close_all_quietly(self, conns: list[_Conn]) -> None:
        if conns:
            self._bump("retired", len(conns))
        for conn in conns:
            close_quietly(conn.smtp)

    # -- one SMTP transaction ----------------------------------------------------------------

    def _transact(
        self, conn: _Conn, endpoint: SmtpEndpoint, envelope: Envelope, started: float
    ) -> Delivery:
        smtp = conn.smtp
        content_sent = False
        # RFC 2920: with PIPELINING, MAIL, every RCPT and DATA go out in one write and their
        # replies are read in order, one round trip instead of 2 + recipients. The content
        # still waits for DATA's 354. `owed` counts replies sent for but not read yet.
        pipelined = self.pipelining and smtp.has_extn("pipelining")
        owed = 0

        def failed(exc: BaseException, phase: str) -> BaseException:
            error = describe_failure(exc, endpoint)
            if conn.reused and not content_sent and error.kind == "closed":
                return _Retry(error.text)
            return SendFailed(phase, transport=error, uncertain=content_sent)

        phase = "mail"
        try:
            if conn.reused and self._clock() - conn.last_used >= self.noop_after:
                code, _ = smtp.noop()
                if code != 250:
                    raise smtplib.SMTPServerDisconnected(f"NOOP answered {code}")
            options: list[str] = []
            if envelope.smtputf8:
                if not smtp.has_extn("smtputf8"):
                    raise SendFailed(
                        "mail",
                        transport=TransportError(
                            "protocol",
                            "Server does not support SMTPUTF8, which this message needs "
                            "(an address is not ASCII)",
                        ),
                    )
                options += ["SMTPUTF8", "BODY=8BITMIME"]
            if smtp.does_esmtp and smtp.has_extn("size"):
                options.append(f"SIZE={len(envelope.data)}")
            if pipelined:
                smtp.command_encoding = "utf-8" if envelope.smtputf8 else "ascii"
                smtp.send(_pipeline(envelope, options))
                code, reply = smtp.getreply()
                owed = len(envelope.recipients) + 1  # each RCPT's reply and DATA's
            else:
                code, reply = smtp.mail(envelope.mail_from, options)
            if code == 421 and conn.reused:
                raise smtplib.SMTPServerDisconnected("421 at MAIL")
            if code != 250:
                self._reset(conn, code, owed)
                raise SendFailed("mail", code, _text(reply))

            phase = "rcpt"
            accepted: list[str] = []
            refused: dict[str, tuple[int, str]] = {}
            for rcpt in envelope.recipients:
                if pipelined:
                    code, reply = smtp.getreply()
                    owed -= 1
                else:
                    code, reply = smtp.rcpt(rcpt)
                if code in (250, 251):
                    accepted.append(rcpt)
                else:
                    refused[rcpt] = (code, _text(reply))
                if code == 421:  # the server is closing: the rest cannot be tried here
                    for rest in envelope.recipients[len(accepted) + len(refused) :]:
                        refused[rest] = (code, _text(reply))
                    break
            if not accepted:
                closing = any(c == 421 for c, _ in refused.values())
                self._reset(conn, 421 if closing else 0, owed)
                raise SendFailed("rcpt", refused=refused)

            phase = "data"
            if not pipelined:
                smtp.putcmd("data")
            code, reply = smtp.getreply()
            owed = 0
            if code != 354:
                self._reset(conn, code)
                raise SendFailed(
                    "data",
                    code,
                    _text(reply),
                    refused={**refused, **{a: (code, _text(reply)) for a in accepted}},
                )
            content_sent = True
            smtp.send(_wire_data(envelope.data))
            code, reply = smtp.getreply()
            if code != 250:  # the transaction is over either way; no RSET needed
                conn.healthy = code != 421
                raise SendFailed(
                    "data",
                    code,
                    _text(reply),
                    refused={**refused, **{a: (code, _text(reply)) for a in accepted}},
                )
        except (SendFailed, _Retry):
            raise
        except Exception as exc:  # noqa: BLE001 - every other failure is the connection's
            conn.healthy = False
            raise failed(exc, phase) from None
        return Delivery(
            accepted=tuple(accepted),
            refused=refused,
            reply=f"{code} {_text(reply)}",
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )

    @staticmethod
    def _reset(conn: _Conn, code: int, owed: int = 0) -> None:
        """End a refused transaction so the connection can carry the next one; a 421 or a
        failed RSET marks it for closing (the refusal still stands). The `owed` replies of a
        pipelined batch are read first; if DATA was answered 354 anyway, the server waits for
        content that will never come, so the connection is closed instead (without the final
        dot no message is taken)."""
        if code == 421:
            conn.healthy = False
            return
        try:
            for _ in range(owed):
                if conn.smtp.getreply()[0] in (354, 421):
                    conn.healthy = False
                    return
            conn.healthy = conn.smtp.rset()[0] == 250
        except Exception:  # noqa: BLE001 - a broken connection is closed on release
            conn.healthy = False


def _pipeline(envelope: Envelope, options: list[str]) -> str:
    """MAIL, one RCPT per recipient and DATA as one pipelined batch (addresses are checked:
    no CR, LF or angle brackets can reach here)."""
    extra = " " + " ".join(options) if options else ""
    lines = [f"MAIL FROM:{smtplib.quoteaddr(envelope.mail_from)}{extra}"]
    lines += [f"RCPT TO:{smtplib.quoteaddr(rcpt)}" for rcpt in envelope.recipients]
    lines.append("DATA")
    return "\r\n".join(lines) + "\r\n"

