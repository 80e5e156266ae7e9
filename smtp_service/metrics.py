"""Prometheus metrics (prometheus-client), added up across gunicorn workers.

Under gunicorn, gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR to a fresh folder before any
worker starts: each worker then writes its values to memory-mapped files there, and a scrape,
answered by any one worker, reads every worker's files (prometheus-client's multiprocess mode).
Without it (the flask CLI, tests in one process) the values live in this process's registry.

Every metric is module-level (a registry refuses a name twice) and has low-cardinality labels
only: no account id, no path with an id in it (the URL rule instead), no free text.
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

# prometheus-client picks its value store at import: an empty variable (a test harness clearing
# every setting) must mean "not set", not "multiprocess mode in the current folder".
if os.environ.get("PROMETHEUS_MULTIPROC_DIR") == "":
    del os.environ["PROMETHEUS_MULTIPROC_DIR"]

from prometheus_client import (  # noqa: E402 - after the environment check above
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402

from smtp_service.services.session import SendFailed  # noqa: E402

__all__ = ["CONTENT_TYPE_LATEST", "render", "multiprocess_dir"]

# The *_created series (when each label set first appeared) are not exported in multiprocess
# mode; leave them out of single-process mode too, so that both read the same.
disable_created_metrics()

REQUESTS = Counter(
    "smtp_service_http_requests_total",
    "HTTP requests answered, by method, URL rule and status",
    ["method", "route", "status"],
)
RATE_LIMITED = Counter(
    "smtp_service_rate_limited_total",
    "Requests refused with 429 (a rate limit), by URL rule",
    ["route"],
)
SENDS = Counter(
    "smtp_service_sends_total",
    "Messages sent through an SMTP server, by transport (custom, global) and outcome "
    "(sent, bounced, failed)",
    ["transport", "outcome"],
)
BOUNCES = Counter(
    "smtp_service_bounces_total",
    "Recipients refused by an SMTP server, by type (hard, soft) and category (mailbox, "
    "mailbox-full, transient, policy, protocol)",
    ["type", "category"],
)
SMTP_LATENCY = Histogram(
    "smtp_service_smtp_send_seconds",
    "Time an SMTP send took (waiting for a pooled connection included), by transport",
    ["transport"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 150.0),
)
POOLED = Gauge(
    "smtp_service_pooled_connections",
    "Open pooled SMTP connections (state: open = all, idle = not carrying a message)",
    ["state"],
    multiprocess_mode="livesum",
)

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "(unmatched)"  # the route label of a request no URL rule matched (a 404 or 405)
_requests: dict[tuple[str, str, int], Any] = {}  # label children, made once each
_rate_limited: dict[str, Any] = {}


def multiprocess_dir() -> str | None:
    """The folder workers write their values to, or None in single-process mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def count_request(method: str, route: str | None, status: int) -> None:
    """Count one answered request. `route` is the URL rule that matched (None: none did);
    a method outside KNOWN_METHODS is counted as "other"."""
    if method not in KNOWN_METHODS:  # before the cache: made-up methods must not grow it
        method = "other"
    key = (method, route or UNMATCHED, status)
    child = _requests.get(key)
    if child is None:
        child = _requests[key] = REQUESTS.labels(method, key[1], str(status))
    child.inc()
    if status == 429:
        limited = _rate_limited.get(key[1])
        if limited is None:
            limited = _rate_limited[key[1]] = RATE_LIMITED.labels(key[1])
        limited.inc()


def count_send(
    transport: str, outcome: str, seconds: float | None, refusals: Iterable[tuple[str, str]]
) -> None:
    """Count one send that reached an SMTP server: its outcome, its SMTP time in seconds
    (None: not measured), and each refused recipient as (type, category)."""
    key = (transport, outcome)
    sends = _sends.get(key)
    if sends is None:
        sends = _sends[key] = SENDS.labels(transport, outcome)
    sends.inc()
    if seconds is not None:
        latency = _latency.get(transport)
        if latency is None:
            latency = _latency[transport] = SMTP_LATENCY.labels(transport)
        latency.observe(seconds)
    for kind, category in refusals:
        BOUNCES.labels(kind, category or "unknown").inc()


_sends: dict[tuple[str, str], Any] = {}
_latency: dict[str, Any] = {}


# -- the pool gauge ---------------------------------------------------------------------------

class PoolLike(Protocol):
    """What the gauge reads: TransportPool.stats() with "open" and "idle" counts."""

    def stats(self) -> dict[str, int]: ...


_pools: weakref.WeakSet[Any] = weakref.WeakSet()
_pool_thread: threading.Thread | None = None
_pool_lock = threading.Lock()
POOL_REFRESH_SECONDS = 2.0


