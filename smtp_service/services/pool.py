"""The transporter cache: open, authenticated SMTP sessions kept per account and reused.

One pool per worker process. Sessions are kept per (account, endpoint): the endpoint is
everything that makes a connection differ (host, port, TLS mode, user, password), compared by
value, so changed settings never reuse an old connection, and a new endpoint for an account
retires the account's old sessions. Each account holds at most `size` connections (fewer when
its settings say `maxConnections`); a connection is retired after `max_messages` messages,
`max_lifetime` seconds, `idle_seconds` without use, a 421 reply, or any error. A reused
connection that turns out to be dead before the message content went out is replaced once by a
fresh one; after the content went out nothing is resent (the server may have the message), and
the failure says so (`uncertain`).

Servers that limit connections per client (Postfix's smtpd_client_connection_count_limit)
answer one connection too many with "421 4.7.0 too many connections". Such a refusal while the
account has other connections open means waiting for one of them (bounded by `acquire_timeout`
and the send's deadline), not failing; with none open here (another worker or instance holds the
server's connections), the new connection is tried again after a pause that grows. For
`lean_seconds` after a refusal, the pool keeps no more connections than the server took, and a
connection no request of this worker waits for is closed instead of kept idle, so that other
workers get their turn; a RefusalBoard shared through the data folder tells every worker and
instance of a refusal any of them met.

QUIT never runs on a request thread: a background reaper QUITs connections the pool gives up
(idle too long, worn out, evicted, of forgotten settings) and, every `reap_every` seconds,
looks for idle ones that expired. A request that finds no connection free within
`acquire_timeout` seconds raises SmtpPoolBusy (503 with Retry-After at the edge).

The SMTP transaction itself (pipelining, RSET, dot-stuffing) is session.py's.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from smtp_service.services.errors import SmtpPoolBusy
from smtp_service.services.session import Delivery, Envelope, SendFailed, Session, StaleConnection
from smtp_service.services.transport import BoundedSMTP, SmtpEndpoint, TransportError

__all__ = ["Connect", "Delivery", "Envelope", "RefusalNotes", "SendFailed", "TransportPool"]

log = logging.getLogger(__name__)

# transport.connect with its guard and timeouts bound: (endpoint, deadline) -> a connection
Connect = Callable[[SmtpEndpoint, float | None], BoundedSMTP]

UNLIMITED = 1_000_000  # connections at once for size 0 without maxConnections: no cap
# Pauses between tries of a new connection while the server refuses them (seconds): doubled
# after each refusal from the first to the last.
FIRST_PAUSE = 0.1
LAST_PAUSE = 1.0


class RefusalNotes(Protocol):
    """Where the workers and instances of one deployment tell each other that an SMTP server
    refused a new connection (storage.refusals.RefusalBoard). `server` is "host:port"."""

    def note(self, server: str) -> None:
        """Record a refusal now."""

    def last(self, server: str) -> float | None:
        """When the last refusal was recorded (time.time() seconds), or None."""


@dataclass
class _Slot:
    """The connections of one account, all to `endpoint`."""

    account: str
    endpoint: SmtpEndpoint
    idle: list[_Conn] = field(default_factory=list)
    open: int = 0  # idle + in use + being opened
    waiting: int = 0  # requests of this worker waiting for one of the slot's connections
    retired: bool = False
    cond: threading.Condition | None = None
    limit: int = 3  # connections open at once (size, capped by maxConnections)
    keep: int = 3  # idle connections kept (0: each one closed after its message)
    # After the server refused a new connection (421): until when to keep few connections, how
    # many it took then (None: not known here), and the next try of a new connection.
    lean_until: float = 0.0
    learned: int | None = None
    retry_at: float = 0.0
    pause: float = FIRST_PAUSE

    @property
    def server(self) -> str:
        return f"{self.endpoint.host.lower()}:{self.endpoint.port}"


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


def _refused_for_now(exc: SendFailed) -> bool:
    """True for a new connection the server refused with 421 at the greeting (RFC 5321 3.1,
    4.2.3: "service not available", e.g. too many connections from this client)."""
    return exc.transport is not None and exc.transport.code == 421


class TransportPool:
    """Per-account pools of SMTP sessions, safe to use from many threads.

    `connect(endpoint, deadline)` opens an authenticated BoundedSMTP or raises TransportError
    (transport.connect with its timeouts and host guard bound). Limits: `size` connections
    per account (0: a new connection per message, closed after it; a send may give its own),
    `max_messages` messages per connection, `idle_seconds` unused and `max_lifetime` seconds
    old, `max_accounts` accounts kept (least recently used idle ones retired beyond), NOOP
    before reusing a connection idle for `noop_after` seconds, `acquire_timeout` seconds to
    wait for a free connection, `lean_seconds` of few connections after a server refused one,
    `reap_every` seconds between the reaper's rounds. `refusals` shares refusals with other
    workers (None: this pool's own only). `pipelining` False never pipelines (RFC 2920), even
    when the server offers it. `clock` returns seconds (monotonic), for tests."""

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
        acquire_timeout: float = 10.0,
        lean_seconds: float = 60.0,
        reap_every: float = 2.0,
        refusals: RefusalNotes | None = None,
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
        self.lean_seconds = lean_seconds
        self.reap_every = reap_every
        self.refusals = refusals
        self._clock = clock
        self._init_state()

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        # One slot per account, for the endpoint it was last sent through: the pool is keyed on
        # (account, endpoint), and an account's new endpoint retires its old one, so an account
        # never has two. Keyed on the account alone, forget() is one lookup and a send compares
        # its endpoint with the slot's instead of hashing it.
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._counts = {
            "opened": 0, "reused": 0, "retired": 0, "retried": 0, "refused": 0, "busy": 0,
        }
        self._closing: list[_Conn] = []  # for the reaper to QUIT
        self._wake = threading.Condition(self._lock)
        self._reaper: threading.Thread | None = None

    # -- public ------------------------------------------------------------------------------

    def send(
        self,
        account_id: str,
        endpoint: SmtpEndpoint,
        envelope: Envelope,
        *,
        deadline: float | None = None,
        size: int | None = None,
    ) -> Delivery:
        """Deliver one envelope through a pooled session to `endpoint`, kept for `account_id`.

        `deadline` (time.monotonic() seconds; None: none) bounds all of it: the wait for a
        connection, opening one, and every reply of the transaction. `size` replaces the pool's
        for this account (the global route has its own); `endpoint.max_connections`, when set,
        caps it. Returns the session's Delivery (`duration_ms` counts from this call, waiting
        for a connection included).

        Raises SmtpPoolBusy when no connection became free within `acquire_timeout` seconds or
        the deadline (nothing was sent); SendFailed: phase "connect" when no connection could
        be opened (a 421 refusal after waiting and trying again as described above), otherwise
        as Session.transact. A reused connection found dead before the content went out is
        replaced once, invisibly (counted as "retried")."""
        started = time.perf_counter()
        size = self.size if size is None else size
        try:
            return self._send_once(account_id, endpoint, envelope, started, False, deadline, size)
        except StaleConnection:
            self._bump("retried")
            return self._send_once(account_id, endpoint, envelope, started, True, deadline, size)

    def forget(self, account_id: str) -> None:
        """Give up the account's idle connections (its settings changed or went away): the
        reaper QUITs them; those in use close when they come back. Never raises."""
        with self._lock:
            if account_id in self._slots:
                self._retire_locked(account_id)

    def close_all(self) -> None:
        """QUIT every idle connection and every one waiting for the reaper, on this thread (at
        exit; never a request's); connections in use close when they come back."""
        with self._lock:
            for account_id in list(self._slots):
                self._retire_locked(account_id)
            closing, self._closing = self._closing, []
        for conn in closing:
            conn.session.close()

    def reset_after_fork(self) -> None:
        """In a forked child: drop the parent's connections without touching them."""
        self._init_state()

    def stats(self) -> dict[str, int]:
        """Counters and sizes, for tests and the benchmark: opened, reused, retired, retried,
        refused (new connections the server refused with 421), busy (SmtpPoolBusy raised)
        since start; keys (accounts held), open and idle (connections now)."""
        with self._lock:
            return {
                **self._counts,
                "keys": len(self._slots),
                "open": sum(s.open for s in self._slots.values()),
                "idle": sum(len(s.idle) for s in self._slots.values()),
            }

    # -- one send ----------------------------------------------------------------------------

    def _bump(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _send_once(
        self,
        account_id: str,
        endpoint: SmtpEndpoint,
        envelope: Envelope,
        started: float,
        fresh: bool,
        deadline: float | None,
        size: int,
    ) -> Delivery:
        conn = self._acquire(account_id, endpoint, size, fresh, deadline)
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

    def _lean(self, slot: _Slot, now: float) -> bool:
        return now < slot.lean_until

    def _limit(self, slot: _Slot, now: float) -> int:
        """Connections the slot may have open now: its limit, or while lean what the server
        took when it refused one more (at least one, to try again)."""
        if self._lean(slot, now) and slot.learned is not None:
            return max(1, min(slot.limit, slot.learned))
        return slot.limit

    def _acquire(
        self,
        account_id: str,
        endpoint: SmtpEndpoint,
        size: int,
        fresh: bool,
        deadline: float | None,
    ) -> _Conn:
        """An idle connection of the account's slot, or a new one; waits (within
        acquire_timeout and the deadline) while the slot is full or the server refuses more."""
        give_up = time.monotonic() + self.acquire_timeout
        if deadline is not None:
            give_up = min(give_up, deadline)
        refusal: SendFailed | None = None
        while True:
            with self._lock:
                slot = self._slot(account_id, endpoint, size)
                found = self._wait_locked(slot, account_id, endpoint, size, fresh, give_up)
                if found is None:  # waited in vain
                    if refusal is not None:
                        raise refusal  # the server's own words: it refused, again and again
                    self._counts["busy"] += 1
                    raise SmtpPoolBusy(max(1, math.ceil(min(self.acquire_timeout, 30.0))))
                if isinstance(found, _Conn):
                    return found
                slot = found  # its place counted for a new connection
            try:
                opened = self._open(endpoint, slot, deadline)
            except SendFailed as exc:
                with self._lock:
                    slot.open -= 1
                    assert slot.cond is not None
                    slot.cond.notify()
                    if not _refused_for_now(exc):
                        raise
                    self._refused_locked(slot)
                if self.refusals is not None:
                    self.refusals.note(slot.server)
                refusal = exc
                continue  # wait for one of ours, or try again after the pause
            except BaseException:
                with self._lock:
                    slot.open -= 1
                    assert slot.cond is not None
                    slot.cond.notify()
                raise
            with self._lock:
                slot.pause = FIRST_PAUSE  # the server takes connections again
            return opened

    def _wait_locked(
        self,
        slot: _Slot,
        account_id: str,
        endpoint: SmtpEndpoint,
        size: int,
        fresh: bool,
        give_up: float,
    ) -> _Conn | _Slot | None:
        """With the lock held: a reusable idle connection, or the slot when a place in it was
        counted (`open`) for a new connection, or None when `give_up` passed first."""
        while True:
            if slot.retired:  # forgotten while we waited
                slot = self._slot(account_id, endpoint, size)
            assert slot.cond is not None
            now = self._clock()
            while slot.idle and not fresh:
                conn = slot.idle.pop()  # most recently used first: warmest connection
                if self._expired(conn, now):
                    self._give_up_locked(slot, conn)
                    continue
                conn.reused = True
                self._counts["reused"] += 1
                return conn
            wait = give_up - time.monotonic()
            if slot.open < self._limit(slot, now):
                pause = slot.retry_at - now
                if pause <= 0:
                    slot.open += 1
                    return slot
                wait = min(wait, pause)
            elif fresh and slot.idle:  # retrying: give up an idle one for a new connection
                self._give_up_locked(slot, slot.idle.pop(0))
                continue
            if give_up - time.monotonic() <= 0:
                return None
            slot.waiting += 1
            try:
                slot.cond.wait(max(wait, 0.001))
            finally:
                slot.waiting -= 1

    def _refused_locked(self, slot: _Slot) -> None:
        """The server refused a new connection (421) while `slot.open` others were open here:
        keep no more than those for lean_seconds, every slot to that server lean too (the
        server counts connections per client, not per account), and pause the next try."""
        now = self._clock()
        self._counts["refused"] += 1
        slot.learned = slot.open
        slot.retry_at = now + slot.pause
        slot.pause = min(slot.pause * 2, LAST_PAUSE)
        for other in self._slots.values():
            if other.server == slot.server:
                self._make_lean_locked(other, now + self.lean_seconds)
        self._make_lean_locked(slot, now + self.lean_seconds)

    def _make_lean_locked(self, slot: _Slot, until: float) -> None:
        """Lean until `until`: idle connections no request waits for go to the reaper."""
        slot.lean_until = max(slot.lean_until, until)
        while slot.idle and slot.waiting == 0:
            self._give_up_locked(slot, slot.idle.pop(0))

    def _slot(self, account_id: str, endpoint: SmtpEndpoint, size: int) -> _Slot:
        """The account's slot for this endpoint, made most recent, its limits set from `size`
        and endpoint.max_connections. A new endpoint retires the account's old slot; a new
        account beyond max_accounts retires the least recently used idle ones. Call with the
        lock held."""
        cap = endpoint.max_connections
        limit = min(size, cap) if size > 0 and cap else (size if size > 0 else cap or UNLIMITED)
        slot = self._slots.get(account_id)
        if slot is not None and slot.endpoint != endpoint:
            self._retire_locked(account_id)  # its settings changed
            slot = None
        if slot is None:
            while len(self._slots) >= self.max_accounts:
                victim = next((a for a, s in self._slots.items() if s.open == len(s.idle)), None)
                if victim is None:
                    break
                self._retire_locked(victim)
            slot = _Slot(account_id, endpoint, cond=threading.Condition(self._lock))
            self._slots[account_id] = slot
            self._start_reaper_locked()
        else:
            self._slots.move_to_end(account_id)
        slot.limit = limit
        slot.keep = min(size, limit) if size > 0 else 0
        return slot

    def _retire_locked(self, account_id: str) -> None:
        slot = self._slots.pop(account_id)
        slot.retired = True
        while slot.idle:
            self._give_up_locked(slot, slot.idle.pop())
        assert slot.cond is not None
        slot.cond.notify_all()

    def _give_up_locked(self, slot: _Slot, conn: _Conn) -> None:
        """Uncount a connection taken out of `slot` and hand it to the reaper to QUIT."""
        slot.open -= 1
        self._counts["retired"] += 1
        self._to_reaper_locked(conn)
        assert slot.cond is not None
        slot.cond.notify()
        self._drop_if_unused_locked(slot)

    def _to_reaper_locked(self, conn: _Conn) -> None:
        self._closing.append(conn)
        self._start_reaper_locked()
        self._wake.notify()

    def _drop_if_unused_locked(self, slot: _Slot) -> None:
        """A slot that keeps no idle connections (size 0) is forgotten once nothing uses it,
        unless it is lean (it remembers a refusal)."""
        if (
            slot.keep == 0
            and slot.open == 0
            and slot.waiting == 0
            and not slot.retired
            and not self._lean(slot, self._clock())
            and self._slots.get(slot.account) is slot
        ):
            del self._slots[slot.account]

    def _release(self, conn: _Conn) -> None:
        """Back to its slot's idle list when healthy, young enough, wanted (the slot keeps
        idle connections, and while lean only for a request that waits) and the slot still in
        use (not forgotten meanwhile); else closed, by the reaper with QUIT when the server is
        still talking, here without (a broken connection has nothing to say)."""
        conn.sent += 1
        conn.last_used = self._clock()
        session = conn.session
        slot = conn.slot
        assert slot is not None and slot.cond is not None
        with self._lock:
            now = conn.last_used
            wanted = not self._lean(slot, now) or slot.waiting > 0
            if not slot.retired and session.healthy:
                if not self._expired(conn, now) and wanted and len(slot.idle) < slot.keep:
                    slot.idle.append(conn)
                    slot.cond.notify()
                    return
                if self._expired(conn, now) and wanted and slot.keep:
                    # Worn out (max messages or lifetime) while in use: the account is busy.
                    # Its place stays counted for a replacement, opened in the background (the
                    # old one QUIT there too), so that no request waits for a new TLS + AUTH.
                    self._counts["retired"] += 1
                    threading.Thread(
                        target=self._replace, args=(conn,), name="smtp-pool-replace",
                        daemon=True,
                    ).start()
                    return
            if session.healthy:
                self._give_up_locked(slot, conn)  # a retired slot's waiters move to a new one
                return
            slot.open -= 1
            self._counts["retired"] += 1
            slot.cond.notify()
            self._drop_if_unused_locked(slot)
        session.abort()

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
                self._to_reaper_locked(new)

    # -- the reaper --------------------------------------------------------------------------

    def _start_reaper_locked(self) -> None:
        if self._reaper is None:
            self._reaper = threading.Thread(
                target=self._reap, args=(self._wake,), name="smtp-pool-reaper", daemon=True
            )
            self._reaper.start()

    def _reap(self, wake: threading.Condition) -> None:
        """The reaper's loop: QUIT what the pool gave up, every `reap_every` seconds give up
        idle connections that expired, and those of slots to a server that refused another
        worker's connection lately (RefusalNotes). Ends when the pool holds nothing (the next
        slot starts it again) or was reset after a fork (`wake` is then another's)."""
        while True:
            with self._lock:
                if wake is not self._wake:  # reset after a fork: this pool state is gone
                    return
                if not self._closing:
                    self._wake.wait(self.reap_every)
                closing, self._closing = self._closing, []
                now = self._clock()
                for slot in self._slots.values():
                    for conn in [c for c in slot.idle if self._expired(c, now)]:
                        slot.idle.remove(conn)
                        self._give_up_locked(slot, conn)
                closing += self._closing
                self._closing = []
                if not self._slots and not closing:
                    self._reaper = None
                    return
                servers = {s.server for s in self._slots.values() if s.idle}
            for conn in closing:
                conn.session.close()
            if self.refusals is not None and servers:
                self._lean_on_notes(servers)

    def _lean_on_notes(self, servers: set[str]) -> None:
        """Make lean the slots to servers another worker or instance saw refuse a connection
        within lean_seconds (their idle connections go to the reaper)."""
        assert self.refusals is not None
        recent: dict[str, float] = {}
        for server in servers:
            at = self.refusals.last(server)
            if at is not None and time.time() - at < self.lean_seconds:
                recent[server] = at
        if not recent:
            return
        with self._lock:
            now = self._clock()
            for slot in self._slots.values():
                at = recent.get(slot.server)
                if at is not None:
                    self._make_lean_locked(slot, now + self.lean_seconds - (time.time() - at))
