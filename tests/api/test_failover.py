"""SMTP health, failover to the global server and the circuit breaker, through the real app
against real SMTP servers on loopback: a closed port (connection refused), a server that takes
the TCP connection and never greets (a timeout), a server that refuses a recipient, and the
global server of conftest. Each runs on SQLite and, with TEST_DATABASE_URL, on PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from email.utils import getaddresses, parseaddr

import pytest

from smtp_service import create_app
from tests.conftest import SMTP_PASSWORD, SMTP_USER, settings_body
from tests.e2e.conftest import free_port as _free_port

RCPT = "rcpt@example.net"
CIRCUIT_FAILURES = 3


@pytest.fixture
def app_config(app_config, servers):
    """A short command timeout (a server that never greets costs 0.5 s), and a breaker that
    opens after CIRCUIT_FAILURES failures for a long while (tests that need a short one set
    their own). Asking for `servers` first starts them before the app and stops them after."""
    return {
        **app_config,
        "SMTP_TIMEOUT": "0.5",
        "SMTP_CIRCUIT_FAILURES": str(CIRCUIT_FAILURES),
        "SMTP_CIRCUIT_SECONDS": "600",
    }


def _save(client, tokens, port: int, account: str = "acct-a", **fields):
    body = {
        "host": "localhost",
        "port": port,
        "secure": False,
        "user": SMTP_USER,
        "pass": SMTP_PASSWORD,
        **fields,
    }
    r = client.post("/api/smtp/settings", json=body, headers=tokens.headers(account))
    assert r.status_code == 200, r.json
    return r.json


def _send(client, tokens, account: str = "acct-a", headers=None, **body):
    payload = {"from": SMTP_USER, "to": RCPT, "subject": "Hello", "text": "Hi", **body}
    return client.post(
        "/api/messages/send-email",
        json=payload,
        headers={**tokens.headers(account), **(headers or {})},
    )


def _health(client, tokens, account: str = "acct-a"):
    r = client.get("/api/smtp/health", headers=tokens.headers(account))
    assert r.status_code == 200, r.json
    return r.json


@contextmanager
def _app_with(app_config, **env: str) -> Iterator:
    """An app of its own: the fixture's config with `env` over it; closed at the end."""
    app = create_app({**app_config, **env})
    try:
        yield app
    finally:
        app.extensions["smtp_service"].pool.close_all()
        app.extensions["smtp_service"].database.dispose()


def _stalling(servers):
    """A server that takes the TCP connection and never says a word (then hangs up)."""
    return servers().fault("connect", "stall", seconds=30)


# -- failover ---------------------------------------------------------------------------------


def test_a_dead_server_fails_over_with_the_from_rewritten(client, tokens, global_server):
    dead = _free_port()
    saved = _save(client, tokens, dead, failover=True)
    assert saved["settings"]["failover"] is True
    r = _send(client, tokens, **{"from": f"Jane Doe <{SMTP_USER}>"})
    assert r.status_code == 200, r.json
    assert r.json["transport"] == "global" and r.json["failover"] is True
    assert r.json["accepted"] == [RCPT]
    [got] = global_server.messages
    assert got.mail_from == "noreply@example.com"
    assert got.rcpt_tos == [RCPT]
    message = got.message
    assert parseaddr(str(message["From"])) == ("Jane Doe via example.com", "noreply@example.com")
    assert getaddresses([str(message["Reply-To"])]) == [("Jane Doe", SMTP_USER)]
    assert message["Message-ID"] == f"<{r.json['messageId']}>"
    record = client.get(f"/api/messages/{r.json['messageId']}", headers=tokens.headers()).json
    assert record["transport"] == "global" and record["status"] == "sent"
    assert record["from"] == SMTP_USER  # the caller's From, as the log names it
    health = _health(client, tokens)
    assert health["failover"] is True and health["transport"] == "custom"
    assert health["custom"]["consecutiveFailures"] == 1
    assert health["custom"]["lastFailureKind"] == "refused"
    assert f"localhost:{dead}" in health["custom"]["lastFailureReason"]
    assert health["global"]["lastSuccessAt"] is not None


