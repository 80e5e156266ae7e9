"""The SQLite write gate waits with a limit: a write that cannot have it in time raises
StorageBusy and writes nothing, and a send answers through the usual error paths."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from smtp_service import create_app
from smtp_service.services.mailer import ABANDON_MARGIN_SECONDS
from smtp_service.storage.database import (
    BUSY_TIMEOUT_MS,
    Database,
    StorageBusy,
    write_gate_seconds,
)
from smtp_service.storage.idempotency import IdempotencyStore
from smtp_service.storage.messages import MessageLog
from tests.conftest import SMTP_USER, settings_body

SEND = "/api/messages/send-email"


def _record(log: MessageLog, message_id: str) -> None:
    log.record(
        message_id=message_id, account_id="acct-a", from_addr="sender@example.com",
        recipients=["a@example.net"], subject="s", transport="custom", status="sent",
        accepted=["a@example.net"], rejected=[], smtp_reply="250 OK", duration_ms=1.0,
        tracking=False,
    )


@pytest.fixture
def holder(tmp_path) -> Iterator[callable]:
    """Hold a file's flock from another process, as another worker's writer would, until the
    test ends (or release() is called)."""
    procs: list[subprocess.Popen] = []

    def hold(path: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
                path,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.communicate("")


def test_the_bound_leaves_the_claim_margin_to_the_two_writes_of_a_send():
    """Claim write + record write, each waiting for the gate and then SQLite's busy timeout,
    end before SMTP_DEADLINE + the takeover margin (with 2 s for building the message)."""
    busy = BUSY_TIMEOUT_MS / 1000
    gate = write_gate_seconds(150.0, ABANDON_MARGIN_SECONDS)
    assert 0 < gate and 2 * (gate + busy) + 2.0 <= ABANDON_MARGIN_SECONDS
    assert write_gate_seconds(150.0, ABANDON_MARGIN_SECONDS) == Database.__init__.__kwdefaults__[
        "gate_timeout"
    ]
    assert write_gate_seconds(1.5, ABANDON_MARGIN_SECONDS) == 1.5  # never above the deadline


def test_create_app_derives_the_bound_from_smtp_deadline(app_config):
    for deadline, expected in (("150", 9.0), ("2", 2.0)):
        app = create_app({**app_config, "SMTP_DEADLINE": deadline})
        database = app.extensions["smtp_service"].database
        assert database.gate_timeout == expected
        database.dispose()


def test_a_write_gives_up_when_another_process_holds_the_gate(tmp_path, holder):
    path = str(tmp_path / "messages.sqlite3")
    db = Database(f"sqlite:///{path}", gate_timeout=0.3)
    log = MessageLog(db)
    try:
        _record(log, "<first@x>")  # the file and its lock file exist
        proc = holder(path + ".lock")
        started = time.monotonic()
        with pytest.raises(StorageBusy) as caught:
            _record(log, "<second@x>")
        assert 0.3 <= time.monotonic() - started < 5
        assert str(caught.value) == "no write slot in the message database within 0.3 s"
        assert log.get("acct-a", "<second@x>") is None  # nothing written
        proc.communicate("")  # the other writer is done: the next write goes through
        _record(log, "<third@x>")
        assert log.get("acct-a", "<third@x>") is not None
    finally:
        db.dispose()


def test_a_write_gives_up_when_another_thread_holds_the_gate(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'messages.sqlite3'}", gate_timeout=0.3)
    log = MessageLog(db)
    keys = IdempotencyStore(db)
    _record(log, "<first@x>")
    held, release = threading.Event(), threading.Event()

    def other_writer() -> None:
        with db.write():
            held.set()
            release.wait(10)

    thread = threading.Thread(target=other_writer)
    thread.start()
    try:
        assert held.wait(5)
        with pytest.raises(StorageBusy):
            keys.claim("acct-a", "key-1", "digest", abandoned_seconds=60)
    finally:
        release.set()
        thread.join()
    state, _stored = keys.claim("acct-a", "key-1", "digest", abandoned_seconds=60)
    assert state == "new"  # the failed attempt left no claim behind
    db.dispose()


def test_a_send_whose_record_cannot_be_written_still_answers_200(
    app, client, tokens, servers, holder, caplog
):
    """The server took the message; the gate stayed busy: the answer is 200 all the same (a
    retry would deliver a second copy), the failure is logged and counted."""
    database = app.extensions["smtp_service"].database
    if database.dialect != "sqlite":
        pytest.skip("the write gate is SQLite's")
    server = servers()
    r = client.post("/api/smtp/settings", json=settings_body(server), headers=tokens.headers())
    assert r.status_code == 200, r.json
    database.gate_timeout = 0.3
    _record(app.extensions["smtp_service"].messages, "<warm@x>")  # the lock file exists
    holder(database.path + ".lock")
    body = {"from": SMTP_USER, "to": "alice@example.net", "subject": "s", "text": "t"}
    r = client.post(SEND, json=body, headers=tokens.headers())
    assert r.status_code == 200, r.json
    assert len(server.messages) == 1
    assert app.extensions["smtp_service"].mailer.storage_failures == 1
    assert "could not be recorded (StorageBusy)" in caplog.text


def test_a_send_whose_claim_cannot_be_written_sends_nothing(app, client, tokens, servers, holder):
    """With an Idempotency-Key the claim is written first: when it cannot be, the request is
    answered with the JSON error of the usual path and nothing is sent."""
    database = app.extensions["smtp_service"].database
    if database.dialect != "sqlite":
        pytest.skip("the write gate is SQLite's")
    server = servers()
    r = client.post("/api/smtp/settings", json=settings_body(server), headers=tokens.headers())
    assert r.status_code == 200, r.json
    database.gate_timeout = 0.3
    _record(app.extensions["smtp_service"].messages, "<warm@x>")
    proc = holder(database.path + ".lock")
    body = {"from": SMTP_USER, "to": "alice@example.net", "subject": "s", "text": "t"}
    headers = {**tokens.headers(), "Idempotency-Key": "k-1"}
    r = client.post(SEND, json=body, headers=headers)
    assert r.status_code == 500 and r.json == {"error": "Internal server error"}
    assert server.messages == []
    proc.communicate("")
    r = client.post(SEND, json=body, headers=headers)  # the key was never claimed: a retry sends
    assert r.status_code == 200, r.json
    assert len(server.messages) == 1
