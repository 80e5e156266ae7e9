"""The transporter cache: open, authenticated SMTP sessions kept per account and reused.

One pool per worker process. Sessions are kept per (account, endpoint): the endpoint is
everything that makes a connection differ (host, port, TLS mode, user, password), compared by
value, so changed settings never reuse an old connection, and a new endpoint for an account
retires the account's old sessions. Each account holds at most `size` connections; a connection
is retired after `max_messages` messages, `max_lifetime` seconds, `idle_seconds` without use, a
421 reply, or any error. A reused connection that turns out to be dead before the message
content went out is replaced once by a fresh one; after the content went out nothing is resent
(the server may have the message), and the failure says so (`uncertain`).

The SMTP transaction itself (pipelining, RSET, dot-stuffing) is session.py's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from smtp_service.services.session import Delivery, Envelope, SendFailed, Session, StaleConnection
from smtp_service.services.transport import BoundedSMTP, SmtpEndpoint, TransportError

__all__ = ["Connect", "Delivery", "Envelope", "SendFailed", "TransportPool"]

log = logging.getLogger(__name__)

# transport.connect with its guard and timeouts bound: (endpoint, deadline) -> a connection
Connect = Callable[[SmtpEndpoint, float | None], BoundedSMTP]


@dataclass
class _Slot:
    """The connections of one account, all to `endpoint`."""

    endpoint: SmtpEndpoint
    idle: list[_Conn] = field(default_factory=list)
    open: int = 0  # idle + in use + being opened
    retired: bool = False
    cond: threading.Condition | None = None


@dataclass
class _Conn:
    """A session and the pool's record of it."""

    session: Session
    created: float
    last_used: float
    # The slot that counts this connection. An account retired while the connection was in use
    # may get a new slot; the connection must not come back into (or be uncounted from) that one.
    slot: _Slot | None = None
    sent: int = 0
    reused: bool = False


