"""Timeouts per stage (RFC 5321 section 4.5.3.2), a deadline per operation and limits on a
reply, against real servers on loopback: a server that trickles continuation lines, one that
answers every command just in time, an endless greeting, and what SMTP_TIMEOUT still means."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from smtp_service import create_app
from smtp_service.config import load_config
from smtp_service.services.netguard import HostGuard
from smtp_service.services.transport import (
    MAX_REPLY_BYTES,
    MAX_REPLY_LINE,
    Secret,
    SmtpEndpoint,
    Timeouts,
    TransportError,
    check_connection,
    connect,
)
from tests.conftest import SMTP_PASSWORD, SMTP_USER, settings_body
from tests.smtpd_faults import ScriptedServer

GUARD = HostGuard(("127.0.0.1/32", "localhost"))
SHORT = Timeouts(connect=1.0, command=1.0, final_reply=1.0, operation=30.0)


@pytest.fixture
def scripted():
    """Start ScriptedServers; each is stopped at the end of the test."""
    made: list[ScriptedServer] = []

    def _start(script) -> ScriptedServer:
        server = ScriptedServer(script).start()
        made.append(server)
        return server

    yield _start
    for server in made:
        server.stop()


def _endpoint(port: int, **kwargs) -> SmtpEndpoint:
    return SmtpEndpoint("localhost", port, False, SMTP_USER, Secret(SMTP_PASSWORD), **kwargs)


def _trickle(owner_seconds: float = 8.0):
    """A greeting whose continuation lines come every 0.2 s; complete after `owner_seconds`."""

    def script(sock) -> None:
        ends = time.monotonic() + owner_seconds
        while time.monotonic() < ends:
            sock.sendall(b"220-still greeting you\r\n")
            time.sleep(0.2)
        sock.sendall(b"220 done\r\n")
        sock.recv(1024)

    return script


# -- a reply is bounded in time as a whole, not line by line ------------------------------------


def test_a_trickled_greeting_is_cut_off_at_the_command_timeout(scripted):
    """Each line comes well within the 1 s timeout; smtplib, whose timeout is per read, waited
    the whole 8 s. The reply as a whole gets the command timeout."""
    server = scripted(_trickle())
    started = time.monotonic()
    with pytest.raises(TransportError) as failure:
        connect(_endpoint(server.port), guard=GUARD, timeouts=SHORT)
    assert time.monotonic() - started < 2.0
    assert failure.value.kind == "timeout"
    assert failure.value.text == f"Timed out talking to localhost:{server.port}"


def test_the_connection_test_cuts_off_a_trickled_greeting(app_config, tokens, scripted):
    server = scripted(_trickle())
    app = create_app({**app_config, "SMTP_TIMEOUT": "1"})
    started = time.monotonic()
    r = app.test_client().post("/api/smtp/test", json=settings_body(server),
                               headers=tokens.headers())
    assert time.monotonic() - started < 2.5
    assert r.status_code == 400
    assert r.json["error"] == (
        f"SMTP connection test failed: Timed out talking to localhost:{server.port}"
    )


# -- the operation's deadline --------------------------------------------------------------------


def _slow_but_in_time(servers, seconds: float = 0.6):
    """A server that answers the greeting and every command of a connection test after
    `seconds`: each reply in time, all of them together not."""
    server = servers()
    for stage in ("connect", "ehlo", "starttls", "auth"):
        server.fault(stage, "delay", seconds=seconds)
    return server


def test_the_deadline_bounds_a_connection_test(servers):
    server = _slow_but_in_time(servers)
    timeouts = Timeouts(connect=1.0, command=1.0, final_reply=1.0, operation=1.5)
    started = time.monotonic()
    with pytest.raises(TransportError) as failure:
        check_connection(_endpoint(server.port), guard=GUARD, timeouts=timeouts)
    assert time.monotonic() - started < 2.0  # five replies of 0.6 s would take 3 s
    assert failure.value.kind == "timeout"
    assert server.auth_attempts == []


def test_without_a_deadline_the_same_server_passes(servers):
    """The counterpart: each stage in time, nothing cut off."""
    server = _slow_but_in_time(servers, seconds=0.3)
    check_connection(_endpoint(server.port), guard=GUARD, timeouts=SHORT)
    assert server.auth_attempts == [(SMTP_USER, True)]


def test_smtp_deadline_bounds_the_connection_test_endpoint(app_config, tokens, servers):
    server = _slow_but_in_time(servers)
    app = create_app({**app_config, "SMTP_TIMEOUT": "1", "SMTP_DEADLINE": "1.5"})
    started = time.monotonic()
    r = app.test_client().post("/api/smtp/test", json=settings_body(server),
                               headers=tokens.headers())
    assert time.monotonic() - started < 2.5
    assert r.status_code == 400 and "Timed out talking to localhost" in r.json["error"]


def test_smtp_deadline_bounds_a_send(app_config, tokens, servers):
    """MAIL, RCPT and DATA each answered after 0.7 s, within the 1 s command timeout: the
    deadline of 1.5 s ends the send while DATA's reply is awaited, before any content went
    out, so the failure is certain (not "uncertain") and nothing was delivered."""
    server = servers()
    app = create_app({**app_config, "SMTP_TIMEOUT": "1", "SMTP_DEADLINE": "1.5"})
    try:
        client = app.test_client()
        r = client.post("/api/smtp/settings", json=settings_body(server),
                        headers=tokens.headers())
        assert r.status_code == 200
        for stage in ("mail", "rcpt", "data"):
            server.fault(stage, "delay", seconds=0.7)
        started = time.monotonic()
        r = client.post("/api/messages/send-email", headers=tokens.headers(), json={
            "from": SMTP_USER, "to": "rcpt@example.net", "subject": "s", "text": "t"})
        # Without the deadline the send would take about 2.2 s and succeed (200): the 502 with
        # "timeout" below is the proof; the time bound only catches a send that hangs on.
        assert time.monotonic() - started < 4.5
        assert r.status_code == 502, r.json
        assert r.json["category"] == "timeout" and r.json["temporary"] is True
        assert "uncertain" not in r.json
        assert server.messages == [] and server.unanswered == []
    finally:
        app.extensions["smtp_service"].pool.close_all()


# -- limits on a reply ---------------------------------------------------------------------------

HUNDRED_MB = 100 * 1024 * 1024


def _endless(line: bytes):
    """A greeting of 100 MB: `line` again and again."""

    def script(sock) -> None:
        block = line * (1024 * 1024 // len(line))
        sent = 0
        while sent < HUNDRED_MB:
            sock.sendall(block)
            sent += len(block)

    return script


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (b"220-" + b"x" * 1018 + b"\r\n",
         f"reply longer than 100 lines or {MAX_REPLY_BYTES} bytes"),
        (b"x" * 4096, f"reply line longer than {MAX_REPLY_LINE} bytes"),
    ],
    ids=["endless-continuation-lines", "one-endless-line"],
)
def test_a_100_mb_greeting_is_refused_quickly_in_little_memory(scripted, line, says):
    """smtplib keeps every continuation line of a reply: a greeting like this one made a worker
    allocate 461 MiB. Here the reply is refused at its limit and the connection closed."""
    server = scripted(_endless(line))
    tracemalloc.start()
    try:
        started = time.monotonic()
        with pytest.raises(TransportError) as failure:
            connect(_endpoint(server.port), guard=GUARD, timeouts=SHORT)
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 2 * 1024 * 1024, f"{peak / 1024 / 1024:.1f} MiB"
    assert failure.value.kind == "protocol"
    assert failure.value.text == (
        f"Server localhost:{server.port} sent a {says}; the connection was closed"
    )


# -- configuration -------------------------------------------------------------------------------

OK = {"JWT_SECRET_KEY": "k" * 40}


def test_the_stage_timeouts_and_the_deadline_have_their_defaults():
    config = load_config(OK)
    assert config["SMTP_TIMEOUT"] is None
    assert (config["SMTP_CONNECT_TIMEOUT"], config["SMTP_COMMAND_TIMEOUT"]) == (10.0, 30.0)
    assert (config["SMTP_FINAL_REPLY_TIMEOUT"], config["SMTP_DEADLINE"]) == (120.0, 150.0)


def test_smtp_timeout_still_sets_the_connect_and_command_timeouts():
    """A deployment that set SMTP_TIMEOUT keeps it for connecting and for each command; the
    reply to the final dot gets its own, longer timeout (the point of issue #10's case 3)."""
    config = load_config({**OK, "SMTP_TIMEOUT": "7"})
    assert (config["SMTP_CONNECT_TIMEOUT"], config["SMTP_COMMAND_TIMEOUT"]) == (7.0, 7.0)
    assert config["SMTP_FINAL_REPLY_TIMEOUT"] == 120.0
    config = load_config({**OK, "SMTP_TIMEOUT": "7", "SMTP_COMMAND_TIMEOUT": "20"})
    assert (config["SMTP_CONNECT_TIMEOUT"], config["SMTP_COMMAND_TIMEOUT"]) == (7.0, 20.0)


@pytest.mark.parametrize(
    "name", ["SMTP_CONNECT_TIMEOUT", "SMTP_COMMAND_TIMEOUT", "SMTP_FINAL_REPLY_TIMEOUT",
             "SMTP_DEADLINE"]
)
@pytest.mark.parametrize("value", ["0", "-1", "soon", "100000"])
def test_bad_timeouts_stop_start_up(name, value):
    from smtp_service.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config({**OK, name: value})
    assert name in str(caught.value)


def test_an_abandoned_idempotency_claim_is_taken_over_after_the_deadline(app_config, tokens,
                                                                          smtp_server):
    """gthread workers never kill a stuck request, so a claim counts as abandoned once the
    request's own deadline (SMTP_DEADLINE) and a margin have passed; not after a fixed 5
    minutes that assumed gunicorn killed it."""
    from smtp_service.services.domain import SendRequest

    app = create_app({**app_config, "SMTP_DEADLINE": "20"})
    try:
        client = app.test_client()
        assert client.post("/api/smtp/settings", json=settings_body(smtp_server),
                           headers=tokens.headers()).status_code == 200
        body = {"from": SMTP_USER, "to": "rcpt@example.net", "subject": "s", "text": "t"}
        digest = SendRequest(sender=SMTP_USER, to=["rcpt@example.net"], subject="s",
                             text="t").digest()
        services = app.extensions["smtp_service"]
        assert services.idempotency.claim("acct-a", "order-1", digest) == ("new", None)
        headers = {**tokens.headers(), "Idempotency-Key": "order-1"}
        clock = services.database._clock
        abandoned = services.mailer.abandoned_seconds
        assert 20 < abandoned <= 20 + 60
        services.database._clock = lambda: clock() + abandoned - 5
        r = client.post("/api/messages/send-email", json=body, headers=headers)
        assert r.status_code == 409  # still within the first request's deadline and margin
        services.database._clock = lambda: clock() + abandoned + 1
        r = client.post("/api/messages/send-email", json=body, headers=headers)
        assert r.status_code == 200, r.json
        assert len(smtp_server.messages) == 1
    finally:
        app.extensions["smtp_service"].pool.close_all()
