"""What a server offers and what the client does with it (issue #10's cases 4, 5, 6 and 8), against
real aiosmtpd servers on loopback: a relay without AUTH, AUTH LOGIN only with a non-ASCII
password, one AUTH attempt with the best mechanism, the EHLO name, every resolved address tried,
and 8-bit content to servers with and without 8BITMIME (RFC 6152)."""

from __future__ import annotations

import email
import email.policy
import socket

import pytest

from smtp_service import create_app
from smtp_service.config import ConfigError, load_config
from smtp_service.services.compose import build_message, parse_mailbox
from smtp_service.services.netguard import REFUSED_TEXT, HostGuard
from smtp_service.services.session import seven_bit
from smtp_service.services.transport import (
    Secret,
    SmtpEndpoint,
    TransportError,
    check_connection,
    connect,
)
from tests.conftest import SMTP_PASSWORD, SMTP_USER, settings_body

GUARD = HostGuard(("127.0.0.1/32", "localhost"))
SEND = "/api/messages/send-email"
RELAY_EHLO = {"AUTH"}  # a relay that trusts the client's address: PIPELINING, 8BITMIME, SIZE


@pytest.fixture
def app_config(app_config, servers):
    """`servers` first, so they stop after the app's pool has QUIT."""
    return app_config


def _test(client, tokens, body):
    r = client.post("/api/smtp/test", json=body, headers=tokens.headers())
    return r.status_code, r.json


def _use(client, tokens, server, **overrides):
    r = client.post("/api/smtp/settings", json=settings_body(server, **overrides),
                    headers=tokens.headers())
    assert r.status_code == 200, r.json


def _send(client, tokens, text="Hi", **body):
    payload = {"from": SMTP_USER, "to": "rcpt@example.net", "subject": "Hello", "text": text,
               **body}
    return client.post(SEND, json=payload, headers=tokens.headers())


# -- case 4: a relay that offers no AUTH ---------------------------------------------------------


def test_a_relay_without_auth_passes_the_test_and_says_the_credentials_were_not_used(
    client, tokens, servers
):
    relay = servers(users={}, pipelining=True)
    relay.handler.ehlo_hidden = set(RELAY_EHLO)
    status, body = _test(client, tokens, settings_body(relay))
    assert (status, body) == (200, {
        "success": True,
        "message": "SMTP connection test successful (the server offers no AUTH: the "
                   "credentials were not used)",
        "authenticated": False,
    })
    assert relay.count("AUTH") == 0 and relay.count("STARTTLS") == 1


def test_a_relay_without_auth_takes_the_message_without_it(client, tokens, servers):
    relay = servers(users={}, pipelining=True)
    relay.handler.ehlo_hidden = set(RELAY_EHLO)
    _use(client, tokens, relay)
    r = _send(client, tokens)
    assert r.status_code == 200, r.json
    (received,) = relay.messages
    assert received.auth_login is None and received.tls is True
    assert relay.count("AUTH") == 0


def test_a_relay_without_auth_or_starttls_still_needs_require_tls_false(client, tokens,
                                                                         servers):
    """The TLS rules do not change: no STARTTLS and requireTls (the default) is a failure."""
    relay = servers("plain", users={})
    relay.handler.ehlo_hidden = set(RELAY_EHLO)
    status, body = _test(client, tokens, settings_body(relay))
    assert status == 400 and "does not offer STARTTLS" in body["error"]
    status, body = _test(client, tokens, settings_body(relay, requireTls=False))
    assert (status, body["authenticated"]) == (200, False)


def test_a_server_with_auth_answers_as_the_spec_says(client, tokens, servers):
    server = servers()
    status, body = _test(client, tokens, settings_body(server))
    assert (status, body) == (200, {"success": True, "message": "SMTP connection test successful"})


# -- case 5: AUTH LOGIN only, non-ASCII password -------------------------------------------------

PASSWORT = "Passwört-2024!"


def test_auth_login_only_with_a_non_ascii_password(client, tokens, servers):
    """Microsoft 365's shape: "AUTH LOGIN XOAUTH2". LOGIN with the password's UTF-8 bytes, as
    Nodemailer sends it and Exchange takes it."""
    server = servers(users={SMTP_USER: PASSWORT}, auth_mechanisms=("LOGIN",))
    server.handler.ehlo_auth = "LOGIN XOAUTH2"
    status, body = _test(client, tokens, settings_body(server, **{"pass": PASSWORT}))
    assert (status, body) == (200, {"success": True, "message": "SMTP connection test successful"})
    assert server.auth_attempts == [(SMTP_USER, True)]
    assert server.auth_mechanisms_used == ["LOGIN"]
    _use(client, tokens, server, **{"pass": PASSWORT})
    assert _send(client, tokens).status_code == 200
    assert server.messages[0].auth_login == SMTP_USER


