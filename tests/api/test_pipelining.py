"""PIPELINING (RFC 2920): MAIL, RCPT and DATA go out in one write when the server offers it;
the content still waits for DATA's 354, and every refusal reads as it does one command at a time.
Real aiosmtpd servers; `batched` records, per MAIL, whether RCPT and DATA were already waiting."""

from __future__ import annotations

import pytest

from tests.conftest import SMTP_USER, settings_body


@pytest.fixture
def app_config(app_config, servers):
    """`servers` first, so the servers stop after the app's pool has QUIT."""
    return app_config


def _use(client, tokens, server):
    r = client.post(
        "/api/smtp/settings", json=settings_body(server), headers=tokens.headers()
    )
    assert r.status_code == 200, r.json


def _send(client, tokens, to):
    payload = {"from": SMTP_USER, "to": to, "subject": "Hello", "text": "Hi"}
    return client.post("/api/messages/send-email", json=payload, headers=tokens.headers())


def test_commands_go_out_in_one_batch(client, tokens, servers):
    server = servers(pipelining=True)
    _use(client, tokens, server)
    to = ["a@example.net", "b@example.net", "c@example.net"]
    r = _send(client, tokens, to)
    assert r.status_code == 200, r.json
    assert r.json["accepted"] == to
    assert server.handler.batched == [True]
    assert [m.rcpt_tos for m in server.messages] == [to]


def test_one_command_at_a_time_when_not_offered(client, tokens, servers):
    server = servers(pipelining=False)
    _use(client, tokens, server)
    assert _send(client, tokens, "a@example.net").status_code == 200
    assert server.handler.batched == [False]


def test_smtp_pipelining_false_turns_it_off(app_config, servers, tokens):
    from smtp_service import create_app

    app = create_app({**app_config, "SMTP_PIPELINING": "false"})
    try:
        client = app.test_client()
        server = servers(pipelining=True)
        _use(client, tokens, server)
        assert _send(client, tokens, "a@example.net").status_code == 200
        assert server.handler.batched == [False]
    finally:
        app.extensions["smtp_service"].pool.close_all()


def test_partial_refusal_in_a_batch(client, tokens, servers):
    server = servers(pipelining=True)
    _use(client, tokens, server)
    r = _send(client, tokens, ["bad1@example.net", "ok@example.net", "later@example.net"])
    assert r.status_code == 200, r.json
    assert r.json["accepted"] == ["ok@example.net"]
    assert r.json["rejected"] == ["bad1@example.net", "later@example.net"]
    assert [m.rcpt_tos for m in server.messages] == [["ok@example.net"]]
    suppressed = client.get("/api/suppressions", headers=tokens.headers()).json["suppressions"]
    assert [s["email"] for s in suppressed] == ["bad1@example.net"]


def test_all_refused_sends_no_content_and_keeps_the_connection(client, tokens, servers):
    server = servers(pipelining=True)
    _use(client, tokens, server)
    r = _send(client, tokens, ["bad1@example.net", "bad2@example.net"])
    assert r.status_code == 502
    assert r.json["bounce"]["type"] == "hard"
    assert r.json["bounce"]["recipients"] == ["bad1@example.net", "bad2@example.net"]
    assert server.count("DATA") == 1 and server.messages == []  # DATA answered 503
    # Every owed reply was read and RSET answered: the pooled connection carries the next one.
    assert _send(client, tokens, "ok@example.net").status_code == 200
    assert server.connections == 1
    assert server.verbs(1)[-4:] == ["RSET", "MAIL", "RCPT", "DATA"]
    assert len(server.messages) == 1


def test_refused_sender_in_a_batch(client, tokens, servers):
    server = servers(pipelining=True)
    _use(client, tokens, server)
    server.fault("mail", "550 5.7.1 Sender rejected", times=1)
    r = _send(client, tokens, "ok@example.net")
    assert r.status_code == 502
    assert r.json["error"] == "SMTP server refused the message: 550 5.7.1 Sender rejected"
    assert server.messages == []
    assert _send(client, tokens, "ok@example.net").status_code == 200
    assert server.connections == 1 and len(server.messages) == 1


def test_354_after_every_recipient_was_refused_gets_a_lone_dot(client, tokens, servers):
    """A server that answers DATA with 354 although no RCPT was accepted waits for content: a
    lone dot ends that empty transaction (RFC 2920 section 3.1) and the connection carries the
    next message."""
    server = servers(pipelining=True)
    _use(client, tokens, server)
    server.fault("data", "354 End data with <CR><LF>.<CR><LF>", times=1)
    r = _send(client, tokens, ["bad1@example.net"])
    assert r.status_code == 502 and r.json["bounce"]["type"] == "hard"
    assert server.after_354 == [b""]
    assert server.messages == [] and server.unanswered == [] and server.refused == []
    assert _send(client, tokens, "ok@example.net").status_code == 200
    assert server.connections == 1 and len(server.messages) == 1


def test_a_421_in_the_middle_of_a_batch_reports_no_one_as_accepted(client, tokens, servers):
    """RCPT a 250, RCPT b 421 (the server is closing), RCPT c 250, DATA 354: the answer stops
    at the 421 (the replies after it are not read as if they were DATA's and RSET's), nothing
    is sent, nobody is suppressed, and the failure is temporary."""
    server = servers(pipelining=True)
    server.handler.rcpt_replies["b"] = "421 4.7.0 Too many errors, closing"
    _use(client, tokens, server)
    r = _send(client, tokens, ["a@example.net", "b@example.net", "c@example.net"])
    assert r.status_code == 502, r.json
    assert (r.json["temporary"], r.json["category"]) == (True, "transient")
    assert r.json["bounce"] == {"type": "soft", "code": 421, "enhancedCode": "4.7.0",
                                "recipients": ["a@example.net", "b@example.net",
                                               "c@example.net"]}
    assert server.messages == [] and "RSET" not in server.verbs(1)
    assert client.get("/api/suppressions", headers=tokens.headers()).json["suppressions"] == []
    server.handler.rcpt_replies.clear()
    assert _send(client, tokens, "a@example.net").status_code == 200
    assert server.connections == 2  # the closing session was not used again


def test_an_smtputf8_batch(client, tokens, servers):
    """A non-ASCII recipient: the batch goes out as UTF-8 with SMTPUTF8 on MAIL."""
    server = servers(pipelining=True)
    _use(client, tokens, server)
    r = _send(client, tokens, ["jos\u00e9@example.net", "ok@example.net"])
    assert r.status_code == 200, r.json
    assert server.handler.batched == [True]
    assert [m.rcpt_tos for m in server.messages] == [["jos\u00e9@example.net", "ok@example.net"]]
