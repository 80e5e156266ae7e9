"""One row per send, and idempotency keys that keep the send's result instead of an HTTP answer.

- A send's outcome event repeated its message row (same time, reply, accepted, rejected): the
  message log now reads it from the row, so those event rows are dropped.
- idempotency.status and .body (an HTTP status and JSON body) become .result (the send's
  result as JSON, services.domain.SendResult.to_dict()), converted row by row. Only answers that
  were kept are there: a 200, or an uncertain 502. The request hash of those rows was taken
  over the old request dict, which the service no longer computes: it is marked "legacy:", and
  a retry with such a key replays its result whatever the body (until it expires, 24 h).

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
    """The send result (SendResult.to_dict()) that answers as `body` did, from a kept answer."""
    if status == 200:
        return {
            "outcome": "sent",
            "message_id": body["messageId"],
            "transport": body["transport"],
            "accepted": body["accepted"],
            # the answer named the refused addresses only: nothing else is known of them
            "rejected": [
                {
                    "email": e,
                    "code": None,
                    "enhancedCode": None,
                    "reply": None,
                    "type": "hard",
                    "category": None,
                    "temporary": None,
                }
                for e in body["rejected"]
            ],
            "bounce": None,
            "error": None,
            "uncertain": False,
        }
    return {
        "outcome": "failed",
        "message_id": body["messageId"],
        "transport": body["transport"],
        "accepted": [],
        "rejected": [],
        "bounce": None,
        "error": body["error"],
        "uncertain": bool(body.get("uncertain")),
    }


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
    conn.execute(sa.text("UPDATE idempotency SET body_hash = 'legacy:' || body_hash"))
    with op.batch_alter_table("idempotency") as batch:
        batch.drop_column("status")
        batch.drop_column("body")


def downgrade() -> None:
    raise NotImplementedError("0002 is not reversible: the outcome events were folded in")
