"""Analytics computed by the database, on SQLite and PostgreSQL: latency percentiles against a
Python computation on known durations, counts per bucket and at bucket boundaries, refusals
counted per recipient, account isolation, and the listing's keyset pagination walking every
message exactly once while other messages are inserted."""

from __future__ import annotations

import itertools
import math
import random
import threading
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import pytest

from smtp_service.services.analytics import MessageAnalytics, recipient_forms, resolve_range
from smtp_service.services.errors import InvalidInput
from smtp_service.storage import stats
from smtp_service.storage.database import Database
from smtp_service.storage.messages import MessageLog

HOUR = 3_600_000
DAY = 24 * HOUR
# 2026-11-29T00:00:00Z: a day (and hour) boundary
MIDNIGHT = int(datetime(2026, 11, 29, tzinfo=UTC).timestamp() * 1000)


class Clock:
    """Integer milliseconds the test sets; the Database reads seconds."""

    def __init__(self, ms: int = MIDNIGHT) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(database_url, clock) -> Database:
    database = Database(database_url, clock=clock)
    yield database
    database.dispose()


_ids = itertools.count()


def record(
    db: Database,
    clock: Clock,
    *,
    at: int | None = None,
    account: str = "acct-a",
    status: str = "sent",
    duration: float = 10.0,
    rejected: list[dict[str, Any]] | None = None,
    recipients: list[str] | None = None,
    sender: str = "news@example.com",
    tracking: bool = False,
    transport: str = "custom",
    message_id: str | None = None,
) -> str:
    """One message row through the storage layer, created at `at` (ms) when given."""
    if at is not None:
        clock.ms = at
    message_id = message_id or f"m{next(_ids):06d}@example.com"
    MessageLog(db).record(
        message_id=message_id,
        account_id=account,
        from_addr=sender,
        recipients=recipients or ["rcpt@example.net"],
        subject="s",
        transport=transport,
        status=status,
        accepted=[] if status != "sent" else ["rcpt@example.net"],
        rejected=rejected or [],
        smtp_reply=None,
        duration_ms=duration,
        tracking=tracking,
    )
    return message_id


def refusal(kind: str, email: str = "x@example.net") -> dict[str, Any]:
    return {
        "email": email,
        "code": 550 if kind == "hard" else 452,
        "enhancedCode": None,
        "reply": "no",
        "type": kind,
        "category": "mailbox" if kind == "hard" else "mailbox-full",
        "temporary": kind == "soft",
    }


def nearest_rank(values: list[float], p: str) -> float:
    """The nearest-rank percentile, exactly: the value at rank ceil(p * n) of the sorted values."""
    ordered = sorted(values)
    return ordered[math.ceil(Fraction(p) * len(ordered)) - 1]


# -- latency percentiles --------------------------------------------------------------------------

PS = ("0.01", "0.25", "0.5", "0.9", "0.95", "0.99", "1")


def test_latency_percentiles_match_a_python_computation(db, clock):
    rng = random.Random(7)
    durations = [round(rng.uniform(1, 900), 3) for _ in range(137)] + [42.0] * 9  # with ties
    rng.shuffle(durations)
    for i, d in enumerate(durations):
        record(db, clock, at=MIDNIGHT + i, duration=d)
    # none of these counts: not sent, another account, outside the window
    record(db, clock, at=MIDNIGHT + 500, status="failed", duration=99_999.0)
    record(db, clock, at=MIDNIGHT + 501, status="bounced", duration=88_888.0)
    record(db, clock, at=MIDNIGHT + 502, account="acct-b", duration=77_777.0)
    record(db, clock, at=MIDNIGHT - 1, duration=66_666.0)

    got = stats.latency_percentiles(
        db, "acct-a", since_ms=MIDNIGHT, percentiles=tuple(float(p) for p in PS)
    )
    assert got == {float(p): nearest_rank(durations, p) for p in PS}


