"""SMTP health per account and transport, and the circuit breaker's state, in the message
database: shared by every worker and instance that uses it.

A row is written on a failure, on a circuit transition (open, probe claimed, closed) and by a
connection test; a successful send writes nothing here: its row in `messages` (transport,
status, created_at) is the success, and the readers below take the last success from there.
So "consecutive failures" is kept by the failure write itself: a failure after a success
(a `sent` or `bounced` message through the transport, or a passed test, later than the last
failure) starts the count again at 1.

Circuit states (Martin Fowler's CircuitBreaker; Nygard, "Release It!"): `closed` (the server is
used), `open` until `open_until` (skipped), then `half_open` for the one request that claimed
the probe (an UPDATE whose WHERE only one writer can satisfy) until `probe_until`; its success
closes the circuit, its failure opens it again.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from smtp_service.storage.database import Database, Transaction
from smtp_service.storage.tables import messages, smtp_health

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATES = (CLOSED, OPEN, HALF_OPEN)
# The server answered (took or refused the message): it is up. Two comparisons, not IN: an
# IN of literals is expanded per execution, which Database's compiled-once SQL does not do.
_ANSWERED = (messages.c.status == "sent") | (messages.c.status == "bounced")
MAX_REASON = 500  # characters of a failure's reason kept

_KEY = (smtp_health.c.account_id == sa.bindparam("b_account_id")) & (
    smtp_health.c.transport == sa.bindparam("b_transport")
)
_SELECT = sa.select(smtp_health).where(_KEY)
_SELECT_LOCKED = _SELECT.with_for_update()  # PostgreSQL row lock; SQLite holds the write lock
_SELECT_ACCOUNT = (
    sa.select(smtp_health)
    .where(smtp_health.c.account_id == sa.bindparam("b_account_id"))
    .order_by(smtp_health.c.transport)
)
_SELECT_CIRCUITS = sa.select(
    smtp_health.c.account_id,
    smtp_health.c.transport,
    smtp_health.c.state,
    smtp_health.c.failures,
    smtp_health.c.open_until,
).order_by(smtp_health.c.account_id, smtp_health.c.transport)
_ANSWERED_SINCE = sa.select(
    sa.exists().where(
        messages.c.account_id == sa.bindparam("account_id"),
        messages.c.transport == sa.bindparam("transport"),
        messages.c.created_at > sa.bindparam("since"),
        _ANSWERED,
    )
)
_LAST_ANSWERED = sa.select(sa.func.max(messages.c.created_at)).where(
    messages.c.account_id == sa.bindparam("account_id"),
    messages.c.transport == sa.bindparam("transport"),
    _ANSWERED,
)
_UPDATE = smtp_health.update().where(_KEY)
# Bind names differ from the columns': an UPDATE reserves those.
_FAILED = _UPDATE.values(
    server=sa.bindparam("v_server"),
    state=sa.bindparam("v_state"),
    failures=sa.bindparam("v_failures"),
    open_until=sa.bindparam("v_open_until"),
    probe_until=sa.bindparam("v_probe_until"),
    last_failure_at=sa.bindparam("now"),
    last_failure_kind=sa.bindparam("v_kind"),
    last_failure_reason=sa.bindparam("v_reason"),
    updated_at=sa.bindparam("now"),
)
_PASSED = _UPDATE.values(
    server=sa.bindparam("v_server"),
    state=CLOSED,
    failures=0,
    open_until=None,
    probe_until=None,
    last_success_at=sa.bindparam("now"),
    updated_at=sa.bindparam("now"),
)
# One writer gets the probe: the row must still be open past its time (or hold a probe claim
# that lapsed) when the UPDATE runs; PostgreSQL re-checks the WHERE on the locked row.
_CLAIM = (
    smtp_health.update()
    .where(
        _KEY,
        (
            (smtp_health.c.state == OPEN) & (smtp_health.c.open_until <= sa.bindparam("now"))
        )
        | (
            (smtp_health.c.state == HALF_OPEN)
            & (smtp_health.c.probe_until <= sa.bindparam("now"))
        ),
    )
    .values(
        state=HALF_OPEN,
        probe_until=sa.bindparam("v_probe_until"),
        updated_at=sa.bindparam("now"),
    )
)
_RELEASE = (
    smtp_health.update()
    .where(_KEY, smtp_health.c.state == HALF_OPEN)
    .values(state=OPEN, open_until=sa.bindparam("now"), probe_until=None)
)
_CLOSE = (
    smtp_health.update()
    .where(_KEY, smtp_health.c.state != CLOSED)
    .values(
        state=CLOSED,
        failures=0,
        open_until=None,
        probe_until=None,
        updated_at=sa.bindparam("now"),
    )
)
_FORGET = smtp_health.delete().where(
    smtp_health.c.account_id == sa.bindparam("b_account_id"),
    smtp_health.c.transport == sa.bindparam("b_transport"),
)


def _insert_new(dialect: str) -> sa.Insert:
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(smtp_health)
    return insert.on_conflict_do_nothing(
        index_elements=[smtp_health.c.account_id, smtp_health.c.transport]
    )


@dataclass(frozen=True)
class Circuit:
    """A transport's breaker as stored: `state` (closed, open, half_open), consecutive
    `failures`, and the epoch-millisecond times `open_until` and `probe_until` (or None)."""

    state: str
    failures: int
    open_until: int | None
    probe_until: int | None


@dataclass(frozen=True)
class Health:
    """One transport's health for one account (epoch milliseconds; None: never)."""

    transport: str
    server: str | None
    state: str
    failures: int  # consecutive, 0 after a success
    open_until: int | None
    last_success_at: int | None
    last_failure_at: int | None
    last_failure_kind: str | None
    last_failure_reason: str | None