def test_only_mechanisms_it_cannot_use_is_a_clear_auth_failure(client, tokens, servers):
    server = servers(auth_mechanisms=("LOGIN",))
    server.handler.ehlo_auth = "XOAUTH2"
    status, body = _test(client, tokens, settings_body(server))
    assert status == 400
    assert body["error"] == ("SMTP connection test failed: Authentication failed (the server "
                             "offers AUTH XOAUTH2; this service uses PLAIN or LOGIN)")
    assert server.count("AUTH") == 0


# -- case 8: one mechanism, the best offered; a 535 is final -------------------------------------


def test_plain_is_preferred_when_both_are_offered(servers):
    server = servers()  # AUTH LOGIN PLAIN
    endpoint = SmtpEndpoint("localhost", server.port, False, SMTP_USER, Secret(SMTP_PASSWORD))
    found = check_connection(endpoint, guard=GUARD, timeout=3)
    assert found.authenticated and found.tls
    assert server.auth_mechanisms_used == ["PLAIN"]


def test_a_wrong_password_costs_one_auth_attempt(client, tokens, servers):
    """smtplib.login tries PLAIN, then LOGIN: two attempts, each delayed by servers that slow
    failures down (7.6-16 s against Postfix with Dovecot). A 535 is final."""
    server = servers()
    wrong = {"pass": SMTP_PASSWORD + "-wrong"}
    status, body = _test(client, tokens, settings_body(server, **wrong))
    assert status == 400
    assert body["error"].startswith("SMTP connection test failed: Authentication failed (535")
    assert server.count("AUTH") == 1 and server.auth_attempts == [(SMTP_USER, False)]
    _use(client, tokens, server, **wrong)
    r = _send(client, tokens)
    assert r.status_code == 502 and r.json["category"] == "auth"
    assert server.count("AUTH") == 2  # one more, for the send: not two
    assert len(server.auth_attempts) == 2


# -- the EHLO name -------------------------------------------------------------------------------


def test_smtp_ehlo_name_is_what_the_server_is_told(app_config, tokens, servers):
    server = servers()
    app = create_app({**app_config, "SMTP_EHLO_NAME": "mta.example.org"})
    try:
        client = app.test_client()
        assert _test(client, tokens, settings_body(server))[0] == 200
        _use(client, tokens, server)
        assert _send(client, tokens).status_code == 200
    finally:
        app.extensions["smtp_service"].pool.close_all()
    # before and after STARTTLS, for the test and for the send
    assert server.handler.ehlo_names == ["mta.example.org"] * 4


def test_no_name_is_looked_up_per_connection(servers, monkeypatch):
    """smtplib calls socket.getfqdn() for every connection made without a name (and sends an
    address literal such as [127.0.0.1] when it has no dot); the name is given once."""
    server = servers()
    calls = []
    monkeypatch.setattr(socket, "getfqdn", lambda *a: calls.append(a) or "x")
    endpoint = SmtpEndpoint("localhost", server.port, False, SMTP_USER, Secret(SMTP_PASSWORD))
    connect(endpoint, guard=GUARD, timeout=3, ehlo_name="mta.example.org").close()
    assert calls == []
    assert server.handler.ehlo_names == ["mta.example.org"] * 2


@pytest.mark.parametrize(
    ("fqdn", "expected"),
    [("mail.example.net", "mail.example.net"), ("vm", "localhost.localdomain"),
     ("localhost", "localhost.localdomain"), ("192.0.2.7", "localhost.localdomain")],
)
def test_the_default_ehlo_name_is_the_machines_fqdn_or_a_name(monkeypatch, fqdn, expected):
    from smtp_service import config

    monkeypatch.setattr(socket, "getfqdn", lambda *a: fqdn)
    config._machine_name.cache_clear()
    try:
        assert load_config({"JWT_SECRET_KEY": "k" * 40})["SMTP_EHLO_NAME"] == expected
    finally:
        config._machine_name.cache_clear()


@pytest.mark.parametrize("bad", ["two words", "a..b", "-x.example", "[not an ip]", "x" * 300])
def test_a_bad_ehlo_name_stops_start_up(bad):
    with pytest.raises(ConfigError) as caught:
        load_config({"JWT_SECRET_KEY": "k" * 40, "SMTP_EHLO_NAME": bad})
    assert "SMTP_EHLO_NAME" in str(caught.value)


# -- every resolved address, in order, each checked ----------------------------------------------


@pytest.fixture
def dns(monkeypatch):
    """Names of the .test TLD resolve to the addresses given; others as usual."""
    names: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if isinstance(host, str) and host in names:
            return [
                (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (ip, port, 0, 0) if ":" in ip else (ip, port))
                for ip in names[host]
            ]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return names


