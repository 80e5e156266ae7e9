"""SMTP health and the circuit breaker per account and transport; messages by transport.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "smtp_health",
        sa.Column("account_id", sa.Text, primary_key=True),
        sa.Column("transport", sa.Text, primary_key=True),
        sa.Column("server", sa.Text),
        sa.Column("state", sa.Text, nullable=False, server_default="closed"),
        sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("open_until", sa.BigInteger),
        sa.Column("probe_until", sa.BigInteger),
        sa.Column("last_failure_at", sa.BigInteger),
        sa.Column("last_failure_kind", sa.Text),
        sa.Column("last_failure_reason", sa.Text),
        sa.Column("last_success_at", sa.BigInteger),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_index(
        "messages_by_transport", "messages", ["account_id", "transport", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("messages_by_transport", table_name="messages")
    op.drop_table("smtp_health")
