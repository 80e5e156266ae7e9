"""Suppressions keep the server's reply; soft bounces are counted per address.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("suppressions") as batch:
        batch.add_column(sa.Column("reply", sa.Text))
    op.create_table(
        "soft_bounces",
        sa.Column("id", _ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("account_id", sa.Text, nullable=False),
        sa.Column("email", sa.Text, nullable=False),
        sa.Column("at", sa.BigInteger, nullable=False),
    )
    op.create_index("soft_bounces_by_address", "soft_bounces", ["account_id", "email", "at"])


def downgrade() -> None:
    op.drop_table("soft_bounces")
    with op.batch_alter_table("suppressions") as batch:
        batch.drop_column("reply")