def test_an_unreachable_first_address_is_passed_over(servers, dns):
    """The name's first answer (IPv6 loopback, where nothing listens) refuses the connection;
    the second is tried, as plain smtplib would, and takes it."""
    server = servers("plain")  # the certificate names localhost, not this name
    dns["two.example.test"] = ["::1", "127.0.0.1"]
    guard = HostGuard(("::1/128", "127.0.0.1/32"))
    endpoint = SmtpEndpoint("two.example.test", server.port, False, SMTP_USER,
                            Secret(SMTP_PASSWORD), require_tls=False)
    conn = connect(endpoint, guard=guard, timeout=3)
    conn.close()
    assert server.connections == 1 and server.auth_attempts == [(SMTP_USER, True)]


def test_every_address_is_checked_not_only_the_one_used(servers, dns):
    server = servers("plain")
    dns["mixed.example.test"] = ["127.0.0.1", "10.0.0.5"]
    endpoint = SmtpEndpoint("mixed.example.test", server.port, False, SMTP_USER,
                            Secret(SMTP_PASSWORD), require_tls=False)
    with pytest.raises(TransportError) as failure:
        connect(endpoint, guard=HostGuard(("127.0.0.1/32",)), timeout=3)
    assert failure.value.kind == "blocked" and failure.value.text == REFUSED_TEXT
    assert server.connections == 0


def test_when_no_address_answers_the_failure_is_the_last_ones(dns):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        dns["none.example.test"] = ["::1", "127.0.0.1"]
        endpoint = SmtpEndpoint("none.example.test", port, False, "u", Secret("p"))
        with pytest.raises(TransportError) as failure:
            connect(endpoint, guard=HostGuard(("::1/128", "127.0.0.1/32")), timeout=3)
    assert failure.value.text == f"Connection refused by none.example.test:{port}"


# -- case 6: 8-bit content and 8BITMIME ----------------------------------------------------------

GRUSS = "Grüße aus Köln"


@pytest.mark.parametrize("pipelining", [False, True], ids=["one command at a time", "pipelined"])
def test_no_8bit_octets_reach_a_server_without_8bitmime(client, tokens, servers, pipelining):
    server = servers(pipelining=pipelining)
    server.handler.ehlo_hidden = {"8BITMIME"}  # PIPELINING, SIZE, AUTH PLAIN LOGIN
    _use(client, tokens, server)
    r = _send(client, tokens, text=GRUSS)
    assert r.status_code == 200, r.json
    (received,) = server.messages
    assert received.data.isascii()
    assert not any(o.startswith("BODY=") for o in received.mail_options)
    message = received.message
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_content() == GRUSS + "\r\n"


@pytest.mark.parametrize("pipelining", [False, True], ids=["one command at a time", "pipelined"])
def test_8bit_content_is_declared_to_a_server_with_8bitmime(client, tokens, servers, pipelining):
    server = servers(pipelining=pipelining)
    _use(client, tokens, server)
    assert _send(client, tokens, text=GRUSS).status_code == 200
    assert _send(client, tokens, text="plain ASCII").status_code == 200
    eight, seven = server.messages
    assert "BODY=8BITMIME" in eight.mail_options and not eight.data.isascii()
    assert eight.message.get_content() == GRUSS + "\r\n"
    assert not any(o.startswith("BODY=") for o in seven.mail_options)


def _message(text: str | None, html: str | None, attachments=()) -> bytes:
    return build_message(
        message_id="m1@example.com", sender=parse_mailbox("a@example.com", "from"),
        to=[parse_mailbox("Jörg <b@example.net>", "to")], cc=[], reply_to=[],
        subject="Grüße", text=text, html=html, headers={"X-Campaign": "spring"},
        attachments=list(attachments), smtputf8=False,
    )


def _bodies(data: bytes) -> list[bytes]:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    return [p.get_payload(decode=True) for p in parsed.walk() if not p.is_multipart()]


@pytest.mark.parametrize(
    ("text", "html", "attachments"),
    [
        (GRUSS, None, ()),
        (GRUSS + "\n.a line with a dot\n" + "ä" * 200, f"<p>{GRUSS}</p>",
         [("notes.txt", "text/plain", "äöü".encode()), ("x.bin", "application/pdf", b"\xff\x00")]),
        ("ASCII text", "<p>ASCII</p>", [("a.txt", "text/plain", b"abc")]),
    ],
    ids=["one-text-part", "alternative-with-attachments", "all-ascii"],
)
def test_seven_bit_keeps_every_body_and_header(text, html, attachments):
    data = _message(text, html, attachments)
    converted = seven_bit(data)
    assert converted.isascii()
    assert _bodies(converted) == _bodies(data)
    # the message's headers as they were, but for the encoding of a re-encoded single part
    head = data.partition(b"\r\n\r\n")[0].split(b"\r\n")
    new_head = converted.partition(b"\r\n\r\n")[0].split(b"\r\n")
    encoding = b"Content-Transfer-Encoding: "
    assert [h for h in new_head if not h.startswith(encoding)] == [
        h for h in head if not h.startswith(encoding)]
    if data.isascii():
        assert converted == data
