"""What a real server's refusal means for the caller and the suppression list (issue #10's
cases, rebuilt from public reports): policy refusals never suppress, a full mailbox is a soft
refusal counted toward SOFT_BOUNCE_LIMIT, enhanced codes are read only where RFC 2034 puts
them, and a message the server took is answered as sent even when our own storage fails."""

from __future__ import annotations

import pytest

from smtp_service.services.bounces import classify
from tests.conftest import SMTP_USER, settings_body

SEND = "/api/messages/send-email"
STATEMENT = {"subject": "Monthly statement", "text": "Your statement is ready."}


@pytest.fixture
def app_config(app_config, servers):
    """Servers start before the app (and stop after its pool QUITs); soft limit 3."""
    return {**app_config, "SMTP_TIMEOUT": "3", "SOFT_BOUNCE_LIMIT": "3"}


def _use(client, tokens, server):
    r = client.post("/api/smtp/settings", json=settings_body(server), headers=tokens.headers())
    assert r.status_code == 200, r.json


def _send(client, tokens, to, **extra):
    body = {"from": SMTP_USER, "to": to, **STATEMENT, **extra}
    return client.post(SEND, json=body, headers=tokens.headers())


def _suppressed(client, tokens) -> list[str]:
    r = client.get("/api/suppressions", headers=tokens.headers())
    return [s["email"] for s in r.json["suppressions"]]


@pytest.mark.parametrize(
    "reply",
    [
        "554 5.7.1 Service unavailable; Client host [192.0.2.10] blocked using "
        "zen.spamhaus.example",
        "554 5.7.1 <alice@example.net>: Relay access denied",
        "550 5.7.1 Unauthenticated email from example.com is not accepted due to domain's "
        "DMARC policy",
        "550 5.7.26 This mail has been blocked because the sender is unauthenticated",
    ],
    ids=["rbl", "relay-denied", "dmarc", "gmail-unauthenticated"],
)
def test_a_policy_refusal_at_rcpt_fails_the_message_and_suppresses_nobody(
    client, tokens, servers, reply
):
    blocked = servers()
    blocked.fault("rcpt", reply)
    _use(client, tokens, blocked)
    r = _send(client, tokens, ["alice@example.net", "bob@example.org"])
    assert r.status_code == 502, r.json
    assert r.json["bounce"]["type"] == "hard" and r.json["bounce"]["code"] == int(reply[:3])
    assert (r.json["category"], r.json["temporary"]) == ("policy", False)
    assert _suppressed(client, tokens) == []
    healthy = servers()  # the account moves to a server that takes the mail: no 422
    _use(client, tokens, healthy)
    r = _send(client, tokens, ["alice@example.net", "bob@example.org"])
    assert r.status_code == 200, r.json
    assert len(healthy.messages) == 1


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        ("data", "554 5.7.1 Message refused by DMARC policy"),
        ("content", "550 5.7.1 Message content rejected, UBE"),
        ("mail", "553 5.7.1 <mailer@example.com>: Sender address rejected: not owned by user"),
    ],
    ids=["5.7.1-at-data", "5.7.1-after-content", "sender-refused-at-mail"],
)
def test_a_refused_sender_or_message_suppresses_nobody(client, tokens, servers, stage, reply):
    server = servers()
    server.fault(stage, reply)
    _use(client, tokens, server)
    r = _send(client, tokens, "alice@example.net")
    assert r.status_code == 502, r.json
    assert (r.json["category"], r.json["temporary"]) == ("policy", False)
    assert _suppressed(client, tokens) == []


def test_mailbox_full_is_a_soft_refusal_reported_and_not_suppressed(client, tokens, servers):
    server = servers()
    server.handler.rcpt_replies["carol"] = (
        "552 5.2.2 <carol@example.net>: Recipient address rejected: Mailbox full"
    )
    _use(client, tokens, server)
    r = _send(client, tokens, ["carol@example.net", "dave@example.net"])
    assert r.status_code == 200, r.json
    assert r.json["accepted"] == ["dave@example.net"]
    assert r.json["rejected"] == ["carol@example.net"]  # today's field keeps its shape
    assert r.json["refusals"] == [
        {
            "email": "carol@example.net",
            "code": 552,
            "enhancedCode": "5.2.2",
            "temporary": True,
            "category": "mailbox-full",
        }
    ]
    assert _suppressed(client, tokens) == []
    assert server.messages[0].rcpt_tos == ["dave@example.net"]
    record = client.get(f"/api/messages/{r.json['messageId']}", headers=tokens.headers()).json
    assert record["rejected"][0]["type"] == "soft"
    assert record["rejected"][0]["category"] == "mailbox-full"


