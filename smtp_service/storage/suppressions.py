"""The suppression list: addresses an account will not send to, with why."""

from __future__ import annotations

import functools
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from smtp_service.storage.database import Database, storable
from smtp_service.storage.messages import iso_ms
from smtp_service.storage.tables import suppressions

_IN_CHUNK = 500  # bound parameters per statement, below SQLite's limit on every version


@functools.lru_cache(maxsize=64)
def _select_some(count: int) -> sa.Select:
    """SELECT of `count` addresses, one bound parameter each (e0, e1, ...): built and compiled
    once per count, which costs far less per call than an expanding IN."""
    return sa.select(suppressions.c.email).where(
        suppressions.c.account_id == sa.bindparam("account_id"),
        suppressions.c.email.in_([sa.bindparam(f"e{i}") for i in range(count)]),
    )


def _upsert(dialect: str) -> Any:
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(suppressions)
    return insert.on_conflict_do_update(
        index_elements=[suppressions.c.account_id, suppressions.c.email],
        set_={
            name: insert.excluded[name]
            for name in ("reason", "code", "enhanced_code", "message_id", "created_at")
        },
    )


class SuppressionList:
    """Per-account suppressed addresses, stored lower-cased; every query scoped to one account."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._upsert = _upsert(db.dialect)

    def suppress(
        self,
        account_id: str,
        email: str,
        *,
        reason: str,
        code: int | None,
        enhanced_code: str | None,
        message_id: str | None,
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
                },
            )

    def list(self, account_id: str) -> list[dict[str, Any]]:
        """The account's suppressed addresses, newest first (the API's suppression shape)."""
        query = (
            sa.select(suppressions)
            .where(suppressions.c.account_id == account_id)
            .order_by(suppressions.c.created_at.desc(), suppressions.c.email)
        )
        rows = self.db.query(query).all()
        return [
            {
                "email": r.email,
                "reason": r.reason,
                "code": r.code,
                "enhancedCode": r.enhanced_code,
                "messageId": r.message_id,
                "createdAt": iso_ms(r.created_at),
            }
            for r in rows
        ]

    def suppressed(self, account_id: str, emails: list[str]) -> list[str]:
        """Those of the addresses the account has suppressed, spelled and ordered as given."""
        wanted = sorted({e.lower() for e in emails if storable(e)})
        chunks = [wanted[i : i + _IN_CHUNK] for i in range(0, len(wanted), _IN_CHUNK)]
        found: set[str] = set()
        for chunk in chunks:  # each chunk one statement, a snapshot by itself
            params = {f"e{i}": email for i, email in enumerate(chunk)}
            params["account_id"] = account_id
            found.update(self.db.query(_select_some(len(chunk)), params).scalars())
        return [e for e in emails if e.lower() in found]

    def unsuppress(self, account_id: str, email: str) -> bool:
        """Allow the address again; True when it was suppressed."""
        if not storable(email):
            return False
        delete = suppressions.delete().where(
            suppressions.c.account_id == account_id, suppressions.c.email == email.lower()
        )
        with self.db.write() as conn:
            return bool(conn.execute(delete).rowcount)
