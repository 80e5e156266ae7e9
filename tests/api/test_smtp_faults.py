"""Every SMTP fault through the real app: the HTTP answer, how long it took, the message record,
the pool's recovery, and the server's own records proving nothing was delivered twice or
recorded as sent when it was not."""

from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import SMTP_PASSWORD, SMTP_USER, settings_body
from tests.smtpd_faults import bad_tls_context

# Every test here runs against servers without and with PIPELINING (RFC 2920).
pytestmark = pytest.mark.both_pipelining_modes

TIMEOUT = 1.5  # SMTP_TIMEOUT for these tests: connecting, and each command's reply
FINAL_REPLY = 2.5  # SMTP_FINAL_REPLY_TIMEOUT: the reply to the final dot
BOUND = FINAL_REPLY + TIMEOUT + 0.5  # an answer must come within this, whatever the server does
RCPT = "rcpt@example.net"


@pytest.fixture
def app_config(app_config, servers):
    """Short SMTP timeouts, and a short wait for a connection (a 421 at the greeting is tried
    again until it ends). Asking for `servers` here starts them before the app, so they stop
    after the app's pool has QUIT its connections."""
    return {**app_config, "SMTP_TIMEOUT": str(TIMEOUT),
            "SMTP_FINAL_REPLY_TIMEOUT": str(FINAL_REPLY), "SMTP_POOL_WAIT_SECONDS": "1"}


def _use(client, tokens, server, **overrides):
    r = client.post("/api/smtp/settings", json=settings_body(server, **overrides),
                    headers=tokens.headers())
    assert r.status_code == 200, r.json


def _send(client, tokens, http_headers=None, **body):
    """POST send-email; returns the response and the seconds it took."""
    payload = {"from": SMTP_USER, "to": RCPT, "subject": "Hello", "text": "Hi", **body}
    started = time.monotonic()
    r = client.post("/api/messages/send-email", json=payload,
                    headers={**tokens.headers(), **(http_headers or {})})
    return r, time.monotonic() - started


def _record(client, tokens, message_id):
    r = client.get(f"/api/messages/{message_id}", headers=tokens.headers())
    assert r.status_code == 200, r.json
    return r.json


def _ids(received) -> list[str]:
    return [m.message["Message-ID"] for m in received]


def _assert_delivered_once(server, message_id):
    assert _ids(server.messages).count(f"<{message_id}>") == 1
    everything = _ids(server.messages) + _ids(server.unanswered)
    assert len(everything) == len(set(everything)), everything


def _assert_recovers(client, tokens, server, **body):
    """The faults cleared, the next request through the same pool is delivered, once."""
    server.clear()
    r, elapsed = _send(client, tokens, **body)
    assert r.status_code == 200, r.json
    assert elapsed < BOUND
    assert _record(client, tokens, r.json["messageId"])["status"] == "sent"
    _assert_delivered_once(server, r.json["messageId"])


@pytest.mark.parametrize(
    ("stage", "action", "text", "slow", "category", "temporary"),
    [
        ("connect", "close", "closed the connection", False, "closed", True),
        ("connect", "421 4.3.2 Too many connections", "SMTP send failed: ", False, "refused", True),
        ("connect", "stall", "Timed out talking to localhost:", True, "timeout", True),
        ("mail", "close", "closed the connection", False, "closed", True),
        # the content went out: the server may have it, so it must not be sent again
        ("content", "close", "closed the connection", False, "closed", False),
        ("content", "stall", "Timed out talking to localhost:", True, "timeout", False),
    ],
    ids=["close-after-greeting", "421-on-connect", "stall-at-greeting", "close-after-mail",
         "close-after-content", "stall-at-final-reply"],
)
def test_connection_failures_are_502_without_bounce(client, tokens, server, stage, action, text,
                                                    slow, category, temporary):
    _use(client, tokens, server)
    server.fault(stage, action)
    r, elapsed = _send(client, tokens)
    assert elapsed < BOUND
    if slow:  # it was the timeout that ended it: the final reply's own, after the content
        assert elapsed >= (FINAL_REPLY if stage == "content" else TIMEOUT) * 0.9
    assert r.status_code == 502, r.json
    message_id = r.json["messageId"]
    expected = {"success": False, "messageId": message_id, "transport": "custom",
                "error": r.json["error"], "bounce": None, "temporary": temporary,
                "category": category}
    if stage == "content":  # the content went out: the server may have it
        expected["uncertain"] = True
    assert r.json == expected
    assert r.json["error"].startswith("SMTP send failed: ") and text in r.json["error"]
    assert SMTP_PASSWORD not in r.json["error"]
    record = _record(client, tokens, message_id)
    assert record["status"] == "failed" and record["accepted"] == []
    assert record["smtpReply"] == r.json["error"].removeprefix("SMTP send failed: ")
    assert f"<{message_id}>" not in _ids(server.messages)  # not delivered, not recorded as sent
    if stage == "content":  # the server read it once and was never asked again
        assert _ids(server.unanswered) == [f"<{message_id}>"]
        assert server.count("DATA") == 1
    assert client.get("/api/suppressions", headers=tokens.headers()).json["suppressions"] == []
    _assert_recovers(client, tokens, server)