def test_soft_bounces_suppress_after_the_limit(client, tokens, servers):
    server = servers()
    server.handler.rcpt_replies["carol"] = "452 4.2.2 Mailbox full, try later"
    _use(client, tokens, server)
    for attempt in range(3):
        r = _send(client, tokens, "carol@example.net")
        assert r.status_code == 502, r.json
        assert (r.json["category"], r.json["temporary"]) == ("mailbox-full", True)
        assert _suppressed(client, tokens) == ([] if attempt < 2 else ["carol@example.net"])
    listed = client.get("/api/suppressions", headers=tokens.headers()).json["suppressions"][0]
    assert listed["reason"] == "soft bounces"
    assert (listed["code"], listed["enhancedCode"]) == (452, "4.2.2")
    assert listed["reply"] == "4.2.2 Mailbox full, try later"
    assert listed["expiresAt"] is not None  # SUPPRESSION_DAYS: 30 by default
    assert _send(client, tokens, "carol@example.net").status_code == 422


def test_an_unknown_mailbox_is_suppressed_with_its_reply(client, tokens, servers):
    server = servers()
    _use(client, tokens, server)
    r = _send(client, tokens, ["bad-user@example.net", "ok@example.net"])
    assert r.status_code == 200
    assert r.json["refusals"][0]["category"] == "mailbox"
    assert r.json["refusals"][0]["temporary"] is False
    (listed,) = client.get("/api/suppressions", headers=tokens.headers()).json["suppressions"]
    assert (listed["email"], listed["reason"], listed["code"]) == (
        "bad-user@example.net",
        "hard bounce",
        550,
    )
    assert listed["reply"] == "5.1.1 User unknown"
    assert listed["messageId"] == r.json["messageId"]


def test_a_number_in_the_reply_text_is_not_an_enhanced_code(client, tokens, servers):
    server = servers()
    server.handler.rcpt_replies["eve"] = "550 Exim 4.96.1 says: no such user here"
    _use(client, tokens, server)
    r = _send(client, tokens, ["eve@example.net", "ok@example.net"])
    assert r.status_code == 200
    assert r.json["refusals"][0]["enhancedCode"] is None
    assert r.json["refusals"][0]["category"] == "mailbox"  # 550 at RCPT, by the basic code


def test_the_server_took_it_so_a_storage_failure_still_answers_200_once(
    app, client, tokens, servers, monkeypatch
):
    """Our own database fails after the server accepted: the answer is still 200, the failure
    is counted, and a retry with the same key replays instead of sending a second copy."""
    server = servers()
    _use(client, tokens, server)
    services = app.extensions["smtp_service"]

    def broken(**_fields):
        raise OSError("disk I/O error")  # what a real full or failing disk raises

    monkeypatch.setattr(services.messages, "record", broken)
    headers = {**tokens.headers(), "Idempotency-Key": "statement-2025-11"}
    body = {"from": SMTP_USER, "to": "alice@example.net", **STATEMENT}
    first = client.post(SEND, json=body, headers=headers)
    assert first.status_code == 200, first.json
    assert services.mailer.storage_failures == 1
    again = client.post(SEND, json=body, headers=headers)
    assert again.status_code == 200 and again.json == first.json
    assert len(server.messages) == 1


@pytest.mark.parametrize(
    ("code", "reply", "phase", "expected"),
    [
        (550, "5.1.1 User unknown", "rcpt", ("hard", "mailbox", False)),
        (550, "5.1.1 User unknown", "data", ("hard", "policy", False)),
        (552, "5.2.2 Mailbox full", "rcpt", ("soft", "mailbox-full", True)),
        (552, "5.3.4 Message too big for system", "data", ("hard", "policy", False)),
        (452, "4.5.3 Too many recipients", "rcpt", ("soft", "transient", True)),
        (451, "4.7.1 Greylisted, try again", "rcpt", ("soft", "transient", True)),
        (554, "5.7.1 Relay access denied", "rcpt", ("hard", "policy", False)),
        (550, "mailbox unavailable", "rcpt", ("hard", "mailbox", False)),
        (550, "administrative prohibition", "mail", ("hard", "policy", False)),
        (501, "5.5.4 Invalid parameters", "mail", ("hard", "protocol", False)),
        (421, "4.3.2 Service shutting down", "mail", ("soft", "transient", True)),
        (550, "Exim 4.96.1 rejected", "rcpt", ("hard", "mailbox", False)),
        (550, "Sorry\n5.2.1 Mailbox disabled", "rcpt", ("hard", "mailbox", False)),
        (550, "4.2.2 a 4.x.x after a 5xx is not believed", "rcpt", ("hard", "mailbox", False)),
    ],
)
def test_classification_table(code, reply, phase, expected):
    """The README's table, one row per case (RFC 3463 section 3, RFC 5321 section 4.2)."""
    assert classify(code, reply, phase) == expected
