"""Analytics over the message log, computed by the database: counts per time bucket (GROUP BY),
send latency percentiles (window functions), and the message listing (keyset pagination).

Nothing here loads messages into Python: each function runs one or two statements whose rows
are already aggregated (one row per bucket) or are one page of the listing. The same SQL runs on
SQLite (3.25+: window functions; JSON1) and PostgreSQL; where they differ (reading the JSON
lists of a row, folding letter case) the difference is in `_Dialect`, with both branches tested.

Percentiles are nearest-rank: the p-th percentile of n values is the value at rank ceil(p * n)
in ascending order (the smallest value that at least p of the values are not above); p is
taken to millionths and the rank computed with integer arithmetic, so both engines (and a
Python check) pick the same row. Every timestamp is integer milliseconds since the epoch, UTC.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from smtp_service.storage.database import Database, Row, storable
from smtp_service.storage.messages import message_summary
from smtp_service.storage.tables import messages

_SCALE = 1_000_000  # percentiles in millionths: 0.95 -> 950000
MAX_FORMS = 4  # spellings of one address a recipient filter matches (at most 3 are made)

m = messages.c


def _rank(p_millionths: int, n: Any) -> Any:
    """ceil(p * n) in integers: (P * n + SCALE - 1) // SCALE, integer division on both engines."""

    def number(value: int) -> Any:
        return sa.literal_column(str(value), sa.BigInteger)

    return (number(p_millionths) * n + number(_SCALE - 1)) // number(_SCALE)


def _millionths(percentiles: Sequence[float]) -> tuple[int, ...]:
    out = []
    for p in percentiles:
        if not 0 < p <= 1:
            raise ValueError(f"a percentile is a fraction in (0, 1], not {p!r}")
        out.append(round(p * _SCALE))
    return tuple(out)


# -- where the engines differ ---------------------------------------------------------------------


class _Dialect:
    """The few expressions SQLite and PostgreSQL spell differently."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _elements(self, column: Any) -> Any:
        """A table of one column `value`: the elements of a JSON array held as text."""
        if self.name == "postgresql":
            return sa.func.jsonb_array_elements(sa.cast(column, JSONB)).table_valued("value")
        return sa.func.json_each(column).table_valued("value")

    def _texts(self, column: Any) -> Any:
        """A table of one column `value`: the strings of a JSON array of strings."""
        if self.name == "postgresql":
            return sa.func.jsonb_array_elements_text(sa.cast(column, JSONB)).table_valued("value")
        return sa.func.json_each(column).table_valued("value")

    def _field(self, element: Any, key: str) -> Any:
        if self.name == "postgresql":
            return element.op("->>")(sa.literal_column(f"'{key}'"))
        return sa.func.json_extract(element, f"$.{key}")

    def refusals_of_type(self, kind: str) -> Any:
        """The number of the row's `rejected` entries whose type is `kind` (0 for '[]')."""
        items = self._elements(m.rejected)
        count = (
            sa.select(sa.func.count())
            .select_from(items)
            .where(self._field(items.c.value, "type") == kind)
            .scalar_subquery()
        )
        return sa.case((m.rejected == "[]", 0), else_=count)

    def ascii_lower(self, expr: Any) -> Any:
        """lower() of ASCII letters only, as SQLite's lower() is: PostgreSQL's folds every
        letter its collation knows, but not under the "C" collation."""
        if self.name == "postgresql":
            return sa.func.lower(sa.collate(expr, "C"))
        return sa.func.lower(expr)

    def has_recipient(self) -> Any:
        """True when one of the row's recipients, ASCII letters folded, is one of the bound
        forms to0..to3."""
        items = self._texts(m.recipients)
        forms = [sa.bindparam(f"to{i}", type_=sa.Text) for i in range(MAX_FORMS)]
        return sa.exists(
            sa.select(sa.literal(1))
            .select_from(items)
            .where(self.ascii_lower(items.c.value).in_(forms))
        )


# -- latency percentiles ---------------------------------------------------------------------


def _window_bounds(until: bool, transport: bool, *, sent_only: bool = True) -> list[Any]:
    where = [m.account_id == sa.bindparam("account_id"), m.created_at >= sa.bindparam("since")]
    if until:
        where.append(m.created_at < sa.bindparam("until"))
    if transport:
        where.append(m.transport == sa.bindparam("transport"))
    if sent_only:
        where.append(m.status == "sent")
    return where