class TransportPool:
    """Per-account pools of SMTP sessions, safe to use from many threads.

    `connect(endpoint, deadline)` opens an authenticated BoundedSMTP or raises TransportError
    (transport.connect with its timeouts and host guard bound). Limits: `size` connections
    per account (0: a new connection per message, closed after it), `max_messages` messages per
    connection, `idle_seconds` unused and `max_lifetime` seconds old, `max_accounts` accounts
    kept (least recently used idle ones retired beyond), NOOP before reusing a connection idle for
    `noop_after` seconds, `acquire_timeout` seconds to wait for a free connection. `pipelining`
    False never pipelines (RFC 2920), even when the server offers it. `clock` returns seconds
    (monotonic), for tests."""

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
        # One slot per account, for the endpoint it was last sent through: the pool is keyed on
        # (account, endpoint), and an account's new endpoint retires its old one, so an account
        # never has two. Keyed on the account alone, forget() is one lookup and a send compares
        # its endpoint with the slot's instead of hashing it.
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._counts = {"opened": 0, "reused": 0, "retired": 0, "retried": 0}

    def _bump(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    # -- public ------------------------------------------------------------------------------

    def send(
        self,
        account_id: str,
        endpoint: SmtpEndpoint,
        envelope: Envelope,
        *,
        deadline: float | None = None,
    ) -> Delivery:
        """Deliver one envelope through a pooled session to `endpoint`, kept for `account_id`.

        `deadline` (time.monotonic() seconds; None: none) bounds all of it: the wait for a
        connection, opening one, and every reply of the transaction. Returns the session's
        Delivery (`duration_ms` counts from this call, waiting for a connection included).
        Raises SendFailed: phase "connect" when no connection could be opened or none became
        free within `acquire_timeout` seconds or the deadline (`transport.kind` "timeout");
        otherwise as Session.transact. A reused connection found dead before the content went
        out is replaced once, invisibly (counted as "retried")."""
        started = time.perf_counter()
        if self.size <= 0:
            conn = self._open(endpoint, deadline=deadline)
            try:
                return conn.session.transact(envelope, started=started)
            finally:
                conn.session.close()
        try:
            return self._send_once(account_id, endpoint, envelope, started, False, deadline)
        except StaleConnection:
            self._bump("retried")
            return self._send_once(account_id, endpoint, envelope, started, True, deadline)

    def forget(self, account_id: str) -> None:
        """Close the account's idle connections (its settings changed or went away); those in
        use close when they come back. Never raises."""
        stale: list[_Conn] = []
        with self._lock:
            if account_id in self._slots:
                self._retire_locked(account_id, stale)
        self._close_all_quietly(stale)

    def close_all(self) -> None:
        """QUIT every idle connection; connections in use close when they come back."""
        stale: list[_Conn] = []
        with self._lock:
            for account_id in list(self._slots):
                self._retire_locked(account_id, stale)
        self._close_all_quietly(stale)

    def reset_after_fork(self) -> None:
        """In a forked child: drop the parent's connections without touching them."""
        self._init_state()

    def stats(self) -> dict[str, int]:
        """Counters and sizes, for tests and the benchmark: opened, reused, retired, retried
        (connections, since start), keys (accounts held), open and idle (connections now)."""
        with self._lock:
            return {
                **self._counts,
                "keys": len(self._slots),
                "open": sum(s.open for s in self._slots.values()),
                "idle": sum(len(s.idle) for s in self._slots.values()),
            }

    def _send_once(
        self,
        account_id: str,
        endpoint: SmtpEndpoint,
        envelope: Envelope,
        started: float,
        fresh: bool,
        deadline: float | None,
    ) -> Delivery:
        conn = self._acquire(account_id, endpoint, fresh=fresh, deadline=deadline)
        session = conn.session
        session.smtp.deadline = deadline
        try:
            if conn.reused and self._clock() - conn.last_used >= self.noop_after:
                session.check_alive()
            return session.transact(envelope, reused=conn.reused, started=started)
        except SendFailed:
            raise  # a refusal leaves the session healthy; a failure has marked it
        except BaseException:
            session.healthy = False  # StaleConnection, or interrupted mid-transaction
            raise
        finally:
            session.smtp.deadline = None
            self._release(conn)

    # -- connections -------------------------------------------------------------------------

    def _open(
        self, endpoint: SmtpEndpoint, slot: _Slot | None = None, deadline: float | None = None
    ) -> _Conn:
        try:
            smtp = self._connect(endpoint, deadline)
        except TransportError as exc:
            raise SendFailed("connect", transport=exc) from None
        now = self._clock()
        self._bump("opened")
        session = Session(smtp, endpoint, pipelining=self.pipelining)
        return _Conn(session, created=now, last_used=now, slot=slot)

    def _expired(self, conn: _Conn, now: float) -> bool:
        return (
            now - conn.last_used >= self.idle_seconds
            or now - conn.created >= self.max_lifetime
            or conn.sent >= self.max_messages
        )

    def _acquire(
        self,
        account_id: str,
        endpoint: SmtpEndpoint,
        fresh: bool = False,
        deadline: float | None = None,
    ) -> _Conn:
        stale: list[_Conn] = []  # closed (QUIT) after the lock is released
        opening = deadline
        deadline = time.monotonic() + self.acquire_timeout
        if opening is not None:
            deadline = min(deadline, opening)
        timed_out = False
        with self._lock:
            slot = self._slot(account_id, endpoint, stale)
            while True:
                if slot.retired:  # forgotten while we waited
                    slot = self._slot(account_id, endpoint, stale)
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
            return self._open(endpoint, slot, opening)
        except BaseException:
            with self._lock:
                slot.open -= 1
                slot.cond.notify()
            raise

    def _slot(self, account_id: str, endpoint: SmtpEndpoint, stale: list[_Conn]) -> _Slot:
        """The account's slot for this endpoint, made most recent. A new endpoint retires the
        account's old slot; a new account beyond max_accounts retires the least recently used
        idle ones. Call with the lock held."""
        slot = self._slots.get(account_id)
        if slot is not None:
            if slot.endpoint == endpoint:
                self._slots.move_to_end(account_id)
                return slot
            self._retire_locked(account_id, stale)  # its settings changed
        while len(self._slots) >= self.max_accounts:
            victim = next((a for a, s in self._slots.items() if s.open == len(s.idle)), None)
            if victim is None:
                break
            self._retire_locked(victim, stale)
        slot = _Slot(endpoint, cond=threading.Condition(self._lock))
        self._slots[account_id] = slot
        return slot

    def _retire_locked(self, account_id: str, stale: list[_Conn]) -> None:
        slot = self._slots.pop(account_id)
        slot.retired = True
        stale.extend(slot.idle)
        slot.open -= len(slot.idle)
        slot.idle.clear()
        assert slot.cond is not None
        slot.cond.notify_all()

    def _release(self, conn: _Conn) -> None:
        """Back to its slot's idle list when healthy, young enough and the slot still in use
        (not forgotten meanwhile), else QUIT and close."""
        conn.sent += 1
        conn.last_used = self._clock()
        healthy = conn.session.healthy
        slot = conn.slot
        assert slot is not None and slot.cond is not None
        with self._lock:
            if not slot.retired and healthy and not self._expired(conn, conn.last_used):
                slot.idle.append(conn)
                slot.cond.notify()
                return
            self._counts["retired"] += 1
            if not slot.retired and healthy:
                # Worn out (max messages or lifetime) while in use: the account is busy. Its
                # place stays counted for a replacement, opened (and the old one QUIT) in the
                # background, so that no request waits for a QUIT or a new TLS + AUTH.
                threading.Thread(
                    target=self._replace, args=(conn,), name="smtp-pool-replace", daemon=True
                ).start()
                return
            slot.open -= 1  # a retired slot's waiters move to the account's new slot
            slot.cond.notify()
        conn.session.close()

    def _replace(self, old: _Conn) -> None:
        """QUIT a worn-out connection and open its replacement into the same slot."""
        slot = old.slot
        assert slot is not None and slot.cond is not None
        old.session.close()
        try:
            new = self._open(old.session.endpoint, slot)
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
        if new is not None:  # the account was retired meanwhile
            self._close_all_quietly([new])

    def _close_all_quietly(self, conns: list[_Conn]) -> None:
        if conns:
            self._bump("retired", len(conns))
        for conn in conns:
            conn.session.close()
