"""An index for an account's messages by time: the stats per interval and the listing.

Revision ID: 0006
Revises: 0003
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # (account_id, created_at) bounds the stats' range scans; message_id after it makes the
    # listing's order (created_at, message_id descending) and its keyset an index walk.
    op.create_index("messages_by_time", "messages", ["account_id", "created_at", "message_id"])


def downgrade() -> None:
    op.drop_index("messages_by_time", table_name="messages")