def test_latency_percentiles_of_a_window_and_a_transport(db, clock):
    record(db, clock, at=MIDNIGHT, duration=1.0, transport="global")
    record(db, clock, at=MIDNIGHT + 1, duration=2.0, transport="custom")
    record(db, clock, at=MIDNIGHT + 2, duration=3.0, transport="custom")
    record(db, clock, at=MIDNIGHT + 3, duration=400.0, transport="custom")
    assert stats.latency_percentiles(db, "acct-a", since_ms=MIDNIGHT) == {0.5: 2.0, 0.95: 400.0}
    assert stats.latency_percentiles(db, "acct-a", since_ms=MIDNIGHT, transport="global") == {
        0.5: 1.0,
        0.95: 1.0,
    }
    until = stats.latency_percentiles(
        db, "acct-a", since_ms=MIDNIGHT + 1, until_ms=MIDNIGHT + 3, transport="custom"
    )
    assert until == {0.5: 2.0, 0.95: 3.0}  # until is exclusive
    none = stats.latency_percentiles(db, "acct-a", since_ms=MIDNIGHT + 4, percentiles=(0.99,))
    assert none == {0.99: None}
    with pytest.raises(ValueError):
        stats.latency_percentiles(db, "acct-a", since_ms=0, percentiles=(0.0,))


# -- counts per bucket ----------------------------------------------------------------------------


def test_counts_per_bucket_with_refusals_per_recipient(db, clock):
    # bucket 00:00-01:00
    record(db, clock, at=MIDNIGHT, tracking=True, duration=5.0)
    record(
        db,
        clock,
        at=MIDNIGHT + 1000,
        tracking=True,
        duration=7.0,
        rejected=[refusal("hard", "a@x.net"), refusal("soft", "b@x.net")],
    )
    record(db, clock, at=MIDNIGHT + 2000, status="failed", duration=3000.0)
    record(
        db,
        clock,
        at=HOUR + MIDNIGHT - 1,  # the last millisecond of the first hour
        status="bounced",
        rejected=[refusal("hard", "c@x.net"), refusal("hard", "d@x.net")],
    )
    # bucket 01:00-02:00: its first millisecond
    record(db, clock, at=MIDNIGHT + HOUR, status="bounced", rejected=[refusal("soft")])
    # other accounts and other hours are not counted
    record(db, clock, at=MIDNIGHT + 10, account="acct-b", rejected=[refusal("hard")])
    record(db, clock, at=MIDNIGHT + 2 * HOUR)  # == until: excluded

    got = stats.bucket_counts(
        db, "acct-a", since_ms=MIDNIGHT, until_ms=MIDNIGHT + 2 * HOUR, interval_ms=HOUR
    )
    assert set(got) == {MIDNIGHT, MIDNIGHT + HOUR}
    first, second = got[MIDNIGHT], got[MIDNIGHT + HOUR]
    assert (first.messages, first.sent, first.failed, first.bounced) == (4, 2, 1, 1)
    assert (first.hard_bounces, first.soft_bounces) == (3, 1)
    assert (first.tracked, first.opened, first.opens) == (2, 0, 0)
    assert first.latency == {0.5: 5.0, 0.95: 7.0, 0.99: 7.0}  # sent messages only
    assert (second.messages, second.bounced, second.soft_bounces, second.hard_bounces) == (
        1,
        1,
        1,
        0,
    )
    assert second.latency == {0.5: None, 0.95: None, 0.99: None}


def test_opens_are_counted_by_the_bucket_of_the_message(db, clock):
    log = MessageLog(db)
    opened = record(db, clock, at=MIDNIGHT + 5, tracking=True)
    record(db, clock, at=MIDNIGHT + 6, tracking=True)
    clock.ms = MIDNIGHT + 3 * HOUR  # opened hours later: still the message's bucket
    assert log.record_open("acct-a", opened, reader="r1")
    assert log.record_open("acct-a", opened, reader="r2")
    got = stats.bucket_counts(
        db, "acct-a", since_ms=MIDNIGHT, until_ms=MIDNIGHT + DAY, interval_ms=HOUR
    )
    assert list(got) == [MIDNIGHT]
    assert (got[MIDNIGHT].tracked, got[MIDNIGHT].opened, got[MIDNIGHT].opens) == (2, 1, 2)
    assert got[MIDNIGHT].tracked_opened == 1


