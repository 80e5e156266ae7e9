"""The connection test and transport against real aiosmtpd servers: TLS, AUTH, failures."""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest
import trustme

from smtp_service import create_app
from tests.conftest import SMTP_PASSWORD, settings_body


def _test(client, tokens, body):
    r = client.post("/api/smtp/test", json=body, headers=tokens.headers())
    return r.status_code, r.json


def test_starttls_and_auth_succeed(client, tokens, smtp_server):
    status, body = _test(client, tokens, settings_body(smtp_server))
    assert (status, body) == (200, {"success": True, "message": "SMTP connection test successful"})
    assert smtp_server.auth_attempts == [("mailer@example.com", True)]


def test_implicit_tls_succeeds(client, tokens, smtp_factory):
    server = smtp_factory("implicit")
    status, body = _test(client, tokens, settings_body(server, secure=True))
    assert status == 200 and body["success"] is True
    assert server.auth_attempts == [("mailer@example.com", True)]


def test_wrong_password_fails_clearly_within_the_timeout(client, tokens, smtp_server):
    wrong = SMTP_PASSWORD + "-wrong"
    started = time.monotonic()
    status, body = _test(client, tokens, settings_body(smtp_server, **{"pass": wrong}))
    assert time.monotonic() - started < 3
    assert status == 400 and body["success"] is False
    assert body["error"].startswith("SMTP connection test failed: Authentication failed (535")
    assert wrong not in body["error"] and SMTP_PASSWORD not in body["error"]
    # one attempt with the best mechanism offered (smtplib.login would try PLAIN, then LOGIN)
    assert smtp_server.auth_attempts == [("mailer@example.com", False)]


def test_server_without_starttls_gets_no_credentials(client, tokens, smtp_factory):
    server = smtp_factory("plain")
    status, body = _test(client, tokens, settings_body(server))
    assert status == 400
    assert "does not offer STARTTLS" in body["error"]
    assert server.auth_attempts == []


def test_require_tls_false_allows_a_plain_server(client, tokens, smtp_factory):
    server = smtp_factory("plain")
    status, body = _test(client, tokens, settings_body(server, requireTls=False))
    assert status == 200, body
    assert server.auth_attempts == [("mailer@example.com", True)]


def test_implicit_tls_against_a_starttls_server_is_a_tls_failure(client, tokens, smtp_server):
    status, body = _test(client, tokens, settings_body(smtp_server, secure=True))
    assert status == 400 and "TLS" in body["error"]
    assert smtp_server.auth_attempts == []


@pytest.mark.parametrize("problem", ["untrusted CA", "wrong host name"])
def test_bad_certificate_is_refused_before_login(client, tokens, smtp_factory, problem, ca):
    if problem == "untrusted CA":
        cert = trustme.CA().issue_cert("localhost", "127.0.0.1")
    else:
        cert = ca.issue_cert("mail.other.example")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    server = smtp_factory("starttls", server_context=ctx)
    status, body = _test(client, tokens, settings_body(server))
    assert status == 400
    assert "TLS certificate verification failed" in body["error"]
    assert server.auth_attempts == []


@pytest.fixture
def silent_server():
    """Accepts TCP connections and never says a word (a stalled SMTP server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def _accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(sock.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=_accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    sock.close()


def test_stalled_server_times_out(app_config, tokens, silent_server):
    client = create_app({**app_config, "SMTP_TIMEOUT": "1"}).test_client()
    started = time.monotonic()
    r = client.post(
        "/api/smtp/test",
        headers=tokens.headers(),
        json={"host": "127.0.0.1", "port": silent_server, "user": "u", "pass": "pass-word"},
    )
    elapsed = time.monotonic() - started
    assert r.status_code == 400
    assert r.json["error"] == (
        f"SMTP connection test failed: Timed out talking to 127.0.0.1:{silent_server}"
    )
    assert 0.9 < elapsed < 2.5


def test_refused_connection(client, tokens):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    status, body = _test(
        client, tokens, {"host": "127.0.0.1", "port": port, "user": "u", "pass": "pass-word"}
    )
    assert status == 400
    assert body["error"] == f"SMTP connection test failed: Connection refused by 127.0.0.1:{port}"


def test_unresolvable_host(client, tokens):
    status, body = _test(
        client, tokens, {"host": "no-such-host.invalid", "port": 587, "user": "u", "pass": "p"}
    )
    assert status == 400
    assert body["error"] == (
        "SMTP connection test failed: DNS lookup failed for no-such-host.invalid"
    )


def test_non_ascii_credentials_go_as_utf8_auth_plain(client, tokens, smtp_factory):
    user, password = "jörg@exämple.com", "pässwörd-ünïcode-1"
    server = smtp_factory("starttls", users={user: password})
    status, body = _test(client, tokens, settings_body(server, user=user, **{"pass": password}))
    assert (status, body["success"]) == (200, True), body
    assert server.auth_attempts == [(user, True)]
    status, body = _test(client, tokens,
                         settings_body(server, user=user, **{"pass": password + "x"}))
    assert status == 400 and body["error"].startswith(
        "SMTP connection test failed: Authentication failed (535")
    assert password not in body["error"]
    assert server.auth_attempts[-1] == (user, False)


def test_one_tls_context_is_shared_and_follows_the_trust_store(
    client, tokens, smtp_server, tmp_path, monkeypatch
):
    """Loading the trust store costs milliseconds (about 100 ms for a system bundle), so the
    context is built once; pointing SSL_CERT_FILE elsewhere builds a new one."""
    from smtp_service.services.transport import tls_context

    assert tls_context() is tls_context()
    assert _test(client, tokens, settings_body(smtp_server))[0] == 200
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    status, body = _test(client, tokens, settings_body(smtp_server))
    assert status == 400
    assert "TLS certificate verification failed" in body["error"]
    monkeypatch.undo()
    assert _test(client, tokens, settings_body(smtp_server))[0] == 200
