"""The schema the service wrote before Alembic (SQLite PRAGMA user_version 1).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("account_id", sa.Text, primary_key=True),
        sa.Column("message_id", sa.Text, primary_key=True),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("from_addr", sa.Text, nullable=False),
        sa.Column("recipients", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("transport", sa.Text, nullable=False),
        sa.Column("accepted", sa.Text, nullable=False),
        sa.Column("rejected", sa.Text, nullable=False),
        sa.Column("smtp_reply", sa.Text),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("tracking", sa.Integer, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("opens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("first_opened_at", sa.BigInteger),
    )
    op.create_table(
        "events",
        sa.Column("id", _ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("account_id", sa.Text, nullable=False),
        sa.Column("message_id", sa.Text, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("at", sa.BigInteger, nullable=False),
        sa.Column("detail", sa.Text),
        sa.ForeignKeyConstraint(
            ["account_id", "message_id"],
            ["messages.account_id", "messages.message_id"],
            ondelete="CASCADE",
        ),
    )
    op.create_index("events_by_message", "events", ["account_id", "message_id", "id"])
    op.create_table(
        "suppressions",
        sa.Column("account_id", sa.Text, primary_key=True),
        sa.Column("email", sa.Text, primary_key=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("code", sa.Integer),
        sa.Column("enhanced_code", sa.Text),
        sa.Column("message_id", sa.Text),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "idempotency",
        sa.Column("account_id", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("body_hash", sa.Text, nullable=False),
        sa.Column("status", sa.Integer),
        sa.Column("body", sa.Text),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("idempotency_by_age", "idempotency", ["account_id", "created_at"])


def downgrade() -> None:
    for table in ("idempotency", "suppressions", "events", "messages"):
        op.drop_table(table)