def test_the_service_lists_every_bucket_aligned_to_utc(db, clock):
    analytics = MessageAnalytics(db, b"k" * 32)
    record(db, clock, at=MIDNIGHT - 1)  # 2026-11-28, last millisecond
    record(db, clock, at=MIDNIGHT, duration=4.0)  # 2026-11-29, first millisecond
    record(db, clock, at=MIDNIGHT + DAY - 1, duration=8.0)  # 2026-11-29, last millisecond
    clock.ms = MIDNIGHT + 12 * HOUR + 5  # now: 12:00:00.005
    start = datetime(2026, 11, 27, 15, 30, tzinfo=UTC)  # widened to 2026-11-27T00:00
    end = datetime(2026, 11, 29, 0, 0, 0, 1000, tzinfo=UTC)  # widened to 2026-11-30T00:00
    got = analytics.stats("acct-a", start=start, end=end, interval="day")
    assert (got.start, got.end) == ("2026-11-27T00:00:00.000Z", "2026-11-30T00:00:00.000Z")
    assert [(p.start, p.messages) for p in got.intervals] == [
        ("2026-11-27T00:00:00.000Z", 0),
        ("2026-11-28T00:00:00.000Z", 1),
        ("2026-11-29T00:00:00.000Z", 2),
    ]
    assert got.intervals[0].latency_ms == {"p50": None, "p95": None, "p99": None}
    assert got.intervals[2].latency_ms == {"p50": 4.0, "p95": 8.0, "p99": 8.0}
    assert got.total.messages == 3
    assert got.total.latency_ms == {"p50": 8.0, "p95": 10.0, "p99": 10.0}
    assert got.total.open_rate is None
    hours = analytics.stats("acct-a", start=datetime(2026, 11, 28, 23, tzinfo=UTC), interval="hour")
    assert [(p.start, p.messages) for p in hours.intervals][:2] == [
        ("2026-11-28T23:00:00.000Z", 1),
        ("2026-11-29T00:00:00.000Z", 1),
    ]
    assert hours.intervals[-1].end == "2026-11-29T13:00:00.000Z"  # now (12:00) rounded up


@pytest.mark.parametrize(
    ("start", "end", "interval", "field"),
    [
        ("2026-11-29T00:00:00Z", "2026-11-29T00:00:00Z", "day", "to"),  # empty
        ("2026-11-29T00:00:00Z", "2026-11-28T00:00:00Z", "day", "to"),  # backwards
        ("1969-12-31T23:59:59Z", "2026-11-28T00:00:00Z", "day", "from"),
        ("2026-01-01T00:00:00Z", "2026-03-15T00:00:00Z", "hour", "to"),  # 1752 hours
        (None, None, "week", "interval"),
    ],
)
def test_bad_ranges_are_refused_naming_the_field(start, end, interval, field):
    def parse(text):
        return None if text is None else datetime.fromisoformat(text)

    with pytest.raises(InvalidInput) as caught:
        resolve_range(parse(start), parse(end), interval, MIDNIGHT)
    assert list(caught.value.fields) == [field]


def test_a_range_of_exactly_the_most_buckets_is_taken():
    start = datetime(2026, 1, 1, tzinfo=UTC)
    since, until, step = resolve_range(
        start, datetime.fromtimestamp(start.timestamp() + 1000 * 3600, UTC), "hour", MIDNIGHT
    )
    assert (until - since) // step == 1000
    with pytest.raises(InvalidInput):
        resolve_range(
            start, datetime.fromtimestamp(start.timestamp() + 1000 * 3600 + 1, UTC), "hour", 0
        )


# -- the listing ----------------------------------------------------------------------------------


def _walk(analytics: MessageAnalytics, account: str, **filters: Any) -> list[dict[str, Any]]:
    seen, cursor = [], None
    while True:
        page = analytics.page(account, cursor=cursor, **filters)
        seen += page.messages
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor


