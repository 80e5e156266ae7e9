"""A host is normalised once, the way clients of the field do, and that one form is used for the
SSRF check, the connection, SNI and the certificate check: a trailing dot, any letter case, IPv6
in brackets or not, an internationalised name as U-label or A-label. What is not a host is a 400
naming the `host` field.

Every server here is a real aiosmtpd on loopback (STARTTLS required, AUTH) whose certificate,
issued by the test CA, names the host the way certificates do (RFC 6125: no trailing dot,
A-labels); it records the SNI name each client sent. Names under .test are resolved by a fake
getaddrinfo (no DNS server offline); like a real resolver it answers a name with or without its
trailing dot, so what fails without normalisation is the certificate check, as in the issue.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest

from smtp_service import create_app
from smtp_service.config import ConfigError
from smtp_service.services.hostnames import A_URL, NOT_A_HOST, TOO_LONG, WITH_A_PORT
from smtp_service.services.netguard import REFUSED_TEXT
from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.smtpd import SmtpServer

SEND = {"from": SMTP_USER, "to": "rcpt@example.net", "subject": "Hi", "text": "x"}


class FakeDns:
    """getaddrinfo for *.test names (with or without the final dot), everything else real."""

    def __init__(self, real: Any, names: dict[str, str]) -> None:
        self.real = real
        self.names = names
        self.asked: list[str] = []

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.rstrip(".").lower() if isinstance(host, str) else host
        if not (isinstance(name, str) and name.endswith(".test")):
            return self.real(host, port, *args, **kwargs)
        self.asked.append(host)
        if name not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (self.names[name], port))]


@pytest.fixture
def dns(monkeypatch) -> FakeDns:
    fake = FakeDns(
        socket.getaddrinfo,
        {"smtp.example.test": "127.0.0.1", "xn--bcher-kva.test": "127.0.0.1",
         "other.test": "127.0.0.1"},
    )
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return fake


class NamedServer:
    """A STARTTLS + AUTH server whose certificate names `names`; `sni` lists what clients sent."""

    def __init__(self, ca: Any, names: tuple[str, ...], listen: str = "127.0.0.1") -> None:
        self.sni: list[str | None] = []
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*names).configure_cert(context)
        context.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
        self.smtp = SmtpServer(
            mode="starttls",
            users={SMTP_USER: SMTP_PASSWORD},
            server_context=context,
            hostname=listen,
        ).start()

    @property
    def port(self) -> int:
        return self.smtp.port


@pytest.fixture
def named(ca) -> Iterator[Any]:
    started: list[NamedServer] = []

    def _start(*names: str, listen: str = "127.0.0.1") -> NamedServer:
        server = NamedServer(ca, names, listen)
        started.append(server)
        return server

    yield _start
    for server in started:
        server.smtp.stop()


def _body(host: str, port: int) -> dict[str, Any]:
    return {"host": host, "port": port, "secure": False, "user": SMTP_USER, "pass": SMTP_PASSWORD}


def _app(app_config, allowlist: str):
    return create_app({**app_config, "SMTP_HOST_ALLOWLIST": allowlist})


# host as typed, the certificate's names, where the server listens, the allowlist, the one form
FORMS = {
    "trailing dot (the issue)": (
        "smtp.example.test.", ("smtp.example.test",), "127.0.0.1", "127.0.0.1/32",
        "smtp.example.test",
    ),
    "trailing dot and capitals": (
        "SMTP.Example.TEST.", ("smtp.example.test",), "127.0.0.1", "127.0.0.1/32",
        "smtp.example.test",
    ),
    "localhost with a dot": ("localhost.", ("localhost",), "127.0.0.1", "localhost", "localhost"),
    "IDN as a U-label": (
        "bücher.test", ("bücher.test",), "127.0.0.1", "Bücher.test", "xn--bcher-kva.test",
    ),
    "IDN as an A-label, in capitals, with a dot": (
        "XN--BCHER-KVA.TEST.", ("bücher.test",), "127.0.0.1", "bücher.test",
        "xn--bcher-kva.test",
    ),
    "IDN with full-width letters and an ideographic full stop": (
        "ｂüｃｈｅｒ。test", ("bücher.test",), "127.0.0.1", "xn--bcher-kva.test",
        "xn--bcher-kva.test",
    ),
    "IPv6 in brackets": ("[::1]", ("::1",), "::1", "::1/128", "::1"),
    "IPv6 without brackets": ("::1", ("::1",), "::1", "::1/128", "::1"),
    "IPv6 written out": ("0:0:0:0:0:0:0:1", ("::1",), "::1", "::1/128", "::1"),
    "IPv4 short form": ("127.1", ("127.0.0.1",), "127.0.0.1", "127.0.0.1/32", "127.0.0.1"),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_form_of_a_host_reaches_the_server_its_certificate_names(
    app_config, tokens, named, dns, global_server, form
):
    typed, cert_names, listen, allowlist, normal = FORMS[form]
    server = named(*cert_names, listen=listen)
    app = _app(app_config, allowlist)
    client = app.test_client()

    r = client.post("/api/smtp/test", json=_body(typed, server.port), headers=tokens.headers())
    assert r.json == {"success": True, "message": "SMTP connection test successful"}, r.json

    r = client.post("/api/smtp/settings", json=_body(typed, server.port),
                    headers=tokens.headers())
    assert r.status_code == 200, r.json
    assert r.json["settings"]["host"] == normal  # stored once, in the one form
    assert client.get("/api/smtp/settings", headers=tokens.headers()).json["host"] == normal

    r = client.post("/api/messages/send-email", json=SEND, headers=tokens.headers())
    assert r.status_code == 200 and r.json["transport"] == "custom", r.json
    assert len(server.smtp.messages) == 1 and server.smtp.messages[0].tls
    assert global_server.messages == []
    # SNI: the A-label name without its dot; none for an address (RFC 6066 3)
    is_address = _is_address(normal)
    assert set(server.sni) == ({None} if is_address else {normal}), server.sni
    if not is_address and normal.endswith(".test"):
        assert set(dns.asked) == {normal}  # the SSRF check resolved the one form
    app.extensions["smtp_service"].pool.close_all()


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def test_the_ssrf_check_sees_the_normalised_name(app_config, tokens, named, dns):
    """Allowlisted by name as "Bücher.test": every spelling of it is allowed, no other name
    on the same address is."""
    server = named("bücher.test", "other.test")
    app = _app(app_config, "Bücher.test")
    client = app.test_client()
    for typed in ("bücher.test", "XN--BCHER-KVA.test", "Bücher.TEST."):
        r = client.post("/api/smtp/test", json=_body(typed, server.port),
                        headers=tokens.headers())
        assert r.json["success"] is True, (typed, r.json)
    r = client.post("/api/smtp/settings", json=_body("other.test", server.port),
                    headers=tokens.headers())
    assert (r.status_code, r.json) == (
        400, {"error": "Validation failed", "details": {"host": [REFUSED_TEXT]}}
    )
    app.extensions["smtp_service"].pool.close_all()


def test_a_stored_host_in_another_form_is_used_in_the_one_form(
    named, dns, app, tokens, global_server
):
    """A file written by hand or by the old service: shown as stored, connected normalised."""
    server = named("smtp.example.test")
    services = app.extensions["smtp_service"]
    services.files.write("acct-a", "smtp-settings.json", {
        "host": "SMTP.Example.Test.",
        "port": server.port,
        "secure": False,
        "user": SMTP_USER,
        "pass": SMTP_PASSWORD,
    })
    client = app.test_client()
    view = client.get("/api/smtp/settings", headers=tokens.headers()).json
    assert view["host"] == "SMTP.Example.Test." and view["isGlobal"] is False
    r = client.post("/api/messages/send-email", json=SEND, headers=tokens.headers())
    assert r.status_code == 200 and r.json["transport"] == "custom", r.json
    assert server.sni == ["smtp.example.test"] and len(server.smtp.messages) == 1
    services.pool.close_all()  # QUIT before the server stops


NOT_HOSTS = {
    "smtp.example.com:587": WITH_A_PORT,  # the issue: saved with 200, then 502 on every send
    "[2001:db8::1]:587": WITH_A_PORT,
    "192.0.2.10:25": WITH_A_PORT,
    "smtp://smtp.example.com": A_URL,
    "https://smtp.example.com/": A_URL,
    "user@example.com": A_URL,
    "smtp example.com": NOT_A_HOST,
    "smtp..example.com": NOT_A_HOST,
    ".example.com": NOT_A_HOST,
    "example.com..": NOT_A_HOST,
    "-smtp.example.com": NOT_A_HOST,
    "smtp-.example.com": NOT_A_HOST,
    "a" * 64 + ".example.com": NOT_A_HOST,
    "example.123": NOT_A_HOST,
    "256.0.0.1": NOT_A_HOST,
    "1.2.3.4.5": NOT_A_HOST,
    "fe80::1%eth0": NOT_A_HOST,
    "[smtp.example.com]": NOT_A_HOST,
    "[::1": NOT_A_HOST,
    "xn--zz.example.com": NOT_A_HOST,  # an A-label that decodes to nothing valid
    "\u200b.example.com": NOT_A_HOST,
    "smtp.\u2028example.com": NOT_A_HOST,
    "smtp.example.com\x00": "Must not contain NUL characters.",
    "a." * 127 + "com": TOO_LONG,
}


@pytest.mark.parametrize("host", sorted(NOT_HOSTS))
def test_what_is_not_a_host_is_a_400_naming_the_field(client, tokens, host):
    expected = {"error": "Validation failed", "details": {"host": [NOT_HOSTS[host]]}}
    for path in ("/api/smtp/settings", "/api/smtp/test"):
        r = client.post(path, json=_body(host, 587), headers=tokens.headers())
        assert (r.status_code, r.json) == (400, expected), (path, r.json)
    assert client.get("/api/smtp/settings", headers=tokens.headers()).json["isGlobal"] is True


def test_the_global_host_is_normalised_too(app_config, tokens, global_server):
    app = create_app({**app_config, "SMTP_HOST": "LocalHost."})
    assert app.config["SMTP_HOST"] == "localhost"
    r = app.test_client().post(
        "/api/messages/send-email",
        json={**SEND, "from": "noreply@example.com"},
        headers=tokens.headers(),
    )
    assert r.status_code == 200 and r.json["transport"] == "global", r.json
    app.extensions["smtp_service"].pool.close_all()
    with pytest.raises(ConfigError, match="SMTP_HOST 'smtp.example.com:587' is not a host"):
        create_app({**app_config, "SMTP_HOST": "smtp.example.com:587"})
