"""OAuth2 sign-ins in progress, shared by every worker and instance through the database."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from smtp_service.storage.database import Database
from smtp_service.storage.tables import oauth_states as states

_KEEP_USED_MS = 86_400_000  # a used or expired row is kept a day (a replay still finds it)
_PURGE = states.delete().where(states.c.expires_at < sa.bindparam("before"))
_INSERT = states.insert()
# Taking a state is one conditional UPDATE: of two callbacks with the same state, on any
# worker or instance, exactly one changes the row (the database serialises the writes).
_TAKE = (
    states.update()
    .where(
        states.c.state_id == sa.bindparam("b_state_id"),
        states.c.used_at.is_(None),
        states.c.expires_at > sa.bindparam("now"),
    )
    .values(used_at=sa.bindparam("now"))
)
_SELECT = sa.select(states.c.account_id, states.c.request, states.c.verifier).where(
    states.c.state_id == sa.bindparam("b_state_id")
)


@dataclass(frozen=True)
class PendingSignIn:
    """A sign-in the callback may finish: the account, what was asked for (provider, mailbox,
    server, the user who started it) and the encrypted PKCE verifier."""

    account_id: str
    request: dict[str, Any]
    verifier: str


class OAuthStates:
    """Rows of oauth_states: created by start, taken once by the callback."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self,
        state_id: str,
        account_id: str,
        request: dict[str, Any],
        verifier: str,
        ttl_seconds: int,
    ) -> None:
        """Record a sign-in begun now, usable for `ttl_seconds`; rows expired more than a day
        ago are removed on the way."""
        now = self.db.now_ms()
        with self.db.write() as conn:
            conn.execute(_PURGE, {"before": now - _KEEP_USED_MS})
            conn.execute(
                _INSERT,
                {
                    "state_id": state_id,
                    "account_id": account_id,
                    "request": json.dumps(request),
                    "verifier": verifier,
                    "created_at": now,
                    "expires_at": now + ttl_seconds * 1000,
                    "used_at": None,
                },
            )

    def take(self, state_id: str) -> PendingSignIn | None:
        """The sign-in named by `state_id`, marked used; None when there is none, it expired
        or it was taken before (a replay). At most one caller ever gets a given row."""
        with self.db.write() as conn:
            params = {"b_state_id": state_id, "now": self.db.now_ms()}
            if conn.execute(_TAKE, params).rowcount != 1:
                return None
            account_id, request, verifier = conn.execute(_SELECT, params).fetchone()
        return PendingSignIn(account_id, json.loads(request), verifier)