@pytest.mark.parametrize(
    ("stage", "reply", "kind", "category"),
    [
        ("mail", "421 4.3.2 Service shutting down", "soft", "transient"),
        ("rcpt", "451 4.3.0 Mailbox temporarily unavailable", "soft", "transient"),
        ("data", "452 4.3.1 Insufficient system storage", "soft", "transient"),
        ("content", "554 5.7.1 Message rejected as spam", "hard", "policy"),
    ],
    ids=["421-on-mail", "451-on-rcpt", "452-on-data", "554-after-content"],
)
def test_refusals_are_502_bounces(client, tokens, server, stage, reply, kind, category):
    _use(client, tokens, server)
    server.fault(stage, reply)
    r, elapsed = _send(client, tokens)
    assert elapsed < BOUND
    assert r.status_code == 502, r.json
    code, text = int(reply[:3]), reply[4:]
    message_id = r.json["messageId"]
    assert r.json == {
        "success": False,
        "messageId": message_id,
        "transport": "custom",
        "error": f"SMTP server refused the message: {code} {text}",
        "bounce": {"type": kind, "code": code, "enhancedCode": text.split()[0],
                   "recipients": [RCPT]},
        "temporary": kind == "soft",
        "category": category,
    }
    record = _record(client, tokens, message_id)
    assert record["status"] == "bounced" and record["accepted"] == []
    assert [(x["email"], x["code"], x["type"]) for x in record["rejected"]] == [(RCPT, code, kind)]
    # Pipelined, DATA went out with the RCPT that was refused: answered 503, no content sent.
    data_sent = stage in ("data", "content") or (stage == "rcpt" and server.handler.pipelining)
    assert server.messages == [] and server.count("DATA") == data_sent
    if stage == "content":
        assert _ids(server.refused) == [f"<{message_id}>"]
    # None of these is about the address: nothing is suppressed (README, the bounce table).
    assert client.get("/api/suppressions", headers=tokens.headers()).json["suppressions"] == []
    _assert_recovers(client, tokens, server, to="next@example.net")
    assert server.connections == (2 if code == 421 else 1)  # only a 421 costs the connection


@pytest.mark.parametrize("kind", ["self-signed", "unknown-ca", "wrong-host"])
def test_bad_certificate_is_502_and_no_credentials_are_sent(client, tokens, servers, ca, kind):
    bad = servers(server_context=bad_tls_context(kind, ca))
    _use(client, tokens, bad)
    r, elapsed = _send(client, tokens)
    assert elapsed < BOUND
    assert r.status_code == 502 and r.json["bounce"] is None
    assert r.json["error"].startswith("SMTP send failed: TLS certificate verification failed")
    assert bad.count("STARTTLS") == 1 and bad.count("AUTH") == 0 and bad.auth_attempts == []
    assert _record(client, tokens, r.json["messageId"])["status"] == "failed"
    healthy = servers()
    _use(client, tokens, healthy)
    _assert_recovers(client, tokens, healthy)
    assert bad.messages == []


def test_no_starttls_is_502_unless_tls_is_not_required(client, tokens, servers):
    plain = servers("plain")
    _use(client, tokens, plain)
    r, _ = _send(client, tokens)
    assert r.status_code == 502 and r.json["bounce"] is None
    assert "does not offer STARTTLS" in r.json["error"]
    assert plain.count("AUTH") == 0 and plain.count("MAIL") == 0
    assert _record(client, tokens, r.json["messageId"])["status"] == "failed"
    _use(client, tokens, plain, requireTls=False)  # the account accepts a plain server
    _assert_recovers(client, tokens, plain)
    assert plain.messages[0].tls is False and plain.auth_attempts == [(SMTP_USER, True)]


