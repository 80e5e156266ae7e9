"""SMTP health rows, the circuit breaker's transitions and its probe claim, and the latency
percentiles, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from smtp_service.storage.database import Database
from smtp_service.storage.health import CLOSED, HALF_OPEN, OPEN, HealthStore
from smtp_service.storage.messages import MessageLog
from smtp_service.storage.stats import latency_percentiles
from tests.storage.test_messages import FakeClock

A = "acct-a"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(database_url, clock) -> Database:
    database = Database(database_url, clock=clock)
    yield database
    database.dispose()


@pytest.fixture
def store(db) -> HealthStore:
    return HealthStore(db)


def _fail(store: HealthStore, account: str = A, threshold: int | None = 3, **kw: Any):
    return store.record_failure(
        account,
        kw.pop("transport", "custom"),
        server="smtp.example.com:587",
        kind="refused",
        reason="Connection refused by smtp.example.com:587",
        threshold=threshold,
        open_ms=kw.pop("open_ms", 60_000),
    )


def _message(log: MessageLog, n: int, *, duration: float, status: str = "sent", transport="custom",
             account: str = A) -> None:
    log.record(
        message_id=f"m{n}@example.com",
        account_id=account,
        from_addr="a@example.com",
        recipients=["b@example.net"],
        subject="s",
        transport=transport,
        status=status,
        accepted=[],
        rejected=[],
        smtp_reply=None,
        duration_ms=duration,
        tracking=False,
    )


def test_failures_count_and_open_the_circuit_at_the_threshold(store, clock) -> None:
    assert store.circuit(A, "custom") is None
    assert _fail(store).state == CLOSED
    assert _fail(store).failures == 2
    opened = _fail(store)
    assert (opened.state, opened.failures) == (OPEN, 3)
    assert opened.open_until == int(clock.now * 1000) + 60_000
    health = store.health(A, "custom")
    assert health.state == OPEN and health.failures == 3
    assert health.last_failure_kind == "refused"
    assert health.server == "smtp.example.com:587"
    assert store.circuits() == [(A, "custom", OPEN, 3, opened.open_until)]
    assert store.circuit("acct-b", "custom") is None  # per account


def test_a_transport_without_a_threshold_never_opens(store) -> None:
    for _ in range(10):
        circuit = _fail(store, threshold=None, transport="global")
    assert (circuit.state, circuit.failures) == (CLOSED, 10)


def test_an_answered_send_since_the_last_failure_starts_the_count_again(store, db, clock) -> None:
    log = MessageLog(db)
    _fail(store)
    _fail(store)
    clock.advance(1)
    _message(log, 1, duration=12.0, status="bounced")  # the server answered: it is up
    assert store.health(A, "custom").failures == 0
    clock.advance(1)
    assert _fail(store).failures == 1
    assert store.health(A, "custom").last_success_at == int((clock.now - 1) * 1000)
    clock.advance(1)
    _message(log, 2, duration=12.0, status="failed")  # a failure is no success
    _message(log, 3, duration=12.0, transport="global")  # another transport's success
    assert _fail(store).failures == 2


def test_exactly_one_concurrent_claim_gets_the_probe(store, db, clock) -> None:
    for _ in range(3):
        _fail(store, open_ms=1000)
    assert not store.claim_probe(A, "custom", hold_ms=5000)  # not due yet
    clock.advance(1)
    stores = [HealthStore(Database(db.url.render_as_string(hide_password=False), clock=clock))
              for _ in range(4)]
    won: list[bool] = []
    barrier = threading.Barrier(len(stores) * 2)

    def claim(s: HealthStore) -> None:
        barrier.wait()
        won.append(s.claim_probe(A, "custom", hold_ms=5000))

    threads = [threading.Thread(target=claim, args=(s,)) for s in stores for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.db.dispose()
    assert sorted(won) == [False] * 7 + [True]
    assert store.circuit(A, "custom").state == HALF_OPEN
    clock.advance(4)
    assert not store.claim_probe(A, "custom", hold_ms=5000)  # the claim still holds
    clock.advance(2)
    assert store.claim_probe(A, "custom", hold_ms=5000)  # it lapsed: the next one probes


def test_a_probe_failure_reopens_and_a_success_closes(store, clock) -> None:
    for _ in range(3):
        _fail(store, open_ms=1000)
    clock.advance(1)
    assert store.claim_probe(A, "custom", hold_ms=5000)
    reopened = _fail(store, open_ms=1000)
    assert reopened.state == OPEN and reopened.open_until == int(clock.now * 1000) + 1000
    clock.advance(1)
    assert store.claim_probe(A, "custom", hold_ms=5000)
    store.release_probe(A, "custom")  # no verdict: open and due again
    assert store.circuit(A, "custom").state == OPEN
    assert store.claim_probe(A, "custom", hold_ms=5000)
    assert store.close(A, "custom")
    assert store.circuit(A, "custom") == store.circuit(A, "custom").__class__(CLOSED, 0, None, None)
    assert not store.close(A, "custom")  # closed already: nothing written


def test_a_passed_test_is_a_success_and_forget_drops_the_record(store, clock) -> None:
    for _ in range(3):
        _fail(store)
    store.record_success(A, "custom", server="smtp.example.com:587")
    health = store.health(A, "custom")
    assert (health.state, health.failures) == (CLOSED, 0)
    assert health.last_success_at == int(clock.now * 1000)
    store.forget(A, "custom")
    assert store.circuit(A, "custom") is None


def test_a_long_reason_is_cut(store) -> None:
    store.record_failure(A, "custom", server="h:1", kind="protocol", reason="x" * 5000,
                         threshold=3, open_ms=1)
    assert len(store.health(A, "custom").last_failure_reason) == 500


def test_latency_percentiles_by_nearest_rank(db, clock) -> None:
    log = MessageLog(db)
    start = int(clock.now * 1000)
    for n, duration in enumerate([50.0, 10.0, 40.0, 20.0, 30.0, 1000.0, 60.0, 70.0, 80.0, 90.0]):
        _message(log, n, duration=duration)
        clock.advance(1)
    _message(log, 100, duration=5.0, status="bounced")  # not a sent message: not counted
    _message(log, 101, duration=7.0, transport="global")
    _message(log, 102, duration=9.0, account="acct-b")
    got = latency_percentiles(db, A, since_ms=start, transport="custom")
    assert got == {0.5: 50.0, 0.95: 1000.0}
    assert latency_percentiles(db, A, since_ms=start, percentiles=(0.1, 1.0)) == {
        0.1: 10.0,  # 11 durations with the global one (7.0): rank ceil(1.1) = 2
        1.0: 1000.0,
    }
    # the window: [since, until)
    assert latency_percentiles(
        db, A, since_ms=start + 1000, until_ms=start + 3000, transport="custom"
    ) == {0.5: 10.0, 0.95: 40.0}
    assert latency_percentiles(db, "acct-c", since_ms=0) == {0.5: None, 0.95: None}
    assert latency_percentiles(db, A, since_ms=start, transport="global", percentiles=(0.5,)) == {
        0.5: 7.0
    }
    with pytest.raises(ValueError):
        latency_percentiles(db, A, since_ms=0, percentiles=(0.0,))
