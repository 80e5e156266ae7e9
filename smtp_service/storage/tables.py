"""The message database's tables (SQLAlchemy Core), as the newest migration leaves them.

Timestamps are integer milliseconds since the epoch (UTC); lists and details are JSON text.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
)

metadata = MetaData()

# SQLite makes INTEGER PRIMARY KEY the rowid (auto-numbered); PostgreSQL needs a 64-bit identity.
_ROW_ID = BigInteger().with_variant(Integer(), "sqlite")

messages = Table(
    "messages",
    metadata,
    Column("account_id", Text, primary_key=True),
    Column("message_id", Text, primary_key=True),
    Column("status", Text, nullable=False),
    Column("from_addr", Text, nullable=False),
    Column("recipients", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("transport", Text, nullable=False),
    Column("accepted", Text, nullable=False),
    Column("rejected", Text, nullable=False),
    Column("smtp_reply", Text),
    Column("duration_ms", Float, nullable=False),
    Column("tracking", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("opens", Integer, nullable=False, server_default="0"),
    Column("first_opened_at", BigInteger),
)

events = Table(
    "events",
    metadata,
    Column("id", _ROW_ID, primary_key=True, autoincrement=True),
    Column("account_id", Text, nullable=False),
    Column("message_id", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("at", BigInteger, nullable=False),
    Column("detail", Text),
    ForeignKeyConstraint(
        ["account_id", "message_id"],
        ["messages.account_id", "messages.message_id"],
        ondelete="CASCADE",
    ),
)
Index("events_by_message", events.c.account_id, events.c.message_id, events.c.id)

suppressions = Table(
    "suppressions",
    metadata,
    Column("account_id", Text, primary_key=True),
    Column("email", Text, primary_key=True),
    Column("reason", Text, nullable=False),
    Column("code", Integer),
    Column("enhanced_code", Text),
    Column("message_id", Text),
    Column("created_at", BigInteger, nullable=False),
    Column("reply", Text),
)

# One row per address-level temporary refusal (mailbox full), counted within a window.
soft_bounces = Table(
    "soft_bounces",
    metadata,
    Column("id", _ROW_ID, primary_key=True, autoincrement=True),
    Column("account_id", Text, nullable=False),
    Column("email", Text, nullable=False),
    Column("at", BigInteger, nullable=False),
)
Index("soft_bounces_by_address", soft_bounces.c.account_id, soft_bounces.c.email, soft_bounces.c.at)

idempotency = Table(
    "idempotency",
    metadata,
    Column("account_id", Text, primary_key=True),
    Column("key", Text, primary_key=True),
    Column("body_hash", Text, nullable=False),
    Column("result", Text),  # the SendResult as JSON; NULL while the claim is pending
    Column("created_at", BigInteger, nullable=False),
)
Index("idempotency_by_age", idempotency.c.account_id, idempotency.c.created_at)

# OAuth2 sign-ins begun (POST /api/smtp/oauth/start) and not yet finished: the signed `state`
# names a row; the callback takes it once (used_at set), before it expires.
oauth_states = Table(
    "oauth_states",
    metadata,
    Column("state_id", Text, primary_key=True),
    Column("account_id", Text, nullable=False),
    Column("request", Text, nullable=False),  # JSON: provider, mailbox, server, who started it
    Column("verifier", Text, nullable=False),  # the PKCE code_verifier, encrypted for the account
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("used_at", BigInteger),
)
Index("oauth_states_by_expiry", oauth_states.c.expires_at)
