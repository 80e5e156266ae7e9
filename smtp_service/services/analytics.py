"""Analytics of an account's messages: counts, open rate and send latency per interval, and the
listing of its messages with cursor pagination. The database computes (storage/stats.py); this
module resolves the range, shapes typed results and signs the cursors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import idna
from itsdangerous import BadData, URLSafeSerializer

from smtp_service.services.errors import InvalidInput
from smtp_service.storage import stats
from smtp_service.storage.database import Database
from smtp_service.storage.messages import STATUSES, iso_ms

__all__ = [
    "DEFAULT_LIMIT",
    "INTERVALS",
    "MAX_BUCKETS",
    "MAX_LIMIT",
    "STATUSES",
    "MessageAnalytics",
    "MessagePage",
    "MessageStats",
    "Period",
]

INTERVALS: dict[str, int] = {"hour": 3_600_000, "day": 86_400_000}
MAX_BUCKETS = 1000
DEFAULT_RANGE_MS = 7 * 86_400_000
PERCENTILES: tuple[float, ...] = (0.5, 0.95, 0.99)
DEFAULT_LIMIT = 50
MAX_LIMIT = 200

_LATEST_MS = 253_402_214_400_000  # 9999-12-31T00:00:00Z
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """`text` with ASCII letters in lower case and every other character as it is (what SQLite's
    lower() does, and PostgreSQL's under the C collation)."""
    return text.translate(_ASCII_LOWER)


@dataclass(frozen=True)
class Period:
    """The counts of one interval (or of the whole range): see README "Analytics".

    messages: send attempts recorded; sent/failed/bounced: by status; hard_bounces and
    soft_bounces: refused recipients (per recipient, not per message); tracked: sent messages
    with the open pixel; opened: messages with at least one counted open; opens: every counted
    open; open_rate: tracked sent messages opened / tracked sent messages (None when none was
    tracked); latency_ms: {"p50", "p95", "p99"} of sent messages' duration (None: no message).
    """

    start: str
    end: str
    messages: int
    sent: int
    failed: int
    bounced: int
    hard_bounces: int
    soft_bounces: int
    tracked: int
    opened: int
    opens: int
    open_rate: float | None
    latency_ms: dict[str, float | None]


@dataclass(frozen=True)
class MessageStats:
    """The stats of a range: its bounds (ISO 8601 UTC, `end` exclusive), the interval, the
    total and every interval of the range in order, empty ones included (zeros)."""

    start: str
    end: str
    interval: str
    total: Period
    intervals: list[Period]


@dataclass(frozen=True)
class MessagePage:
    """One page of the listing: the messages (the message record's shape without events),
    newest first, and the cursor of the next page (None: this is the last)."""

    messages: list[dict[str, Any]]
    next_cursor: str | None


def _ms(moment: datetime) -> int:
    """Integer milliseconds since the epoch of an aware datetime (naive: taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def resolve_range(
    start: datetime | None, end: datetime | None, interval: str, now_ms: int
) -> tuple[int, int, int]:
    """(since_ms, until_ms, interval_ms) of a stats request: `end` defaults to now and `start`
    to DEFAULT_RANGE_MS before `end`; both are widened to whole intervals aligned to UTC
    (`start` down to the start of its interval, `end` up to the end of its own unless it is
    one already); the default start is never before 1970. InvalidInput naming the field: an
    unknown interval, a start before 1970-01-01, a start or end from 9999-12-31 on, an end not
    after the start, more than MAX_BUCKETS intervals.
    """
    if interval not in INTERVALS:
        raise InvalidInput.field("interval", f"Must be one of: {', '.join(INTERVALS)}.")
    step = INTERVALS[interval]
    until = now_ms if end is None else _ms(end)
    since = max(0, until - DEFAULT_RANGE_MS) if start is None else _ms(start)
    if since < 0:
        raise InvalidInput.field("from", "Must not be before 1970-01-01T00:00:00Z.")
    for field, value in (("from", since), ("to", until)):
        if value >= _LATEST_MS:  # rounded up, it must still be a year datetime can hold
            raise InvalidInput.field(field, "Must be before 9999-12-31T00:00:00Z.")
    if until <= since:
        raise InvalidInput.field("to", "Must be after from.")
    since -= since % step
    until += -until % step
    buckets = (until - since) // step
    if buckets > MAX_BUCKETS:
        raise InvalidInput.field(
            "to",
            f"The range holds {buckets} intervals of one {interval}; at most {MAX_BUCKETS}: "
            "narrow it or use a longer interval.",
        )
    return since, until, step


def recipient_forms(address: str) -> tuple[str, ...]:
    """The spellings of an address that the recipient filter matches, ASCII-lower-cased: as
    given, with its domain in IDNA (punycode) form and in Unicode form."""
    forms = {ascii_lower(address)}
    local, at, domain = address.rpartition("@")
    if at and domain:
        for convert in (idna.encode, idna.decode):
            try:
                spelled = convert(domain, uts46=True)
            except (idna.IDNAError, UnicodeError, ValueError):
                continue
            text = spelled.decode("ascii") if isinstance(spelled, bytes) else spelled
            forms.add(ascii_lower(f"{local}@{text}"))
    return tuple(sorted(forms))[: stats.MAX_FORMS]


class MessageAnalytics:
    """Stats and listing of one account's messages; every call is scoped to one account_id."""

    def __init__(
        self, db: Database, cursor_secret: bytes, clock: Callable[[], int] | None = None
    ) -> None:
        """`cursor_secret` signs the listing's cursors; `clock` gives now in ms (the database's)."""
        self.db = db
        self._cursors = URLSafeSerializer(cursor_secret, salt="smtp-service message cursor")
        self._now_ms = clock or db.now_ms

    def stats(
        self,
        account_id: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        interval: str = "day",
    ) -> MessageStats:
        """The account's message stats over [start, end) per `interval` ("hour" or "day"),
        the range resolved and checked by resolve_range (InvalidInput for a bad one)."""
        since, until, step = resolve_range(start, end, interval, self._now_ms())
        counted = stats.bucket_counts(
            self.db,
            account_id,
            since_ms=since,
            until_ms=until,
            interval_ms=step,
            percentiles=PERCENTILES,
        )
        empty = stats.BucketCounts()
        periods = [
            _period(at, at + step, counted.get(at, empty)) for at in range(since, until, step)
        ]
        # The counts add up; percentiles do not, so the whole range's are the database's too.
        total = stats.BucketCounts(
            **{name: sum(getattr(c, name) for c in counted.values()) for name in stats.COUNT_NAMES},
            latency=stats.latency_percentiles(
                self.db, account_id, since_ms=since, until_ms=until, percentiles=PERCENTILES
            ),
        )
        return MessageStats(
            start=iso_ms(since),
            end=iso_ms(until),
            interval=interval,
            total=_period(since, until, total),
            intervals=periods,
        )

    def page(
        self,
        account_id: str,
        *,
        status: str | None = None,
        to: str | None = None,
        sender: str | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> MessagePage:
        """A page of the account's messages, newest first, filtered by `status` (sent, failed,
        bounced), `to` (one of the recipients) and `sender` (the from address); addresses
        match ignoring the case of ASCII letters, the domain in IDNA or Unicode form for `to`.
        `cursor` is a page's next_cursor (from the same account). InvalidInput for a bad
        status, a limit outside 1..MAX_LIMIT, or a cursor this service did not give this
        account."""
        if status is not None and status not in STATUSES:
            raise InvalidInput.field("status", f"Must be one of: {', '.join(sorted(STATUSES))}.")
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidInput.field("limit", f"Must be between 1 and {MAX_LIMIT}.")
        after = None if cursor is None else self._position(account_id, cursor)
        page, end = stats.list_messages(
            self.db,
            account_id,
            limit=limit,
            status=status,
            sender=None if sender is None else ascii_lower(sender),
            recipient_forms=() if to is None else recipient_forms(to),
            after=after,
        )
        return MessagePage(page, None if end is None else self._cursor(account_id, end))

    def _cursor(self, account_id: str, end: stats.Position) -> str:
        return self._cursors.dumps([end.created_at, end.message_id], salt=account_id)

    def _position(self, account_id: str, cursor: str) -> stats.Position:
        try:
            value = self._cursors.loads(cursor, salt=account_id)
        except (BadData, UnicodeError, ValueError):
            value = None
        if (
            isinstance(value, list)
            and len(value) == 2
            and type(value[0]) is int
            and isinstance(value[1], str)
        ):
            return stats.Position(value[0], value[1])
        raise InvalidInput.field("cursor", "Not a valid cursor: pass a nextCursor as given.")


def _period(since: int, until: int, counts: stats.BucketCounts) -> Period:
    latency = counts.latency or {}
    return Period(
        start=iso_ms(since),
        end=iso_ms(until),
        messages=counts.messages,
        sent=counts.sent,
        failed=counts.failed,
        bounced=counts.bounced,
        hard_bounces=counts.hard_bounces,
        soft_bounces=counts.soft_bounces,
        tracked=counts.tracked,
        opened=counts.opened,
        opens=counts.opens,
        open_rate=counts.tracked_opened / counts.tracked if counts.tracked else None,
        latency_ms={f"p{round(p * 100)}": latency.get(p) for p in PERCENTILES},
    )