@functools.lru_cache(maxsize=64)
def _percentile_statement(
    dialect: str, millionths: tuple[int, ...], until: bool, transport: bool, bucketed: bool
) -> sa.Select:
    """Nearest-rank percentiles of duration_ms over the account's sent messages: one row per
    bucket (bucket, p0, p1, ...) when `bucketed`, else one row (p0, p1, ...)."""
    bucket = (m.created_at - m.created_at % sa.bindparam("interval_ms", type_=sa.BigInteger)).label(
        "bucket"
    )
    partition = [bucket] if bucketed else []
    ranked = (
        sa.select(
            *partition,
            m.duration_ms,
            sa.func.row_number()
            .over(partition_by=partition or None, order_by=m.duration_ms)
            .label("rn"),
            sa.func.count().over(partition_by=partition or None).label("n"),
        )
        .where(*_window_bounds(until, transport))
        .subquery("ranked")
    )
    columns = [
        sa.func.min(sa.case((ranked.c.rn == _rank(p, ranked.c.n), ranked.c.duration_ms))).label(
            f"p{i}"
        )
        for i, p in enumerate(millionths)
    ]
    if bucketed:
        return sa.select(ranked.c.bucket, *columns).group_by(ranked.c.bucket)
    return sa.select(*columns)


def latency_percentiles(
    db: Database,
    account_id: str,
    *,
    since_ms: int,
    until_ms: int | None = None,
    transport: str | None = None,
    percentiles: tuple[float, ...] = (0.5, 0.95),
) -> dict[float, float | None]:
    """Send latency percentiles of the account's messages, computed by the database.

    Over the messages with status "sent" (the server took them) created in [since_ms, until_ms)
    (no upper bound when until_ms is None), through `transport` ("custom" or "global") when
    given; duration_ms is the time the send took, in milliseconds (the SMTP transaction, with
    the wait for a pooled connection). Returns {p: the nearest-rank percentile in ms} for each p
    of `percentiles` (fractions in (0, 1]), None for each when there is no such message.
    ValueError for a percentile outside (0, 1].
    """
    millionths = _millionths(percentiles)
    statement = _percentile_statement(
        db.dialect, millionths, until_ms is not None, transport is not None, False
    )
    params: dict[str, Any] = {"account_id": account_id, "since": since_ms}
    if until_ms is not None:
        params["until"] = until_ms
    if transport is not None:
        params["transport"] = transport
    (row,) = db.query(statement, params)
    return {p: _float(row[f"p{i}"]) for i, p in enumerate(percentiles)}


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


# -- counts per bucket -------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketCounts:
    """What the database counted for one bucket (or for a whole range).

    messages: every message created in it (each send attempt, whatever its outcome);
    sent / failed / bounced: those with that status; hard_bounces / soft_bounces: recipient
    refusals (entries of `rejected`, of sent and of bounced messages) of type hard / soft;
    tracked: sent messages that carried the open pixel; opened: messages with at least one
    counted open; tracked_opened: tracked sent messages with at least one; opens: counted opens
    of its messages (all, not unique); latency: {p: ms or None} over its sent messages.
    """

    messages: int = 0
    sent: int = 0
    failed: int = 0
    bounced: int = 0
    hard_bounces: int = 0
    soft_bounces: int = 0
    tracked: int = 0
    opened: int = 0
    tracked_opened: int = 0
    opens: int = 0
    latency: dict[float, float | None] | None = None


COUNT_NAMES = (
    "messages",
    "sent",
    "failed",
    "bounced",
    "hard_bounces",
    "soft_bounces",
    "tracked",
    "opened",
    "tracked_opened",
    "opens",
)


def _when(condition: Any) -> Any:
    return sa.func.sum(sa.case((condition, 1), else_=0))


@functools.lru_cache(maxsize=8)
def _counts_statement(dialect: str) -> sa.Select:
    """One row per bucket that has messages: bucket start (ms) and the counts of BucketCounts."""
    d = _Dialect(dialect)
    bucket = (m.created_at - m.created_at % sa.bindparam("interval_ms", type_=sa.BigInteger)).label(
        "bucket"
    )
    tracked = (m.status == "sent") & (m.tracking == 1)
    return (
        sa.select(
            bucket,
            sa.func.count().label("messages"),
            _when(m.status == "sent").label("sent"),
            _when(m.status == "failed").label("failed"),
            _when(m.status == "bounced").label("bounced"),
            sa.func.sum(d.refusals_of_type("hard")).label("hard_bounces"),
            sa.func.sum(d.refusals_of_type("soft")).label("soft_bounces"),
            _when(tracked).label("tracked"),
            _when(m.opens > 0).label("opened"),
            _when(tracked & (m.opens > 0)).label("tracked_opened"),
            sa.func.sum(m.opens).label("opens"),
        )
        .where(*_window_bounds(True, False, sent_only=False))
        .group_by(bucket)
    )


