"""Send rate limits in the message database, on SQLite and PostgreSQL: rates parsed with the
`limits` package, slots taken all or none, exact under concurrency (threads on separate
engines, and processes), given back, old windows pruned, Retry-After until the window ends."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from smtp_service.services.errors import SendRateLimited
from smtp_service.services.send_rate import (
    InvalidRate,
    Rate,
    SendRateLimiter,
    parse_rates,
)
from smtp_service.storage.database import Database
from smtp_service.storage.send_rate import SendCounters, Window

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: a whole day, hour and minute


class FakeClock:
    """A clock the test moves by hand (window boundaries cannot be waited for)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    yield database
    database.dispose()


# -- the syntax ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, rates",
    [
        ("500/day", (Rate(500, 86400),)),
        ("100/minute;2000/hour", (Rate(100, 60), Rate(2000, 3600))),
        ("2000 per hour, 100 per minute", (Rate(100, 60), Rate(2000, 3600))),  # sorted
        ("10/5 seconds|10/5 seconds", (Rate(10, 5),)),  # a duplicate counts once
        ("10/day;5/day", (Rate(5, 86400),)),  # one window per length: the smaller amount
        ("  7 per 2 days ", (Rate(7, 172800),)),
        ("", ()),
        ("unlimited", ()),
        ("Unlimited", ()),
    ],
)
def test_rates_parse_in_flask_limiters_syntax(text, rates):
    assert parse_rates(text) == rates


@pytest.mark.parametrize(
    "text, says",
    [
        ("lots", "Must be a rate such as '500/day'"),
        ("5/fortnight", "Must be a rate such as"),
        ("1/day;", "Must be a rate such as"),
        ("-1/day", "Must be a rate such as"),
        ("0/day", "at least 1 send (for no limit: 'unlimited')"),
        ("1/day;" * 50, "at most 200 characters"),
    ],
)
def test_what_is_not_a_rate_is_refused_saying_why(text, says):
    with pytest.raises(InvalidRate, match=r".*" + says.replace("(", r"\(").replace(")", r"\)")):
        parse_rates(text)


def test_a_rate_reads_as_people_write_it():
    assert [str(r) for r in parse_rates("100/minute;2000/hour;500/day;10/5 seconds")] == [
        "10 per 5 seconds",
        "100 per minute",
        "2000 per hour",
        "500 per day",
    ]


# -- counters ------------------------------------------------------------------------------------


def test_slots_are_taken_until_the_window_is_full(db):
    counters = SendCounters(db)
    w = Window("60", 600, 3)
    assert [counters.take("acct-a", [w]) for _ in range(3)] == [None, None, None]
    assert counters.take("acct-a", [w]) == w
    assert counters.used("acct-a", "60", 600) == 3
    # a higher limit on the same window counts what it holds
    assert counters.take("acct-a", [Window("60", 600, 4)]) is None
    assert counters.take("acct-a", [Window("60", 600, 4)]) == Window("60", 600, 4)
    # other accounts and other windows count apart
    assert counters.take("acct-b", [w]) is None
    assert counters.take("acct-a", [Window("60", 660, 3)]) is None


def test_several_windows_are_taken_all_or_none(db):
    counters = SendCounters(db)
    minute, hour = Window("60", 0, 2), Window("3600", 0, 3)
    assert counters.take("acct-a", [minute, hour]) is None
    assert counters.take("acct-a", [minute, hour]) is None
    assert counters.take("acct-a", [minute, hour]) == minute
    assert counters.used("acct-a", "3600", 0) == 2  # the hour took nothing for the refused one
    next_minute = Window("60", 60, 2)
    assert counters.take("acct-a", [next_minute, hour]) is None
    assert counters.take("acct-a", [next_minute, hour]) == hour
    assert counters.used("acct-a", "60", 60) == 1  # nor the minute for this one


def test_a_slot_given_back_is_free_again(db):
    counters = SendCounters(db)
    w = Window("60", 0, 1)
    assert counters.take("acct-a", [w]) is None
    assert counters.take("acct-a", [w]) == w
    counters.give_back("acct-a", [w])
    assert counters.used("acct-a", "60", 0) == 0
    counters.give_back("acct-a", [w])  # never below zero
    assert counters.used("acct-a", "60", 0) == 0
    assert counters.take("acct-a", [w]) is None