def test_a_reply_to_given_by_the_caller_is_kept(client, tokens, global_server):
    _save(client, tokens, _free_port(), failover=True)
    r = _send(client, tokens, replyTo="Support <help@example.org>")
    assert r.status_code == 200 and r.json["failover"] is True, r.json
    message = global_server.messages[0].message
    assert getaddresses([str(message["Reply-To"])]) == [("Support", "help@example.org")]
    rewritten = (f"{SMTP_USER} via example.com", "noreply@example.com")
    assert parseaddr(str(message["From"])) == rewritten


def test_a_from_of_the_global_servers_own_domains_is_not_rewritten(
    app_config, tokens, global_server
):
    with _app_with(app_config, GLOBAL_SENDER_DOMAINS="example.com") as app:
        client = app.test_client()
        _save(client, tokens, _free_port(), failover=True)
        r = _send(client, tokens)
        assert r.status_code == 200 and r.json["failover"] is True, r.json
        [got] = global_server.messages
        assert got.mail_from == SMTP_USER
        assert parseaddr(str(got.message["From"]))[1] == SMTP_USER
        assert got.message["Reply-To"] is None


def test_the_refuse_policy_keeps_the_message_off_the_global_server(
    app_config, tokens, global_server
):
    with _app_with(app_config, SMTP_FAILOVER_FROM="refuse") as app:
        client = app.test_client()
        _save(client, tokens, _free_port(), failover=True)
        r = _send(client, tokens)
        assert r.status_code == 502, r.json
        assert r.json["transport"] == "custom" and r.json["category"] == "refused"
        assert "failover" not in r.json
        assert global_server.messages == []


def test_without_failover_a_dead_server_is_a_502_and_nothing_goes_elsewhere(
    client, tokens, global_server
):
    saved = _save(client, tokens, _free_port())
    assert "failover" not in saved["settings"]  # not set: SMTP_FAILOVER (false) applies
    r = _send(client, tokens)
    assert r.status_code == 502, r.json
    assert r.json["transport"] == "custom" and r.json["category"] == "refused"
    assert global_server.messages == []
    assert _health(client, tokens)["failover"] is False


def test_smtp_failover_is_the_default_and_the_field_overrides_it(app_config, tokens, global_server):
    with _app_with(app_config, SMTP_FAILOVER="true") as app:
        client = app.test_client()
        _save(client, tokens, _free_port())
        assert _send(client, tokens).json["failover"] is True
        settings = client.get("/api/smtp/settings", headers=tokens.headers()).json
        assert "failover" not in settings
        _save(client, tokens, _free_port(), failover=False)
        assert client.get("/api/smtp/settings", headers=tokens.headers()).json["failover"] is False
        assert _send(client, tokens).status_code == 502
        assert len(global_server.messages) == 1


def test_a_recipient_refusal_never_fails_over(client, tokens, smtp_server, global_server):
    _save(client, tokens, smtp_server.port, failover=True)
    r = _send(client, tokens, to="bad-user@example.net")
    assert r.status_code == 502, r.json
    assert r.json["transport"] == "custom" and r.json["bounce"]["code"] == 550
    assert "failover" not in r.json
    assert global_server.messages == []
    assert _health(client, tokens)["custom"]["consecutiveFailures"] == 0


def test_an_uncertain_failure_after_the_content_never_fails_over(
    client, tokens, servers, global_server
):
    custom = servers().fault("content", "close")
    _save(client, tokens, custom.port, failover=True)
    r = _send(client, tokens)
    assert r.status_code == 502 and r.json["uncertain"] is True, r.json
    assert r.json["transport"] == "custom"
    assert global_server.messages == []
    assert len(custom.unanswered) == 1