@pytest.mark.parametrize("reply", [None, "421 4.4.2 idle timeout"], ids=["silent", "421"])
def test_idle_connection_dropped_by_the_server_is_replaced(app, client, tokens, server, reply):
    _use(client, tokens, server)
    first, _ = _send(client, tokens)
    assert first.status_code == 200, first.json
    assert server.active == 1  # the pooled connection, idle now
    server.time_out_idle(reply)  # the server's idle timeout, fired now rather than on a timer
    assert server.wait_until(lambda: server.active == 0)  # the pooled connection was dropped
    assert server.commands.count((1, "IDLE-TIMEOUT")) == 1
    second, elapsed = _send(client, tokens)
    assert second.status_code == 200, second.json
    assert elapsed < BOUND
    assert app.extensions["smtp_service"].pool.stats()["retried"] == 1
    for r in (first, second):
        assert _record(client, tokens, r.json["messageId"])["status"] == "sent"
        _assert_delivered_once(server, r.json["messageId"])
    assert len(server.messages) == 2 and server.connections == 2


def test_dropping_one_connection_in_three_under_concurrent_requests(app, tokens, server):
    """Whatever fails, each answer matches the server: 200 = delivered once and recorded
    "sent"; 502 = not delivered and recorded "failed"."""
    client = app.test_client()
    _use(client, tokens, server)
    server.fault("rcpt", "delay", seconds=0.05)  # requests overlap, so 3 connections open
    server.fault("content", "close", every=3)
    answers: list[tuple[int, dict]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def work() -> None:
        own = app.test_client()
        barrier.wait()
        for _ in range(3):
            r, elapsed = _send(own, tokens)
            assert elapsed < BOUND
            with lock:
                answers.append((r.status_code, r.json))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 18
    delivered = _ids(server.messages)
    for status, body in answers:
        record = _record(client, tokens, body["messageId"])
        if status == 200:
            assert record["status"] == "sent"
            assert delivered.count(f"<{body['messageId']}>") == 1
        else:
            assert status == 502 and body["bounce"] is None and record["status"] == "failed"
            assert f"<{body['messageId']}>" not in delivered
    assert {status for status, _ in answers} == {200, 502}
    assert len(server.unanswered) == sum(1 for status, _ in answers if status == 502)
    everything = delivered + _ids(server.unanswered)
    assert len(everything) == len(set(everything))
    assert server.max_active <= 3  # SMTP_POOL_SIZE


def test_a_final_reply_slower_than_the_command_timeout_is_a_200(client, tokens, server):
    """Issue #10, case 3: content filters answer the final dot late (15 s, 90 s are common).
    The reply after the final dot has its own timeout (RFC 5321 4.5.3.2.6), longer than the
    command timeout: here 2 s against 1.5, the issue's 15 s against 10."""
    _use(client, tokens, server)
    server.fault("content", "delay", seconds=2.0)
    r, elapsed = _send(client, tokens)
    assert r.status_code == 200, r.json
    assert elapsed >= 2.0
    assert _record(client, tokens, r.json["messageId"])["status"] == "sent"
    _assert_delivered_once(server, r.json["messageId"])


# -- defects found by these tests, fixed in mailer.py and transport.py ----------------------------


def test_retry_after_an_uncertain_failure_is_not_delivered_again(client, tokens, server):
    _use(client, tokens, server)
    server.fault("content", "close", times=1)
    key = {"Idempotency-Key": "order-7"}
    first, _ = _send(client, tokens, http_headers=key)
    assert first.status_code == 502
    again, _ = _send(client, tokens, http_headers=key)
    assert again.json == first.json  # the first answer replayed, nothing sent
    assert len(server.unanswered) + len(server.messages) == 1
    assert first.json["uncertain"] is True and "may have accepted it" in first.json["error"]


def test_a_421_greeting_is_reported_with_its_reply(client, tokens, server):
    _use(client, tokens, server)
    server.fault("connect", "421 4.3.2 Too many connections")
    r, _ = _send(client, tokens)
    assert r.status_code == 502 and "421 4.3.2 Too many connections" in r.json["error"]


def test_a_refused_sender_does_not_suppress_the_recipients(client, tokens, server):
    _use(client, tokens, server)
    server.fault("mail", "550 5.7.1 Sender address rejected", times=1)
    r, _ = _send(client, tokens)
    assert r.status_code == 502 and r.json["bounce"]["type"] == "hard"
    assert client.get("/api/suppressions", headers=tokens.headers()).json["suppressions"] == []