class HealthStore:
    """Health rows per (account, transport); every query is scoped to one account except
    `circuits()`, which lists every stored breaker (for metrics)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._insert_new = _insert_new(db.dialect)

    # -- the breaker -------------------------------------------------------------------------

    def circuit(self, account_id: str, transport: str) -> Circuit | None:
        """The stored breaker of one transport, None when nothing was ever recorded."""
        rows = self.db.query(_SELECT, {"b_account_id": account_id, "b_transport": transport})
        if not rows:
            return None
        r = rows[0]
        return Circuit(r.state, r.failures, r.open_until, r.probe_until)

    def record_failure(
        self,
        account_id: str,
        transport: str,
        *,
        server: str,
        kind: str,
        reason: str,
        threshold: int | None,
        open_ms: int,
    ) -> Circuit:
        """Count a transport failure (`kind` as TransportError's; `reason` a text without
        secrets, cut to MAX_REASON characters) and return the breaker as it now is.

        The count starts again at 1 when the transport answered since the last failure. With
        a `threshold` (None: this transport has no breaker), reaching it opens a closed
        circuit for `open_ms` milliseconds; a failure while half-open (the probe failed)
        opens it again. One transaction: concurrent failures each count once."""
        now = self.db.now_ms()
        key = {"b_account_id": account_id, "b_transport": transport}
        with self.db.write() as tx:
            self._ensure_row(tx, account_id, transport, now)
            row = tx.rows(_SELECT_LOCKED, key)[0]
            failures = row.failures
            last = row.last_failure_at
            if last is not None and (
                (row.last_success_at or 0) > last or self._answered_since(tx, key, last)
            ):
                failures = 0
            failures += 1
            state, open_until, probe_until = row.state, row.open_until, row.probe_until
            if threshold is not None and (
                state == HALF_OPEN or (state == CLOSED and failures >= threshold)
            ):
                state, open_until, probe_until = OPEN, now + open_ms, None
            tx.execute(
                _FAILED,
                {
                    **key,
                    "v_server": server,
                    "v_state": state,
                    "v_failures": failures,
                    "v_open_until": open_until,
                    "v_probe_until": probe_until,
                    "now": now,
                    "v_kind": kind,
                    "v_reason": reason[:MAX_REASON],
                },
            )
        return Circuit(state, failures, open_until, probe_until)

    def _answered_since(self, tx: Transaction, key: dict[str, str], since: int) -> bool:
        params = {"account_id": key["b_account_id"], "transport": key["b_transport"]}
        row = tx.rows(_ANSWERED_SINCE, {**params, "since": since})[0]
        return bool(next(iter(row.values())))

    def claim_probe(self, account_id: str, transport: str, *, hold_ms: int) -> bool:
        """Make this request the one that tries an open circuit's server (half-open), when
        the circuit's time is up and no other request holds a live claim; the claim lapses
        after `hold_ms` (a probe that never reports back). True for exactly one caller."""
        now = self.db.now_ms()
        with self.db.write() as tx:
            claimed = tx.execute(
                _CLAIM,
                {
                    "b_account_id": account_id,
                    "b_transport": transport,
                    "now": now,
                    "v_probe_until": now + hold_ms,
                },
            ).rowcount
        return claimed == 1

    def release_probe(self, account_id: str, transport: str) -> None:
        """Give a probe claim back without a verdict (the request ended before the server
        answered): the circuit is open and due, so the next request probes."""
        with self.db.write() as tx:
            tx.execute(
                _RELEASE,
                {"b_account_id": account_id, "b_transport": transport, "now": self.db.now_ms()},
            )

    def close(self, account_id: str, transport: str) -> bool:
        """The transport answered after failures: close its circuit and clear the count.
        True when a row changed (it was open or half-open)."""
        with self.db.write() as tx:
            changed = tx.execute(
                _CLOSE,
                {"b_account_id": account_id, "b_transport": transport, "now": self.db.now_ms()},
            ).rowcount
        return changed == 1

    def record_success(self, account_id: str, transport: str, *, server: str) -> None:
        """A passed connection test (or any success worth a write): last success now, the
        count cleared, the circuit closed."""
        now = self.db.now_ms()
        key = {"b_account_id": account_id, "b_transport": transport}
        with self.db.write() as tx:
            self._ensure_row(tx, account_id, transport, now)
            tx.execute(_PASSED, {**key, "v_server": server, "now": now})

    def _ensure_row(self, tx: Transaction, account_id: str, transport: str, now: int) -> None:
        """A closed row with no history for the key, unless there is one (ON CONFLICT DO
        NOTHING: concurrent writers both go on to update the one row)."""
        row = {"account_id": account_id, "transport": transport, "updated_at": now}
        tx.execute(self._insert_new, row)

    def forget(self, account_id: str, transport: str) -> None:
        """Drop what was recorded (the account's settings changed: a new server starts
        closed, with no history)."""
        with self.db.write() as tx:
            tx.execute(_FORGET, {"b_account_id": account_id, "b_transport": transport})

    # -- reading -----------------------------------------------------------------------------

    def health(self, account_id: str, transport: str) -> Health:
        """One transport's health: the stored row and the last answered send of `messages`
        (the later of it and the row's last success). A failure older than that success no
        longer counts: `failures` reads 0 then, as the next failure will start again at 1."""
        rows = self.db.query(_SELECT, {"b_account_id": account_id, "b_transport": transport})
        answered = self.db.query(
            _LAST_ANSWERED, {"account_id": account_id, "transport": transport}
        )[0]
        sent_at = next(iter(answered.values()))
        if not rows:
            return Health(transport, None, CLOSED, 0, None, sent_at, None, None, None)
        r = rows[0]
        success = max(x for x in (sent_at, r.last_success_at, -1) if x is not None)
        success_at = None if success < 0 else success
        failures = r.failures
        if r.last_failure_at is not None and success_at is not None:
            if success_at > r.last_failure_at:
                failures = 0
        return Health(
            transport,
            r.server,
            r.state,
            failures,
            r.open_until,
            success_at,
            r.last_failure_at,
            r.last_failure_kind,
            r.last_failure_reason,
        )

    def circuits(self) -> list[tuple[str, str, str, int, int | None]]:
        """Every stored breaker: (account_id, transport, state, failures, open_until), for a
        metrics exporter (a gauge per state). Accounts with no row are closed."""
        return [
            (r.account_id, r.transport, r.state, r.failures, r.open_until)
            for r in self.db.query(_SELECT_CIRCUITS)
        ]