def watch_pool(pool: PoolLike) -> None:
    """Report `pool.stats()` ("open", "idle") in POOLED, refreshed every POOL_REFRESH_SECONDS
    by a daemon thread of this process, started on the first call after a fork (so each
    gunicorn worker reports its own pool and a scrape adds them up). The pool is held weakly."""
    global _pool_thread
    with _pool_lock:
        _pools.add(pool)
        if _pool_thread is None or not _pool_thread.is_alive():
            _pool_thread = threading.Thread(
                target=_refresh_pool_gauge, name="metrics-pool", daemon=True
            )
            _pool_thread.start()


def refresh_pool_gauge() -> None:
    """Set POOLED from every watched pool now (also done before each scrape)."""
    open_total = idle_total = 0
    with _pool_lock:
        pools = list(_pools)
    for pool in pools:
        try:
            numbers = pool.stats()
        except Exception:  # noqa: BLE001 - a gauge must never break the service
            continue
        open_total += numbers.get("open", 0)
        idle_total += numbers.get("idle", 0)
    POOLED.labels("open").set(open_total)
    POOLED.labels("idle").set(idle_total)


def _refresh_pool_gauge() -> None:
    while True:
        refresh_pool_gauge()
        time.sleep(POOL_REFRESH_SECONDS)


def _forget_pool_thread() -> None:
    global _pool_thread, _pool_lock
    _pool_thread = None  # threads do not survive a fork; the next watch_pool starts one
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_thread)


# -- circuit state, read at scrape time -------------------------------------------------------

CircuitSource = Callable[[], Iterable[tuple[str, int]]]
_circuit_source: CircuitSource | None = None


def set_circuit_source(source: CircuitSource | None) -> None:
    """Name the function that says how many SMTP circuits are open now, as
    (transport, count) pairs, e.g. [("custom", 2), ("global", 0)]. It is called at every scrape
    (the breaker's state is in the database, shared by every worker, so it is read once there
    rather than added up per worker). Without one, smtp_circuit_open is not reported."""
    global _circuit_source
    _circuit_source = source


class CircuitCollector:
    """smtp_circuit_open{transport}: circuits open now, from the source set above."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        source = _circuit_source
        if source is None:
            return
        family = GaugeMetricFamily(
            "smtp_circuit_open",
            "SMTP servers whose circuit breaker is open now (skipped until it half-opens), "
            "by transport",
            labels=["transport"],
        )
        try:
            for transport, count in source():
                family.add_metric([transport], count)
        except Exception:  # noqa: BLE001 - a scrape reports what it can
            return
        yield family


_CIRCUITS = CircuitCollector()
if multiprocess_dir() is None:
    REGISTRY.register(_CIRCUITS)


def render() -> bytes:
    """The text exposition of every metric: all workers' values in multiprocess mode (plus the
    circuit state), this process's registry otherwise."""
    refresh_pool_gauge()
    if multiprocess_dir() is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(_CIRCUITS)
    return generate_latest(registry)


# -- SMTP attempts of one request -------------------------------------------------------------

_attempts: contextvars.ContextVar[list[tuple[float, int | None]] | None] = contextvars.ContextVar(
    "smtp_attempts", default=None
)


class noting_smtp:  # noqa: N801 - used as a function: `with noting_smtp() as attempts:`
    """Collect, while the block runs on this thread, every SMTP send made through a
    MeasuredPool as (seconds, reply code or None). An empty list afterwards means no SMTP
    server was reached (for example an idempotent replay). A class, not a generator-based
    context manager: it runs on every send."""

    __slots__ = ("attempts", "_token")

    def __enter__(self) -> list[tuple[float, int | None]]:
        self.attempts: list[tuple[float, int | None]] = []
        self._token = _attempts.set(self.attempts)
        return self.attempts

    def __exit__(self, *_exc: object) -> None:
        _attempts.reset(self._token)


class MeasuredPool:
    """A TransportPool whose send() notes its time and the server's reply code for
    noting_smtp(); everything else is the pool's own. The mailer is given this one."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def send(self, *args: Any, **kwargs: Any) -> Any:
        """TransportPool.send, timed; raises what it raises."""
        attempts = _attempts.get()
        if attempts is None:
            return self._pool.send(*args, **kwargs)
        started = time.perf_counter()
        try:
            delivery = self._pool.send(*args, **kwargs)
        except SendFailed as exc:
            attempts.append((time.perf_counter() - started, _failure_code(exc)))
            raise
        attempts.append((time.perf_counter() - started, _reply_code(delivery.reply)))
        return delivery


def _reply_code(reply: str | None) -> int | None:
    """The code at the start of "250 2.0.0 Ok", or None."""
    head = (reply or "")[:3]
    return int(head) if head.isdigit() else None


def _failure_code(exc: SendFailed) -> int | None:
    if exc.transport is not None:
        return exc.transport.code
    if exc.code is not None:
        return exc.code
    for code, _reply in exc.refused.values():
        return code
    return None