def bucket_counts(
    db: Database,
    account_id: str,
    *,
    since_ms: int,
    until_ms: int,
    interval_ms: int,
    percentiles: tuple[float, ...] = (0.5, 0.95, 0.99),
) -> dict[int, BucketCounts]:
    """The account's messages created in [since_ms, until_ms), counted per bucket of
    `interval_ms` aligned to the epoch (UTC: a bucket starts where created_at % interval_ms is
    0), by two statements (GROUP BY; window functions for the latency percentiles).

    Returns {bucket start ms: BucketCounts} for the buckets that hold messages only.
    ValueError for a percentile outside (0, 1] or an interval that is not positive.
    """
    if interval_ms <= 0:
        raise ValueError("interval_ms must be positive")
    millionths = _millionths(percentiles)
    params = {
        "account_id": account_id,
        "since": since_ms,
        "until": until_ms,
        "interval_ms": interval_ms,
    }
    counts = db.query(_counts_statement(db.dialect), params)
    latencies = {
        row.bucket: row
        for row in db.query(
            _percentile_statement(db.dialect, millionths, True, False, True), params
        )
    }
    out = {}
    for row in counts:
        found = latencies.get(row.bucket)
        out[int(row.bucket)] = BucketCounts(
            **{name: int(row[name] or 0) for name in COUNT_NAMES},
            latency={
                p: None if found is None else _float(found[f"p{i}"])
                for i, p in enumerate(percentiles)
            },
        )
    return out


# -- the listing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    """Where a page ends: the last message listed (newest first: created_at, then message_id,
    both descending)."""

    created_at: int
    message_id: str


@functools.lru_cache(maxsize=64)
def _list_statement(
    dialect: str, status: bool, sender: bool, recipient: bool, after: bool
) -> sa.Select:
    d = _Dialect(dialect)
    where = [m.account_id == sa.bindparam("account_id")]
    if status:
        where.append(m.status == sa.bindparam("status"))
    if sender:
        where.append(d.ascii_lower(m.from_addr) == sa.bindparam("sender", type_=sa.Text))
    if recipient:
        where.append(d.has_recipient())
    if after:
        where.append(
            sa.tuple_(m.created_at, m.message_id)
            < sa.tuple_(
                sa.bindparam("after_at", type_=sa.BigInteger),
                sa.bindparam("after_id", type_=sa.Text),
            )
        )
    return (
        sa.select(
            m.message_id,
            m.status,
            m.from_addr,
            m.recipients,
            m.subject,
            m.transport,
            m.accepted,
            m.rejected,
            m.smtp_reply,
            m.duration_ms,
            m.created_at,
            m.opens,
            m.first_opened_at,
        )
        .where(*where)
        .order_by(m.created_at.desc(), m.message_id.desc())
        .limit(sa.bindparam("limit", type_=sa.Integer))
    )


def list_messages(
    db: Database,
    account_id: str,
    *,
    limit: int,
    status: str | None = None,
    sender: str | None = None,
    recipient_forms: Sequence[str] = (),
    after: Position | None = None,
) -> tuple[list[dict[str, Any]], Position | None]:
    """One page of the account's messages, newest first (created_at, then message_id, both
    descending), after `after` (the previous page's end) when given.

    Filters: `status` exactly; `sender`, the from address, and `recipient_forms` (at most
    MAX_FORMS spellings, already ASCII-lower-cased), one of the recipients, each compared with
    ASCII letters folded to lower case and other characters as they are. Returns the page (each
    item the shape of MessageLog.get without events) and the position to pass as `after` for
    the next page, or None when this page is the last. ValueError for a limit below 1 or more
    than MAX_FORMS recipient forms.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if len(recipient_forms) > MAX_FORMS:
        raise ValueError(f"at most {MAX_FORMS} recipient forms")
    texts = [t for t in (status, sender, *recipient_forms) if t is not None]
    if after is not None:
        texts.append(after.message_id)
    if not all(storable(t) for t in texts):
        return [], None  # no row holds such text (PostgreSQL could not even compare it)
    params: dict[str, Any] = {"account_id": account_id, "limit": limit + 1}
    if status is not None:
        params["status"] = status
    if sender is not None:
        params["sender"] = sender
    forms = list(recipient_forms)
    for i in range(MAX_FORMS if forms else 0):
        params[f"to{i}"] = forms[i % len(forms)]
    if after is not None:
        params["after_at"] = after.created_at
        params["after_id"] = after.message_id
    statement = _list_statement(
        db.dialect, status is not None, sender is not None, bool(forms), after is not None
    )
    rows: list[Row] = db.query(statement, params)
    more = len(rows) > limit
    rows = rows[:limit]
    page = [message_summary(row.message_id, row) for row in rows]
    end = Position(int(rows[-1].created_at), rows[-1].message_id) if more else None
    return page, end