def test_an_idempotent_retry_of_a_failover_replays_it(client, tokens, global_server):
    _save(client, tokens, _free_port(), failover=True)
    first = _send(client, tokens, headers={"Idempotency-Key": "k-1"})
    again = _send(client, tokens, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 200
    assert again.json == first.json and again.json["failover"] is True
    assert len(global_server.messages) == 1


# -- the circuit breaker ----------------------------------------------------------------------


def _open_circuit(client, tokens, server, count=CIRCUIT_FAILURES):
    """`count` sends that each time out at the greeting (CIRCUIT_FAILURES open the circuit)."""
    for _ in range(count):
        before = server.connections
        r = _send(client, tokens)
        assert r.status_code == 502 and r.json["category"] == "timeout", r.json
        assert server.wait_until(lambda before=before: server.connections == before + 1)


def test_the_circuit_opens_and_answers_at_once_without_contacting_the_server(
    client, tokens, servers, global_server
):
    stalling = _stalling(servers)
    _save(client, tokens, stalling.port)
    _open_circuit(client, tokens, stalling)
    health = _health(client, tokens)["custom"]
    assert health["circuit"] == "open" and health["openUntil"] is not None
    assert health["consecutiveFailures"] == CIRCUIT_FAILURES
    for _ in range(3):
        r = _send(client, tokens)
        assert r.status_code == 503, r.json
        assert 1 <= int(r.headers["Retry-After"]) <= 600
        assert "Retry after" in r.json["error"]
    time.sleep(0.3)  # a connection the app made would have been counted by now
    assert stalling.connections == CIRCUIT_FAILURES
    assert global_server.messages == []
    # the operators' gauge reads the breaker's state from the database
    scraped = client.get("/metrics").get_data(as_text=True)
    assert 'smtp_circuit_open{transport="custom"} 1.0' in scraped, scraped[-2000:]


def test_an_open_circuit_fails_over_without_contacting_the_server(
    client, tokens, servers, global_server
):
    stalling = _stalling(servers)
    _save(client, tokens, stalling.port, failover=True)
    for n in range(CIRCUIT_FAILURES):  # each times out, then goes through the global server
        r = _send(client, tokens)
        assert r.status_code == 200 and r.json["failover"] is True, r.json
        assert stalling.wait_until(lambda n=n: stalling.connections == n + 1)
    r = _send(client, tokens)
    assert r.status_code == 200, r.json
    assert r.json["transport"] == "global" and r.json["failover"] is True
    time.sleep(0.3)
    assert stalling.connections == CIRCUIT_FAILURES
    assert len(global_server.messages) == CIRCUIT_FAILURES + 1


def test_one_probe_among_concurrent_requests_then_the_circuit_closes(
    app_config, tokens, servers, global_server
):
    stalling = _stalling(servers)
    with _app_with(app_config, SMTP_CIRCUIT_SECONDS="0.5") as app:
        client = app.test_client()
        _save(client, tokens, stalling.port)
        _open_circuit(client, tokens, stalling)
        time.sleep(0.6)  # the circuit is due: the next request probes
        answers: list[int] = []
        lock = threading.Lock()

        def send() -> None:
            r = _send(app.test_client(), tokens)
            with lock:
                answers.append(r.status_code)

        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(answers) == [502] + [503] * 5  # the probe timed out; the rest waited
        assert stalling.connections == CIRCUIT_FAILURES + 1
        assert _health(client, tokens)["custom"]["circuit"] == "open"

        stalling.clear()  # the server greets again
        time.sleep(0.6)
        r = _send(client, tokens)
        assert r.status_code == 200 and r.json["transport"] == "custom", r.json
        health = _health(client, tokens)["custom"]
        assert health["circuit"] == "closed" and health["consecutiveFailures"] == 0
        assert health["openUntil"] is None
        assert _send(client, tokens).status_code == 200
        assert len(stalling.messages) == 2


def test_the_circuit_is_shared_by_two_instances_on_one_database(
    app_config, tokens, servers, global_server
):
    """Two apps (two instances: two pools, two breakers, two caches) on the same data folder
    and database: the circuit one opened is open for the other."""
    stalling = _stalling(servers)
    with _app_with(app_config) as first, _app_with(app_config) as second:
        one, two = first.test_client(), second.test_client()
        _save(one, tokens, stalling.port)
        assert _send(two, tokens).status_code == 502  # failure 1, through the second
        _open_circuit(one, tokens, stalling, CIRCUIT_FAILURES - 1)  # the rest, the first
        assert _send(one, tokens).status_code == 503
        time.sleep(1.1)  # a worker trusts its memory of a closed circuit for 1 s at most
        r = _send(two, tokens)
        assert r.status_code == 503, r.json
        time.sleep(0.3)
        assert stalling.connections == CIRCUIT_FAILURES
        assert _health(two, tokens)["custom"]["circuit"] == "open"


def test_saving_new_settings_starts_a_new_circuit(client, tokens, servers, smtp_server):
    stalling = _stalling(servers)
    _save(client, tokens, stalling.port)
    _open_circuit(client, tokens, stalling)
    assert _send(client, tokens).status_code == 503
    _save(client, tokens, smtp_server.port)
    assert _health(client, tokens)["custom"]["circuit"] == "closed"
    assert _send(client, tokens).status_code == 200


# -- health -----------------------------------------------------------------------------------


def test_health_reports_successes_failures_and_latency(client, tokens, servers):
    server = servers()
    before = _health(client, tokens)
    assert before["transport"] == "global" and before["failover"] is False
    assert before["custom"] == {
        "server": None,
        "circuit": "closed",
        "consecutiveFailures": 0,
        "openUntil": None,
        "lastSuccessAt": None,
        "lastFailureAt": None,
        "lastFailureKind": None,
        "lastFailureReason": None,
        "latencyMs": {"p50": None, "p95": None},
    }
    _save(client, tokens, server.port)
    for _ in range(3):
        assert _send(client, tokens).status_code == 200
    health = _health(client, tokens)
    custom = health["custom"]
    assert health["transport"] == "custom" and health["windowSeconds"] == 3600
    assert custom["server"] == f"localhost:{server.port}"
    assert custom["lastSuccessAt"] is not None and custom["lastFailureAt"] is None
    latency = custom["latencyMs"]
    assert latency["p50"] > 0 and latency["p95"] >= latency["p50"]
    assert health["global"]["latencyMs"] == {"p50": None, "p95": None}
    # a failure after the successes: counted from 1, and the last success stays
    server.fault("mail", "close")  # the connection drops: a transport failure
    assert _send(client, tokens).status_code == 502
    custom = _health(client, tokens)["custom"]
    assert custom["consecutiveFailures"] == 1 and custom["lastFailureKind"] == "closed"
    assert custom["lastSuccessAt"] is not None
    assert SMTP_PASSWORD not in str(_health(client, tokens))
    # another account sees none of it
    other = _health(client, tokens, "acct-b")
    assert other["custom"]["lastSuccessAt"] is None and other["custom"]["lastFailureAt"] is None


def test_connection_tests_of_the_saved_server_count(client, tokens, smtp_server):
    dead = _free_port()
    _save(client, tokens, dead)
    body = {**settings_body(smtp_server), "port": dead}
    r = client.post("/api/smtp/test", json=body, headers=tokens.headers())
    assert r.status_code == 400, r.json
    custom = _health(client, tokens)["custom"]
    assert custom["consecutiveFailures"] == 1 and custom["lastFailureKind"] == "refused"
    # a test of other settings (the server about to be saved) is not the account's server
    r = client.post("/api/smtp/test", json=settings_body(smtp_server), headers=tokens.headers())
    assert r.status_code == 200, r.json
    assert _health(client, tokens)["custom"]["lastSuccessAt"] is None
    # once saved, a passing test is a success, and it closes what failures opened
    _save(client, tokens, smtp_server.port)
    r = client.post("/api/smtp/test", json=settings_body(smtp_server), headers=tokens.headers())
    assert r.status_code == 200, r.json
    custom = _health(client, tokens)["custom"]
    assert custom["lastSuccessAt"] is not None and custom["consecutiveFailures"] == 0


def test_health_needs_a_token(client):
    assert client.get("/api/smtp/health").status_code == 401


def test_a_health_store_that_fails_never_fails_a_send(app, client, tokens, smtp_server,
                                                      global_server, monkeypatch):
    """The breaker fails open: a database that cannot be read or written for health answers
    the send as it would have been answered without it (a fake: a real database does not fail
    on cue)."""
    store = app.extensions["smtp_service"].breaker.store

    def broken(*_args, **_kwargs):
        raise OSError("disk I/O error")

    for name in ("circuit", "record_failure", "claim_probe", "close"):
        monkeypatch.setattr(store, name, broken)
    _save(client, tokens, smtp_server.port)
    assert _send(client, tokens).status_code == 200
    assert len(smtp_server.messages) == 1
    _save(client, tokens, _free_port(), failover=True)
    r = _send(client, tokens)
    assert r.status_code == 200 and r.json["failover"] is True, r.json
    assert len(global_server.messages) == 1
