"""The suppression list: addresses an account will not send to, with why."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from smtp_service.storage.database import Database, storable
from smtp_service.storage.messages import iso_ms
from smtp_service.storage.tables import soft_bounces, suppressions

_IN_CHUNK = 500  # bound parameters per statement, below SQLite's limit on every version


_DAY_MS = 86_400_000
# Rows created before :since have expired (since = 0 when suppressions never expire).
_ACTIVE = suppressions.c.created_at >= sa.bindparam("since")
_LIST = (
    sa.select(suppressions)
    .where(suppressions.c.account_id == sa.bindparam("account_id"), _ACTIVE)
    .order_by(suppressions.c.created_at.desc(), suppressions.c.email)
)
_DELETE = suppressions.delete().where(
    suppressions.c.account_id == sa.bindparam("account_id"),
    suppressions.c.email == sa.bindparam("email"),
    _ACTIVE,
)
_BOUNCES = (soft_bounces.c.account_id == sa.bindparam("account_id")) & (
    soft_bounces.c.email == sa.bindparam("email")
)
_FORGET_BOUNCES = soft_bounces.delete().where(_BOUNCES, soft_bounces.c.at < sa.bindparam("since"))
_COUNT_BOUNCES = sa.select(sa.func.count()).select_from(soft_bounces).where(_BOUNCES)
_ADD_BOUNCE = soft_bounces.insert()


@functools.lru_cache(maxsize=64)
def _select_some(count: int) -> sa.Select:
    """SELECT of `count` addresses, one bound parameter each (e0, e1, ...): built and compiled
    once per count, which costs far less per call than an expanding IN."""
    return sa.select(suppressions.c.email).where(
        suppressions.c.account_id == sa.bindparam("account_id"),
        suppressions.c.email.in_([sa.bindparam(f"e{i}") for i in range(count)]),
        _ACTIVE,
    )


def _upsert(dialect: str) -> Any:
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(suppressions)
    return insert.on_conflict_do_update(
        index_elements=[suppressions.c.account_id, suppressions.c.email],
        set_={
            name: insert.excluded[name]
            for name in ("reason", "code", "enhanced_code", "message_id", "created_at", "reply")
        },
    )


class SuppressionList:
    """Per-account suppressed addresses, stored lower-cased; every query scoped to one account.

    A suppression lasts `days` (0: until removed), as Postal keeps them 30 days: a mailbox that
    did not exist may exist later. `soft_limit` address-level temporary refusals (mailbox full)
    within `soft_days` suppress the address too (0: never), listmonk's bounce-actions model.
    """

    def __init__(
        self, db: Database, *, days: float = 0, soft_limit: int = 0, soft_days: float = 7
    ) -> None:
        self.db = db
        self.days = days
        self.soft_limit = soft_limit
        self.soft_days = soft_days
        self._upsert = _upsert(db.dialect)

    def _since(self) -> int:
        """Creation times before this (ms) have expired."""
        return self.db.now_ms() - int(self.days * _DAY_MS) if self.days else 0

    def suppress(
        self,
        account_id: str,
        email: str,
        *,
        reason: str,
        code: int | None,
        enhanced_code: str | None,
        message_id: str | None,
        reply: str | None = None,
    ) -> None:
        """Stop sending to an address; a repeat replaces the details and the date."""
        with self.db.write() as conn:
            conn.execute(
                self._upsert,
                {
                    "account_id": account_id,
                    "email": email.lower(),
                    "reason": reason,
                    "code": code,
                    "enhanced_code": enhanced_code,
                    "message_id": message_id,
                    "created_at": self.db.now_ms(),
                    "reply": reply,
                },
            )

    def soft_bounce(
        self,
        account_id: str,
        email: str,
        *,
        code: int | None,
        enhanced_code: str | None,
        message_id: str | None,
        reply: str | None = None,
    ) -> bool:
        """Count an address-level temporary refusal; True when it made `soft_limit` within
        `soft_days` and the address is now suppressed (reason "soft bounces")."""
        if not self.soft_limit or not storable(email):
            return False
        now = self.db.now_ms()
        mine = {"account_id": account_id, "email": email.lower()}
        with self.db.write() as conn:
            since = now - int(self.soft_days * _DAY_MS)
            conn.execute(_FORGET_BOUNCES, {**mine, "since": since})
            conn.execute(_ADD_BOUNCE, {**mine, "at": now})
            if conn.execute(_COUNT_BOUNCES, mine).fetchone()[0] < self.soft_limit:
                return False
            conn.execute(_FORGET_BOUNCES, {**mine, "since": now + 1})
            conn.execute(
                self._upsert,
                {
                    **mine,
                    "reason": "soft bounces",
                    "code": code,
                    "enhanced_code": enhanced_code,
                    "message_id": message_id,
                    "created_at": now,
                    "reply": reply,
                },
            )
        return True

    def list(self, account_id: str) -> list[dict[str, Any]]:
        """The account's suppressed addresses, newest first (the API's suppression shape)."""
        rows = self.db.query(_LIST, {"account_id": account_id, "since": self._since()})
        ttl = int(self.days * _DAY_MS)
        return [
            {
                "email": r.email,
                "reason": r.reason,
                "code": r.code,
                "enhancedCode": r.enhanced_code,
                "reply": r.reply,
                "messageId": r.message_id,
                "createdAt": iso_ms(r.created_at),
                "expiresAt": iso_ms(r.created_at + ttl) if ttl else None,
            }
            for r in rows
        ]

    def suppressed(self, account_id: str, emails: list[str]) -> list[str]:
        """Those of the addresses the account has suppressed, spelled and ordered as given."""
        wanted = sorted({e.lower() for e in emails if storable(e)})
        chunks = [wanted[i : i + _IN_CHUNK] for i in range(0, len(wanted), _IN_CHUNK)]
        found: set[str] = set()
        since = self._since()
        for chunk in chunks:  # each chunk one statement, a snapshot by itself
            params = {f"e{i}": email for i, email in enumerate(chunk)}
            params["account_id"] = account_id
            params["since"] = since
            found.update(r.email for r in self.db.query(_select_some(len(chunk)), params))
        return [e for e in emails if e.lower() in found]

    def unsuppress(self, account_id: str, email: str, aliases: Iterable[str] = ()) -> bool:
        """Allow the address again, and the other spellings of it in `aliases` (an IDN address
        as written and in punycode); True when any was suppressed."""
        spellings = sorted({e.lower() for e in (email, *aliases) if storable(e)})
        if not spellings:
            return False
        since = self._since()
        with self.db.write() as conn:  # a few spellings of one address: one statement each
            removed = [
                conn.execute(
                    _DELETE, {"account_id": account_id, "email": email, "since": since}
                ).rowcount
                for email in spellings
            ]
        return any(removed)
