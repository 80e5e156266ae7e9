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
# The stats per interval and the listing (newest first, keyset on created_at, message_id).
Index("messages_by_time", messages.c.account_id, messages.c.created_at, messages.c.message_id)

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

# Sends through one transport of one account, by time: the last success and the latency
# percentiles of GET /api/smtp/health are read from the message log through it.
Index("messages_by_transport", messages.c.account_id, messages.c.transport, messages.c.created_at)

# The health of each transport ("custom", "global") an account used, and its circuit breaker
# (storage/health.py). Written on failures, circuit transitions and connection tests only; a
# successful send writes nothing here (its row in `messages` says it).
smtp_health = Table(
    "smtp_health",
    metadata,
    Column("account_id", Text, primary_key=True),
    Column("transport", Text, primary_key=True),
    Column("server", Text),  # "host:port" of the last attempt recorded (never a credential)
    Column("state", Text, nullable=False, server_default="closed"),  # closed, open, half_open
    Column("failures", Integer, nullable=False, server_default="0"),  # consecutive
    Column("open_until", BigInteger),  # open: skipped until then; then one request probes
    Column("probe_until", BigInteger),  # half_open: the probe's claim lapses then
    Column("last_failure_at", BigInteger),
    Column("last_failure_kind", Text),
    Column("last_failure_reason", Text),
    Column("last_success_at", BigInteger),  # tests and probes; sends are read from `messages`
    Column("updated_at", BigInteger, nullable=False),
)
# Sends counted per account, window length ("60": per minute; the limit itself is not kept, so
# a changed limit still counts the window's sends) and fixed window (its first second since the
# epoch): storage/send_rate.py takes and gives back slots.
send_rate = Table(
    "send_rate",
    metadata,
    Column("account_id", Text, primary_key=True),
    Column("rate", Text, primary_key=True),
    Column("window_start", BigInteger, primary_key=True),
    Column("used", Integer, nullable=False),
)

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
