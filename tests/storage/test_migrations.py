"""Migrations: the message database written before Alembic is adopted and upgraded with nothing
lost; `flask smtp db upgrade` and `db current`.

tests/fixtures/messages-v1.sqlite3 was written by the service as it stood before the move to
SQLAlchemy (commit 8190538, storage/messages.py with PRAGMA user_version 1), through its own
MessageLog: three messages (sent with two opens, failed, bounced) in two accounts, three
suppressions, and idempotency keys completed with a 200, completed with an uncertain 502, and
one still pending.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from smtp_service import create_app
from smtp_service.storage.migrate import head
from tests.storage.test_messages import T0, FakeClock, Stores, raw

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "messages-v1.sqlite3"

SENT_REJECTED = [
    {
        "email": "bad@example.net",
        "code": 550,
        "enhancedCode": "5.1.1",
        "reply": "5.1.1 <bad@example.net>: no such user",
        "type": "hard",
    }
]
# What GET /api/messages/<id> answered from this file before the migration.
SENT_BEFORE = {
    "messageId": "<sent-1@example.com>",
    "status": "sent",
    "from": "sender@example.com",
    "recipients": ["ok@example.net", "bad@example.net"],
    "subject": "Héllo",
    "transport": "custom",
    "accepted": ["ok@example.net"],
    "rejected": SENT_REJECTED,
    "smtpReply": "250 2.0.0 Ok: queued as 4F3A2",
    "durationMs": 41.5,
    "createdAt": "2025-11-10T21:00:00.000Z",
    "opens": 2,
    "firstOpenedAt": "2025-11-10T21:01:00.000Z",
    "events": [
        {
            "type": "sent",
            "at": "2025-11-10T21:00:00.000Z",
            "detail": {
                "reply": "250 2.0.0 Ok: queued as 4F3A2",
                "accepted": ["ok@example.net"],
                "rejected": SENT_REJECTED,
            },
        },
        {"type": "open", "at": "2025-11-10T21:01:00.000Z", "detail": None},
        {"type": "open", "at": "2025-11-10T21:02:00.000Z", "detail": None},
    ],
}


@pytest.fixture
def legacy(tmp_path) -> str:
    """A copy of the pre-Alembic file (the fixture itself is never written)."""
    path = tmp_path / "messages.sqlite3"
    shutil.copyfile(FIXTURE, path)
    return str(path)


def test_the_fixture_is_the_old_schema(legacy: str) -> None:
    assert raw(legacy, "PRAGMA user_version") == [(1,)]
    assert raw(legacy, "SELECT count(*) FROM sqlite_master WHERE name = 'alembic_version'") == [
        (0,)
    ]


def test_every_message_event_and_suppression_is_kept(legacy: str) -> None:
    stores = Stores(f"sqlite:///{legacy}", clock=FakeClock(T0 + 180))  # keys not yet expired
    try:
        assert stores.get("acct-a", "<sent-1@example.com>") == SENT_BEFORE
        failed = stores.get("acct-a", "<failed-1@example.com>")
        assert failed["status"] == "failed" and failed["transport"] == "global"
        assert failed["events"] == [
            {
                "type": "failed",
                "at": "2025-11-10T21:02:01.000Z",
                "detail": {
                    "reply": "Connection refused by localhost:2525",
                    "accepted": [],
                    "rejected": [],
                },
            }
        ]
        bounced = stores.get("acct-b", "<bounced-1@example.com>")
        assert bounced["status"] == "bounced" and bounced["rejected"][0]["code"] == 552
        assert [e["type"] for e in bounced["events"]] == ["bounced"]
        assert stores.get("acct-b", "<sent-1@example.com>") is None  # still per account
        assert [s["email"] for s in stores.suppressions("acct-a")] == ["bad@example.net"]
        assert stores.suppressions("acct-a")[0]["messageId"] == "<sent-1@example.com>"
        assert [s["email"] for s in stores.suppressions("acct-b")] == ["gone@example.org"]
        assert stores.suppressed("acct-a", ["Bad@example.net", "ok@example.net"]) == [
            "Bad@example.net"
        ]
        # the pending key is still a claim in progress, not a new one
        assert stores.claim("acct-b", "key-pending", "hash-3") == ("pending", None)
        # kept keys replay the result that answers as the first answer did (tests/api checks
        # the answer itself); their old request hash can no longer be compared: any body
        # replays (no second delivery) rather than a 409 for a retry that is the same request
        state, kept = stores.claim("acct-a", "key-sent", "any-body")
        assert state == "replay" and kept is not None
        assert (kept["outcome"], kept["message_id"], kept["accepted"]) == (
            "sent",
            "<sent-1@example.com>",
            ["ok@example.net"],
        )
        assert [r["email"] for r in kept["rejected"]] == ["bad@example.net"]
        state, kept = stores.claim("acct-a", "key-uncertain", "any-body")
        assert state == "replay" and kept is not None
        assert kept["outcome"] == "failed" and kept["uncertain"] is True
        assert kept["error"].startswith("SMTP send failed: Connection to localhost:2525 closed")
    finally:
        stores.close()
    assert raw(legacy, "SELECT version_num FROM alembic_version") == [(head(),)]
    assert raw(legacy, "SELECT count(*) FROM idempotency") == [(3,)]


def test_the_service_migrates_its_data_folder_at_start(tmp_path, app_config) -> None:
    """An existing DATA_DIR/messages.sqlite3 is upgraded when the service starts on it."""
    data = Path(app_config["DATA_DIR"])
    data.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FIXTURE, data / "messages.sqlite3")
    app = create_app({**app_config, "DATABASE_URL": ""})
    try:
        assert raw(str(data / "messages.sqlite3"), "SELECT version_num FROM alembic_version") == [
            (head(),)
        ]
        got = app.extensions["smtp_service"].messages.get("acct-a", "<sent-1@example.com>")
        assert got == SENT_BEFORE
    finally:
        app.extensions["smtp_service"].database.dispose()


def test_kept_keys_answer_as_they_did_before(tmp_path, app_config, tokens) -> None:
    """A retry of a key completed before the upgrade gets the very answer it got then."""
    data = Path(app_config["DATA_DIR"])
    data.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FIXTURE, data / "messages.sqlite3")
    with sqlite3.connect(data / "messages.sqlite3") as conn:  # the keys' 24 h have not passed
        conn.execute("UPDATE idempotency SET created_at = ?", (int(time.time() * 1000),))
    conn.close()
    app = create_app({**app_config, "DATABASE_URL": ""})
    client = app.test_client()
    body = {"from": "noreply@example.com", "to": "ok@example.net", "subject": "s", "text": "t"}
    try:
        sent = client.post(
            "/api/messages/send-email",
            json=body,
            headers={**tokens.headers("acct-a"), "Idempotency-Key": "key-sent"},
        )
        uncertain = client.post(
            "/api/messages/send-email",
            json=body,
            headers={**tokens.headers("acct-a"), "Idempotency-Key": "key-uncertain"},
        )
    finally:
        app.extensions["smtp_service"].database.dispose()
    assert (sent.status_code, sent.get_json()) == (
        200,
        {
            "success": True,
            "messageId": "<sent-1@example.com>",
            "transport": "custom",
            "accepted": ["ok@example.net"],
            "rejected": ["bad@example.net"],
        },
    )
    assert (uncertain.status_code, uncertain.get_json()) == (
        502,
        {
            "success": False,
            "messageId": "<failed-1@example.com>",
            "transport": "global",
            "error": "SMTP send failed: Connection to localhost:2525 closed after the message "
            "content was sent; the server may have accepted it, so it is not retried",
            "bounce": None,
            "uncertain": True,
        },
    )


def test_db_upgrade_and_current_commands(runner) -> None:
    result = runner.invoke(args=["smtp", "db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"database at revision {head()} (newest {head()})"
    result = runner.invoke(args=["smtp", "db", "current"])
    assert result.exit_code == 0 and head() in result.output
