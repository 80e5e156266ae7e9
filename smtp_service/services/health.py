"""SMTP health and the circuit breaker of each account's own server, shared through the
message database (storage/health.py) by every worker and instance.

Which failures count: a connection-level failure (SendFailed with a TransportError) while
connecting (refused, timeout, DNS, TLS, AUTH, a 421 or other refusal of the session: phase
"connect"), or the connection timing out or closing during a transaction. A refusal of a
recipient, the sender or the content is the server answering: it never counts, and never fails
over. A message that needs SMTPUTF8 on a server without it is about the message, not the server.
A failure after the content went out (`uncertain`) counts against the server but never fails
over: the server may have the message.

The cost on the success path is a dictionary look-up: a worker remembers for CLOSED_CACHE_SECONDS
(1 s) that an account's circuit was closed, and reads the database again after that (one
indexed SELECT per account, worker and second). Its own failures drop what it remembers at once;
another worker's opening of the circuit is seen within that second.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from smtp_service.services.session import SendFailed
from smtp_service.services.transport import TransportError
from smtp_service.storage.health import CLOSED, HALF_OPEN, OPEN, HealthStore
from smtp_service.storage.messages import iso_ms
from smtp_service.storage.stats import latency_percentiles

log = logging.getLogger(__name__)

CUSTOM, GLOBAL = "custom", "global"
CLOSED_CACHE_SECONDS = 1.0  # how long a worker trusts that a circuit it read was closed
LATENCY_WINDOW_SECONDS = 3600  # GET /api/smtp/health: percentiles over the last hour
_CACHE_LIMIT = 10_000  # accounts remembered per worker


def counts_against(exc: SendFailed) -> bool:
    """True when a send's failure says the server (or the way to it) is unwell: a transport
    failure while connecting, a timeout or a dropped connection during the transaction, or one
    after the content went out (uncertain)."""
    t = exc.transport
    if t is None:
        return False
    return exc.phase == "connect" or exc.uncertain or t.kind in ("timeout", "closed")


def may_fail_over(exc: SendFailed) -> bool:
    """True when the message may go through another server instead: a failure that counts
    against the server and is certain (nothing can have been delivered: RFC 5321 4.1.1.4)."""
    return counts_against(exc) and not exc.uncertain


@dataclass(frozen=True)
class Admission:
    """Whether a send may use the account's own server: `use` (closed, or this request is the
    half-open probe: `probe`), else skip it for `retry_after` seconds (open)."""

    use: bool
    probe: bool = False
    retry_after: int = 0


_CLOSED = Admission(use=True)


class CircuitBreaker:
    """The breaker of every account's own server ("custom"), and the health records of both
    transports. Thread-safe; one per app (each worker a copy after the fork).

    `failures` consecutive failures open a circuit for `open_seconds`; then one request (the
    probe, claimed atomically in the database, held at most `probe_seconds`) tries the server:
    a success (or any answer) closes the circuit, a failure opens it again."""

    def __init__(
        self,
        store: HealthStore,
        *,
        failures: int = 5,
        open_seconds: float = 60.0,
        probe_seconds: float = 180.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.failures = failures
        self.open_seconds = open_seconds
        self.probe_seconds = probe_seconds
        self._clock = clock
        self._closed_until: dict[str, float] = {}  # account -> until when it is known closed
        self._lock = threading.Lock()

    # -- before a send -----------------------------------------------------------------------

    def admit(self, account_id: str) -> Admission:
        """May this send use the account's own server? Closed: yes (from the worker's memory
        for up to CLOSED_CACHE_SECONDS, else one read); open and due: yes for the one request
        that claims the probe; otherwise no, with the seconds until the next probe. When the
        database cannot be read the answer is yes (the breaker fails open: sends go on as
        without it)."""
        now = self._clock()
        until = self._closed_until.get(account_id)
        if until is not None and now < until:
            return _CLOSED
        try:
            return self._admit(account_id, now)
        except Exception as exc:  # noqa: BLE001 - a breaker that cannot be read stays out of the way
            name = type(exc).__name__
            log.error("account %s: circuit state not read (%s); sending", account_id, name)
            return _CLOSED

    def _admit(self, account_id: str, now: float) -> Admission:
        circuit = self.store.circuit(account_id, CUSTOM)
        if circuit is None or circuit.state == CLOSED:
            self._remember_closed(account_id, now)
            return _CLOSED
        self._closed_until.pop(account_id, None)
        wall = self.store.db.now_ms()
        due = circuit.open_until if circuit.state == OPEN else circuit.probe_until
        if due is None or due <= wall:
            if self.store.claim_probe(
                account_id, CUSTOM, hold_ms=int(self.probe_seconds * 1000)
            ):
                log.info("account %s: circuit half-open, probing its SMTP server", account_id)
                return Admission(use=True, probe=True)
            due = wall + int(self.open_seconds * 1000)  # another request probes now
        wait_ms = min(due - wall, int(self.open_seconds * 1000))
        return Admission(use=False, retry_after=max(1, math.ceil(wait_ms / 1000)))

    def _remember_closed(self, account_id: str, now: float) -> None:
        with self._lock:
            if len(self._closed_until) >= _CACHE_LIMIT:
                self._closed_until.clear()  # cheap and rare: each is one read to re-learn
            self._closed_until[account_id] = now + CLOSED_CACHE_SECONDS

    # -- after a send ------------------------------------------------------------------------

    def answered(self, account_id: str, admission: Admission) -> None:
        """The account's server took or refused the message. After a probe: close the
        circuit. Otherwise nothing is written (the message's row records the success).
        Never raises (a failed write is logged)."""
        if not admission.probe:
            return
        try:  # never raises: the message may have been taken, and its answer must stand
            self.store.close(account_id, CUSTOM)
        except Exception as exc:  # noqa: BLE001 - the claim lapses, and a later probe closes it
            name = type(exc).__name__
            log.error("account %s: circuit not closed after the probe (%s)", account_id, name)
            return
        log.info("account %s: SMTP server answered the probe; circuit closed", account_id)

    def failed(
        self,
        account_id: str,
        transport: str,
        exc: SendFailed,
        server: str,
        admission: Admission | None = None,
    ) -> None:
        """Record a failure of `transport` ("custom": counted by the breaker; "global": health
        only) when it counts against the server (counts_against). Never raises: a failure to
        record is logged and the send's answer stands."""
        if exc.transport is None or not counts_against(exc):
            return
        self._closed_until.pop(account_id, None)
        try:
            circuit = self.store.record_failure(
                account_id,
                transport,
                server=server,
                kind=exc.transport.kind,
                reason=exc.transport.text,
                threshold=self.failures if transport == CUSTOM else None,
                open_ms=int(self.open_seconds * 1000),
            )
        except Exception as exc_:  # noqa: BLE001 - health is secondary to the answer
            log.error("account %s: SMTP health not recorded (%s)", account_id, type(exc_).__name__)
            return
        if transport == CUSTOM and circuit.state == OPEN and (
            circuit.failures == self.failures or (admission is not None and admission.probe)
        ):
            log.warning(
                "account %s: circuit open for %s s after %d consecutive failures of its SMTP "
                "server",
                account_id,
                self.open_seconds,
                circuit.failures,
            )

    def abandoned(self, account_id: str, admission: Admission) -> None:
        """A probe ended without the server's verdict (the pool was busy, the request
        failed before sending): give the claim back so that the next request probes."""
        if admission.probe:
            try:
                self.store.release_probe(account_id, CUSTOM)
            except Exception as exc:  # noqa: BLE001 - the claim lapses by itself anyway
                name = type(exc).__name__
                log.error("account %s: probe claim not released (%s)", account_id, name)

    # -- connection tests --------------------------------------------------------------------

    def tested(self, account_id: str, server: str, error: TransportError | None) -> None:
        """A connection test of the account's own (saved) server: a pass is a success (it
        closes the circuit), a failure (a TransportError) counts like a send's."""
        self._closed_until.pop(account_id, None)
        if error is None:
            self.store.record_success(account_id, CUSTOM, server=server)
            return
        self.store.record_failure(
            account_id,
            CUSTOM,
            server=server,
            kind=error.kind,
            reason=error.text,
            threshold=self.failures,
            open_ms=int(self.open_seconds * 1000),
        )

    def forget(self, account_id: str) -> None:
        """The account's settings changed or went away: its server's record no longer applies."""
        self._closed_until.pop(account_id, None)
        self.store.forget(account_id, CUSTOM)

    # -- reading -----------------------------------------------------------------------------

    def report(self, account_id: str, servers: dict[str, str | None]) -> dict[str, TransportReport]:
        """The account's health per transport ("custom", "global"), with its send latency p50
        and p95 (milliseconds) over the last LATENCY_WINDOW_SECONDS; `servers` names the
        server ("host:port") each transport now goes to (None: none configured)."""
        since = self.store.db.now_ms() - LATENCY_WINDOW_SECONDS * 1000
        out = {}
        for transport in (CUSTOM, GLOBAL):
            h = self.store.health(account_id, transport)
            latency = latency_percentiles(
                self.store.db, account_id, since_ms=since, transport=transport
            )
            out[transport] = TransportReport(
                server=servers.get(transport) or h.server,
                circuit=h.state,
                consecutive_failures=h.failures,
                open_until=_iso(h.open_until) if h.state != CLOSED else None,
                last_success_at=_iso(h.last_success_at),
                last_failure_at=_iso(h.last_failure_at),
                last_failure_kind=h.last_failure_kind,
                last_failure_reason=h.last_failure_reason,
                p50_ms=latency.get(0.5),
                p95_ms=latency.get(0.95),
            )
        return out

    def circuits(self) -> list[tuple[str, str, str, int, int | None]]:
        """Every stored breaker (account, transport, state, failures, open_until ms), for a
        metrics exporter; accounts not listed are closed."""
        return self.store.circuits()

    def open_counts(self) -> list[tuple[str, int]]:
        """(transport, circuits open now) for the smtp_circuit_open gauge; only accounts' own
        servers ("custom") have a breaker."""
        return [("custom", sum(1 for c in self.circuits() if c[2] == "open"))]


def _iso(ms: int | None) -> str | None:
    return None if ms is None else iso_ms(ms)


@dataclass(frozen=True)
class TransportReport:
    """One transport's health as GET /api/smtp/health shows it: times as ISO 8601 UTC,
    latencies in milliseconds (None: no sent message in the window)."""

    server: str | None
    circuit: str  # closed, open, half_open ("global" has no breaker: always closed)
    consecutive_failures: int
    open_until: str | None  # open: when the next request probes; None when closed
    last_success_at: str | None
    last_failure_at: str | None
    last_failure_kind: str | None  # a TransportError kind: refused, timeout, tls, auth, ...
    last_failure_reason: str | None  # the failure's text (no secret in it)
    p50_ms: float | None
    p95_ms: float | None


@dataclass(frozen=True)
class AccountHealth:
    """An account's SMTP health: the transport its mail goes through now, whether it fails
    over, each transport's report, and whether its OAuth2 grant was refused (it must sign in
    again before its own server can be used)."""

    transport: str
    failover: bool
    transports: dict[str, TransportReport]
    window_seconds: int = LATENCY_WINDOW_SECONDS
    needs_reauthorization: bool = False


__all__ = [
    "CLOSED",
    "CUSTOM",
    "GLOBAL",
    "HALF_OPEN",
    "OPEN",
    "Admission",
    "CircuitBreaker",
    "AccountHealth",
    "TransportReport",
    "counts_against",
    "may_fail_over",
]
