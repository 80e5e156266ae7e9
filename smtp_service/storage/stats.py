"""Figures computed by the message database over an account's messages (not by loading rows)."""

from __future__ import annotations

import math

import sqlalchemy as sa

from smtp_service.storage.database import Database
from smtp_service.storage.tables import messages


def _window(transport: bool, until: bool) -> list[sa.ColumnElement[bool]]:
    where = [
        messages.c.account_id == sa.bindparam("account_id"),
        messages.c.status == "sent",
        messages.c.created_at >= sa.bindparam("since"),
    ]
    if transport:
        where.append(messages.c.transport == sa.bindparam("transport"))
    if until:
        where.append(messages.c.created_at < sa.bindparam("until"))
    return where


# Built once per shape (transport given or not, an end or not): Database compiles each once.
_COUNT = {
    (t, u): sa.select(sa.func.count()).select_from(messages).where(*_window(t, u))
    for t in (False, True)
    for u in (False, True)
}
_NTH = {
    (t, u): sa.select(messages.c.duration_ms)
    .where(*_window(t, u))
    .order_by(messages.c.duration_ms)
    .limit(1)
    .offset(sa.bindparam("offset", type_=sa.Integer))
    for t in (False, True)
    for u in (False, True)
}


def latency_percentiles(
    db: Database,
    account_id: str,
    *,
    since_ms: int,
    until_ms: int | None = None,
    transport: str | None = None,
    percentiles: tuple[float, ...] = (0.5, 0.95),
) -> dict[float, float | None]:
    """Send latency percentiles of the account's sent messages (status "sent") created in
    [since_ms, until_ms) (epoch milliseconds; no end: up to now), through `transport`
    ("custom", "global"; None: both).

    Returns {p: milliseconds} for each p in `percentiles` (fractions in (0, 1]), None for every
    p when no message matches. Nearest rank: the smallest duration with at least p of the
    durations at or below it. The database counts and then picks each rank with ORDER BY
    duration_ms LIMIT 1 OFFSET rank-1 (the same SQL on SQLite and PostgreSQL); no row is loaded
    into Python but the ones answered. ValueError for a p outside (0, 1].
    """
    for p in percentiles:
        if not 0 < p <= 1:
            raise ValueError(f"a percentile is a fraction in (0, 1], not {p}")
    shape = (transport is not None, until_ms is not None)
    params: dict[str, object] = {"account_id": account_id, "since": since_ms}
    if transport is not None:
        params["transport"] = transport
    if until_ms is not None:
        params["until"] = until_ms
    count = _count(db, shape, params)
    if count == 0:
        return {p: None for p in percentiles}
    out: dict[float, float | None] = {}
    for p in percentiles:
        rank = max(1, math.ceil(p * count - 1e-9))  # 1-based; the epsilon absorbs 0.95 * 20
        rows = db.query(_NTH[shape], {**params, "offset": rank - 1})
        out[p] = float(next(iter(rows[0].values()))) if rows else None
    return out


def _count(db: Database, shape: tuple[bool, bool], params: dict[str, object]) -> int:
    row = db.query(_COUNT[shape], params)[0]
    return int(next(iter(row.values())))
