"""The message log: what was sent, its outcome and its events (opens), per account."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from smtp_service.storage.database import Database, storable
from smtp_service.storage.tables import events, messages
from smtp_service.timestamps import iso_utc

STATUSES = frozenset({"sent", "failed", "bounced"})

_INSERT_MESSAGE = messages.insert()
_INSERT_OPEN = events.insert().values(type="open")
# The message and its later events in one statement: one snapshot, with no transaction.
_SELECT_MESSAGE = (
    sa.select(
        messages.c.status,
        messages.c.from_addr,
        messages.c.recipients,
        messages.c.subject,
        messages.c.transport,
        messages.c.accepted,
        messages.c.rejected,
        messages.c.smtp_reply,
        messages.c.duration_ms,
        messages.c.created_at,
        messages.c.opens,
        messages.c.first_opened_at,
        events.c.type.label("event_type"),
        events.c.at.label("event_at"),
        events.c.detail.label("event_detail"),
    )
    .select_from(
        messages.outerjoin(
            events,
            (events.c.account_id == messages.c.account_id)
            & (events.c.message_id == messages.c.message_id),
        )
    )
    .where(
        messages.c.account_id == sa.bindparam("account_id"),
        messages.c.message_id == sa.bindparam("message_id"),
    )
    .order_by(events.c.id)
)
# Counted only under the message's cap, and when the same reader has no open since :since;
# bind names differ from the columns': an UPDATE reserves those.
_COUNT_OPEN = (
    messages.update()
    .where(
        messages.c.account_id == sa.bindparam("b_account_id"),
        messages.c.message_id == sa.bindparam("b_message_id"),
        messages.c.opens < sa.bindparam("cap"),
        ~sa.exists().where(
            events.c.account_id == sa.bindparam("b_account_id"),
            events.c.message_id == sa.bindparam("b_message_id"),
            events.c.type == "open",
            events.c.detail == sa.bindparam("b_detail"),
            events.c.at >= sa.bindparam("since"),
        ),
    )
    .values(
        opens=messages.c.opens + 1,
        first_opened_at=sa.func.coalesce(messages.c.first_opened_at, sa.bindparam("now")),
    )
)


def iso_ms(ms: int) -> str:
    """ISO 8601 UTC with milliseconds from integer milliseconds, exactly (no float rounding)."""
    return iso_utc(datetime.fromtimestamp(ms // 1000, UTC) + timedelta(milliseconds=ms % 1000))


def message_summary(message_id: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """A message row (the columns of `messages`) as the spec's message record, without events:
    messageId, status, from, recipients, subject, transport, accepted, rejected, smtpReply,
    durationMs, createdAt, opens, firstOpenedAt."""
    first_opened = row["first_opened_at"]
    return {
        "messageId": message_id,
        "status": row["status"],
        "from": row["from_addr"],
        "recipients": json.loads(row["recipients"]),
        "subject": row["subject"],
        "transport": row["transport"],
        "accepted": json.loads(row["accepted"]),
        "rejected": json.loads(row["rejected"]),
        "smtpReply": row["smtp_reply"],
        "durationMs": row["duration_ms"],
        "createdAt": iso_ms(row["created_at"]),
        "opens": row["opens"],
        "firstOpenedAt": None if first_opened is None else iso_ms(first_opened),
    }


class MessageLog:
    """Sent messages and their events. Every query is scoped to one account_id.

    A message's outcome (sent, failed, bounced) is its row; its first event is read from that
    row, so a send writes one row. Later events (opens) are rows of their own.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(
        self,
        *,
        message_id: str,
        account_id: str,
        from_addr: str,
        recipients: list[str],
        subject: str,
        transport: str,
        status: str,
        accepted: list[str],
        rejected: list[dict],
        smtp_reply: str | None,
        duration_ms: float,
        tracking: bool,
    ) -> None:
        """Log one send attempt and its outcome; ValueError for a status not in STATUSES."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}")
        row = {
            "account_id": account_id,
            "message_id": message_id,
            "status": status,
            "from_addr": from_addr,
            "recipients": json.dumps(recipients),
            "subject": subject,
            "transport": transport,
            "accepted": json.dumps(accepted),
            "rejected": json.dumps(rejected),
            "smtp_reply": smtp_reply,
            "duration_ms": float(duration_ms),
            "tracking": int(bool(tracking)),
            "created_at": self.db.now_ms(),
        }
        with self.db.write() as conn:
            conn.execute(_INSERT_MESSAGE, row)

    def get(self, account_id: str, message_id: str) -> dict[str, Any] | None:
        """The account's message with its events (the spec's message record), or None."""
        if not storable(message_id):
            return None
        rows = self.db.query(_SELECT_MESSAGE, {"account_id": account_id, "message_id": message_id})
        if not rows:
            return None
        row = rows[0]
        record = message_summary(message_id, row)
        outcome = {
            "type": row.status,
            "at": record["createdAt"],
            "detail": {
                "reply": row.smtp_reply,
                "accepted": record["accepted"],
                "rejected": record["rejected"],
            },
        }
        return {
            **record,
            "events": [outcome]
            + [
                {
                    "type": r.event_type,
                    "at": iso_ms(r.event_at),
                    "detail": None if r.event_detail is None else json.loads(r.event_detail),
                }
                for r in rows
                if r.event_type is not None
            ],
        }

    def record_open(
        self,
        account_id: str,
        message_id: str,
        *,
        reader: str | None = None,
        window_ms: int = 0,
        cap: int = 2**31 - 1,
    ) -> bool:
        """Count an open of the account's message, and add its event (detail: the reader).

        Not counted, and False: when the account has no such message, when the message has
        `cap` opens already, or when `reader` has an open of it within the last `window_ms`.
        One conditional UPDATE decides, so a fetch that is not counted writes no row."""
        now = self.db.now_ms()
        detail = None if reader is None else json.dumps({"reader": reader})
        params = {
            "b_account_id": account_id,
            "b_message_id": message_id,
            "now": now,
            "cap": cap,
            "b_detail": detail,
            "since": now - window_ms if reader is not None and window_ms else now + 1,
        }
        with self.db.write() as conn:
            found = conn.execute(_COUNT_OPEN, params).rowcount
            if found:
                conn.execute(
                    _INSERT_OPEN,
                    {
                        "account_id": account_id,
                        "message_id": message_id,
                        "at": now,
                        "detail": detail,
                    },
                )
        return bool(found)