def test_pagination_walks_every_message_once_while_others_are_inserted(db, clock):
    analytics = MessageAnalytics(db, b"k" * 32)
    initial = set()
    for i in range(120):  # five messages per millisecond: the keyset's tie on message_id
        initial.add(record(db, clock, at=MIDNIGHT + i // 5))
    record(db, clock, at=MIDNIGHT + 3, account="acct-b")

    stop = threading.Event()
    inserted: list[str] = []
    writer_clock = Clock()
    writer_db = Database(db.url.render_as_string(hide_password=False), clock=writer_clock)
    rng = random.Random(3)

    def insert() -> None:  # new messages now and, as from a skewed clock, inside the walked range
        while not stop.is_set() and len(inserted) < 400:
            at = MIDNIGHT + rng.choice([rng.randrange(0, 24), 10_000 + len(inserted)])
            inserted.append(record(writer_db, writer_clock, at=at))

    thread = threading.Thread(target=insert)
    thread.start()
    try:
        seen = []
        cursor = None
        while True:
            page = analytics.page("acct-a", limit=7, cursor=cursor)
            seen += page.messages
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    finally:
        stop.set()
        thread.join()
        writer_db.dispose()
    ids = [m["messageId"] for m in seen]
    assert len(ids) == len(set(ids))  # nothing twice
    assert initial <= set(ids)  # every message that was there at the start, once
    assert set(ids) <= initial | set(inserted)  # nothing of another account
    keys = [(m["createdAt"], m["messageId"]) for m in seen]
    assert keys == sorted(keys, reverse=True)  # newest first
    assert inserted  # the writer did run during the walk


def test_filters_and_address_spellings(db, clock):
    analytics = MessageAnalytics(db, b"k" * 32)
    a = record(db, clock, at=MIDNIGHT, recipients=["Alice@Example.NET", "b@x.net"])
    b = record(db, clock, at=MIDNIGHT + 1, recipients=["jörg@bücher.example"], status="bounced")
    c = record(db, clock, at=MIDNIGHT + 2, recipients=["Émile@x.net"], sender="Ops@Example.com")
    record(db, clock, at=MIDNIGHT + 3, recipients=["alice@example.net.evil"])
    record(db, clock, at=MIDNIGHT + 4, account="acct-b", recipients=["alice@example.net"])

    def ids(**filters):
        return [m["messageId"] for m in _walk(analytics, "acct-a", limit=2, **filters)]

    assert ids(to="alice@example.net") == [a]
    assert ids(to="ALICE@EXAMPLE.NET") == [a]
    assert ids(to="alice") == []  # exact, not a substring
    assert ids(to="jörg@xn--bcher-kva.example") == [b]  # IDNA and Unicode domains are one
    assert ids(to="JÖRG@bücher.example") == []  # only ASCII letters ignore case
    assert ids(to="Émile@X.NET") == [c]
    assert ids(to="émile@x.net") == []
    assert ids(sender="ops@example.com") == [c]
    assert ids(status="bounced") == [b]
    assert ids(status="sent", to="b@x.net") == [a]
    assert recipient_forms("Jörg@Bücher.example") == (
        "jörg@bücher.example",
        "jörg@xn--bcher-kva.example",
    )


def test_cursors_are_checked_and_bound_to_the_account(db, clock):
    analytics = MessageAnalytics(db, b"k" * 32)
    for i in range(3):
        record(db, clock, at=MIDNIGHT + i)
    cursor = analytics.page("acct-a", limit=1).next_cursor
    assert cursor is not None
    assert len(analytics.page("acct-a", limit=5, cursor=cursor).messages) == 2
    bad = [
        cursor[:-2] + ("A" if cursor[-2] != "A" else "B") + cursor[-1],  # tampered
        cursor + "x",
        "garbage",
        MessageAnalytics(db, b"j" * 32)._cursor("acct-a", stats.Position(1, "x")),  # other key
        MessageAnalytics(db, b"k" * 32)._cursors.dumps(["1", 2], salt="acct-a"),  # wrong types
    ]
    for text in bad:
        with pytest.raises(InvalidInput) as caught:
            analytics.page("acct-a", cursor=text)
        assert list(caught.value.fields) == ["cursor"]
    with pytest.raises(InvalidInput):  # another account's cursor
        analytics.page("acct-b", cursor=cursor)
