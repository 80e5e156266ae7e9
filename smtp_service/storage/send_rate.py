"""Send counters per account, rate and fixed window, shared by every worker and instance.

One row per (account, rate, window start) holds how many sends took a slot in that window. A
slot is taken with one statement, `INSERT ... ON CONFLICT DO UPDATE SET used = used + 1 WHERE
used < :limit RETURNING used`, which both engines run atomically: PostgreSQL locks the row and
re-checks the WHERE on its newest version (READ COMMITTED), SQLite runs one writer at a time
(the write gate). A full window returns no row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from smtp_service.storage.database import Database
from smtp_service.storage.tables import send_rate

_KEY = (
    (send_rate.c.account_id == sa.bindparam("b_account"))
    & (send_rate.c.rate == sa.bindparam("b_rate"))
    & (send_rate.c.window_start == sa.bindparam("b_start"))
)
# Windows of one rate that ended: one row per account and rate stays.
_PRUNE = send_rate.delete().where(
    send_rate.c.account_id == sa.bindparam("b_account"),
    send_rate.c.rate == sa.bindparam("b_rate"),
    send_rate.c.window_start < sa.bindparam("b_start"),
)
_GIVE_BACK = (
    send_rate.update().where(_KEY, send_rate.c.used > 0).values(used=send_rate.c.used - 1)
)


@dataclass(frozen=True)
class Window:
    """One fixed window: `rate` names its length ("60": a minute's window), `start` is its
    first second (seconds since the epoch), `limit` the sends it allows."""

    rate: str
    start: int
    limit: int


class _Full(Exception):
    def __init__(self, window: Window) -> None:
        super().__init__(window.rate)
        self.window = window


class SendCounters:
    """Slots taken per account in fixed windows, in the message database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        insert = (postgresql.insert if db.dialect == "postgresql" else sqlite.insert)(send_rate)
        self._take = (
            insert.values(
                account_id=sa.bindparam("b_account"),
                rate=sa.bindparam("b_rate"),
                window_start=sa.bindparam("b_start"),
                used=1,
            )
            .on_conflict_do_update(
                index_elements=[send_rate.c.account_id, send_rate.c.rate, send_rate.c.window_start],
                set_={"used": send_rate.c.used + 1},
                where=send_rate.c.used < sa.bindparam("b_limit"),
            )
            .returning(send_rate.c.used)
        )

    def take(self, account_id: str, windows: Sequence[Window]) -> Window | None:
        """Take one slot in every window, all or none, in one transaction.

        Returns None when every window had room (each now counts one more), else the first
        full window (in the order given; nothing was counted). Windows are taken in the order
        given: callers give them in one fixed order (by rate), so that two transactions never
        wait for each other's rows in opposite orders (no deadlock on PostgreSQL). Must not be
        called inside another write transaction (a full window rolls the whole one back).
        """
        try:
            with self.db.write() as conn:
                for w in windows:
                    params = {
                        "b_account": account_id,
                        "b_rate": w.rate,
                        "b_start": w.start,
                        "b_limit": w.limit,
                    }
                    row = conn.execute(self._take, params).fetchone()
                    if row is None:
                        raise _Full(w)
                    if row[0] == 1:  # the window's first send: forget the rate's ended windows
                        conn.execute(_PRUNE, params)
        except _Full as full:
            return full.window
        return None

    def give_back(self, account_id: str, windows: Sequence[Window]) -> None:
        """Free one slot taken in each window (a send that reached no server). A window that
        was pruned meanwhile has nothing to give back."""
        with self.db.write() as conn:
            for w in windows:
                params = {"b_account": account_id, "b_rate": w.rate, "b_start": w.start}
                conn.execute(_GIVE_BACK, params)

    def used(self, account_id: str, rate: str, start: int) -> int:
        """Slots taken in one window (0 when it has no row): for tests and operators."""
        rows = self.db.query(
            sa.select(send_rate.c.used).where(
                send_rate.c.account_id == account_id,
                send_rate.c.rate == rate,
                send_rate.c.window_start == start,
            )
        )
        return rows[0].used if rows else 0
