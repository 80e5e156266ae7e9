"""Idempotency keys: the first request with a key sends, a retry gets the first result."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from smtp_service.storage.database import Database
from smtp_service.storage.tables import idempotency as keys

# Bind names differ from the columns': an UPDATE reserves those for its SET clause.
_MATCH = (keys.c.account_id == sa.bindparam("b_account_id")) & (
    keys.c.key == sa.bindparam("b_key")
)
# Rows kept from before migration 0002 hash a request form no longer computed: they match any.
LEGACY_HASH = "legacy:"
_SELECT = sa.select(keys.c.body_hash, keys.c.result, keys.c.created_at).where(_MATCH)
_EXPIRE = keys.delete().where(
    keys.c.account_id == sa.bindparam("b_account_id"), keys.c.created_at < sa.bindparam("before")
)
_TAKE_OVER = keys.update().where(_MATCH).values(created_at=sa.bindparam("now"))
_COMPLETE = keys.update().where(_MATCH).values(result=sa.bindparam("b_result"))
_RELEASE = keys.delete().where(_MATCH, keys.c.result.is_(None))


class IdempotencyStore:
    """Per-account claims on Idempotency-Keys and the result stored for each.

    A claim is atomic across threads, processes and instances: the row is inserted with ON
    CONFLICT DO NOTHING, and an existing row is read under a row lock (PostgreSQL) or the
    database write lock (SQLite).
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        insert = (postgresql.insert if db.dialect == "postgresql" else sqlite.insert)(keys)
        # RETURNING says whether the row went in (rowcount is not reliable for ON CONFLICT).
        self._insert = insert.on_conflict_do_nothing(
            index_elements=[keys.c.account_id, keys.c.key]
        ).returning(keys.c.key)
        self._select_locked = _SELECT.with_for_update() if db.dialect == "postgresql" else _SELECT

    def claim(
        self,
        account_id: str,
        key: str,
        body_hash: str,
        ttl_seconds: int = 86400,
        abandoned_seconds: int = 300,
    ) -> tuple[str, dict[str, Any] | None]:
        """Claim a key: ("new" | "replay" | "conflict" | "pending", the stored result or None).

        "new": the caller owns the key and must complete() or release() it. "replay": the
        key's first request finished with the returned result. "conflict": the key was used for
        another request (another body hash). "pending": its first request is still running.
        Keys older than `ttl_seconds` are forgotten. A key kept from before migration 0002
        (LEGACY_HASH) matches any body: its hash cannot be compared any more. A claim still
        pending after `abandoned_seconds` belonged to a request that died: a retry takes it
        over.
        """
        now = self.db.now_ms()
        ids = {"b_account_id": account_id, "b_key": key}
        with self.db.write() as conn:
            conn.execute(
                _EXPIRE, {"b_account_id": account_id, "before": now - int(ttl_seconds * 1000)}
            )
            row = {"account_id": account_id, "key": key, "body_hash": body_hash}
            row.update(result=None, created_at=now)
            if conn.execute(self._insert, row).fetchone() is not None:
                return "new", None
            stored_hash, result, created_at = conn.execute(self._select_locked, ids).fetchone()
            if stored_hash != body_hash and not stored_hash.startswith(LEGACY_HASH):
                return "conflict", None
            if result is not None:
                return "replay", json.loads(result)
            if created_at >= now - int(abandoned_seconds * 1000):
                return "pending", None
            conn.execute(_TAKE_OVER, {**ids, "now": now})
            return "new", None

    def complete(self, account_id: str, key: str, result: dict[str, Any]) -> None:
        """Store the result of a claimed key, for replays."""
        with self.db.write() as conn:
            params = {"b_account_id": account_id, "b_key": key, "b_result": json.dumps(result)}
            conn.execute(_COMPLETE, params)

    def release(self, account_id: str, key: str) -> None:
        """Drop a pending claim so the request may be retried; completed ones stay."""
        with self.db.write() as conn:
            conn.execute(_RELEASE, {"b_account_id": account_id, "b_key": key})
