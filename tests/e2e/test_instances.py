"""Two gunicorn instances (2 workers each) on one PostgreSQL database and one data folder, as
several hosts would run them: what one does, the other sees, exactly."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.databases import PG_SKIP, empty_tables
from tests.e2e.conftest import LiveService, start_instances
from tests.smtpd import SmtpServer

ACCOUNT = "acct-instances"


@pytest.fixture
def instances(
    tmp_path: Path,
    trust_test_ca: str,
    global_server: SmtpServer,
    smtp_factory: Any,
    pg_schema_url: str | None,
) -> Iterator[tuple[LiveService, LiveService]]:
    """Two instances sharing DATABASE_URL (PostgreSQL), DATA_DIR and the encryption key."""
    if pg_schema_url is None:
        pytest.skip(PG_SKIP)
    empty_tables(pg_schema_url)
    started = start_instances(
        tmp_path,
        ca_file=trust_test_ca,
        global_server=global_server,
        account_server=smtp_factory("starttls"),
        database_url=pg_schema_url,
    )
    try:
        yield started[0], started[1]
    finally:
        for live in started:
            live.stop()
    for live in started:
        live.assert_log_clean()


def _send(
    live: LiveService,
    token: str,
    to: str = "rcpt@example.net",
    sender: str = "noreply@example.com",  # SMTP_FROM: the global server's own address
    **headers: str,
):
    body = {"from": sender, "to": to, "subject": "across instances", "text": "x"}
    return live.request("POST", "/api/messages/send-email", body, token=token, headers=headers)


def test_message_log_and_settings_are_shared(instances) -> None:
    a, b = instances
    token = a.token(ACCOUNT)
    settings = {"host": "localhost", "port": a.account_server.port}
    saved = a.request(
        "POST",
        "/api/smtp/settings",
        {**settings, "user": SMTP_USER, "pass": SMTP_PASSWORD},
        token=token,
    )
    assert saved.status == 200, saved.text
    sent = _send(b, token, sender=SMTP_USER)  # b reads the settings a saved (shared folder)
    assert sent.status == 200, sent.text
    assert sent.json["transport"] == "custom"
    message_id = sent.json["messageId"]
    record = a.request("GET", f"/api/messages/{message_id}", token=token)
    assert record.status == 200, record.text
    assert record.json["status"] == "sent" and record.json["accepted"] == ["rcpt@example.net"]
    # and never to another account, whichever instance is asked
    other = b.request("GET", f"/api/messages/{message_id}", token=b.token("acct-other"))
    assert other.status == 404


def test_a_suppression_made_by_one_is_enforced_by_the_other(instances) -> None:
    a, b = instances
    token = a.token(ACCOUNT)
    bounced = _send(a, token, to="bad-mailbox@example.net")  # the server: 550 5.1.1
    assert bounced.status == 502 and bounced.json["bounce"]["type"] == "hard"
    refused = _send(b, token, to="bad-mailbox@example.net")
    assert refused.status == 422, refused.text
    assert refused.json["suppressed"] == ["bad-mailbox@example.net"]
    listed = b.request("GET", "/api/suppressions", token=token)
    assert [s["email"] for s in listed.json["suppressions"]] == ["bad-mailbox@example.net"]
    removed = b.request("DELETE", "/api/suppressions/bad-mailbox@example.net", token=token)
    assert removed.status == 200
    assert a.request("GET", "/api/suppressions", token=token).json["suppressions"] == []


def test_one_idempotency_key_at_both_instances_at_once_delivers_one_message(instances) -> None:
    a, b = instances
    token = a.token(ACCOUNT)
    before = len(a.global_server.messages)
    key = "order-4711-confirmation"
    targets = [a, b] * 4  # 8 requests with one key, both instances, both workers each

    with ThreadPoolExecutor(len(targets)) as pool:
        answers = list(
            pool.map(lambda live: _send(live, token, **{"Idempotency-Key": key}), targets)
        )

    statuses = sorted(r.status for r in answers)
    assert set(statuses) <= {200, 409}, [r.text for r in answers]
    assert 200 in statuses
    assert {r.json["messageId"] for r in answers if r.status == 200} == {
        next(r.json["messageId"] for r in answers if r.status == 200)
    }
    assert len(a.global_server.messages) == before + 1  # delivered once
    # a later retry at either instance answers the first result and sends nothing
    first = next(r.json for r in answers if r.status == 200)
    for live in (a, b):
        replay = _send(live, token, **{"Idempotency-Key": key})
        assert replay.status == 200 and replay.json == first
    assert len(a.global_server.messages) == before + 1