def test_ended_windows_are_pruned_when_the_next_one_starts(db):
    counters = SendCounters(db)
    for start in (0, 60, 120):
        assert counters.take("acct-a", [Window("60", start, 5)]) is None
        assert counters.take("acct-b", [Window("60", start, 5)]) is None
    rows = db.query(sa.text("SELECT account_id, window_start FROM send_rate"))
    assert sorted((r.account_id, r.window_start) for r in rows) == [
        ("acct-a", 120),
        ("acct-b", 120),
    ]


def test_concurrent_takes_on_separate_engines_are_exact(database_url):
    """20 threads on 4 engines (4 connection pools, as 4 workers would have) race for 7 slots."""
    engines = [Database(database_url) for _ in range(4)]
    try:
        counters = [SendCounters(e) for e in engines]
        w = Window("86400", 0, 7)
        barrier = threading.Barrier(20)
        results: list[Window | None] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            barrier.wait()
            # one window: nothing else serialises the racers (a first window's row lock would)
            got = counters[i % 4].take("acct-race", [w])
            with lock:
                results.append(got)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results.count(None) == 7 and results.count(w) == 13
        assert counters[0].used("acct-race", "86400", 0) == 7
    finally:
        for e in engines:
            e.dispose()


def _take_in_process(url: str, n: int, out: multiprocessing.Queue) -> None:
    db = Database(url)
    counters = SendCounters(db)
    w = Window("86400", 0, 5)
    out.put(sum(counters.take("acct-procs", [w]) is None for _ in range(n)))
    db.dispose()


def test_concurrent_takes_from_processes_are_exact(database_url):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_take_in_process, args=(database_url, 4, out)) for _ in range(4)]
    for p in procs:
        p.start()
    taken = sum(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    assert taken == 5


# -- the limiter ---------------------------------------------------------------------------------


def test_retry_after_is_the_time_until_the_full_window_ends(db):
    clock = FakeClock(T0 + 20.2)  # 20.2 s into a minute, 20.2 s into the day
    limiter = SendRateLimiter(SendCounters(db), parse_rates("2/minute;3/day"), clock=clock)
    rates = limiter.default
    limiter.reserve("acct-a", rates)
    limiter.reserve("acct-a", rates)
    with pytest.raises(SendRateLimited) as refused:
        limiter.reserve("acct-a", rates)
    assert refused.value.retry_after == 40  # 39.8 s, rounded up
    assert refused.value.rate == "2 per minute"
    assert refused.value.message == (
        "Send rate limit reached for this account (2 per minute); nothing was sent. "
        "Retry after 40 s"
    )
    clock.now = T0 + 60  # the next minute: the minute has room, the day one slot
    limiter.reserve("acct-a", rates)
    with pytest.raises(SendRateLimited) as refused:
        limiter.reserve("acct-a", rates)
    assert refused.value.retry_after == 86400 - 60 and refused.value.rate == "3 per day"
    clock.now = T0 + 86400 - 0.01  # a hundredth of a second before the window ends: 1 s
    with pytest.raises(SendRateLimited) as refused:
        limiter.reserve("acct-a", rates)
    assert refused.value.retry_after == 1


def test_a_released_reservation_frees_every_window(db):
    limiter = SendRateLimiter(SendCounters(db), parse_rates("1/minute;1/hour"), clock=FakeClock())
    reservation = limiter.reserve("acct-a", limiter.default)
    limiter.release(reservation)
    limiter.reserve("acct-a", limiter.default)  # both windows had their slot back
    with pytest.raises(SendRateLimited):
        limiter.reserve("acct-a", limiter.default)


def test_the_accounts_own_rate_replaces_the_default(db):
    limiter = SendRateLimiter(SendCounters(db), parse_rates("100/minute"))
    assert limiter.rates_for(None) == (Rate(100, 60),)
    assert limiter.rates_for("500/day") == (Rate(500, 86400),)
    assert limiter.rates_for("unlimited") == ()
