"""SSRF through a user-supplied SMTP host, end to end: saving, testing and sending all refuse every
non-public address with one text, and no TCP connection is ever opened to it.

The app here has NO allowlist (conftest's app_config allowlists loopback for the other tests).
A real aiosmtpd server listens on loopback at the port every hostile host names, and counts the
connections it accepts; socket.create_connection is wrapped to record every address dialled (and
to refuse anything but loopback, so that a bypass fails fast and offline instead of reaching out).

DNS: there is no DNS server to control in an offline test run, so names are resolved by a fake
socket.getaddrinfo (names of the .test TLD only; everything else goes to the real resolver).
netguard and smtplib both look the function up on the socket module at call time, so the fake
sees every resolution the service makes.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from smtp_service import create_app
from smtp_service.services.netguard import REFUSED_TEXT
from smtp_service.timestamps import iso_utc
from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.security import count_connections

PUBLIC_IP = "93.184.216.34"  # never actually dialled: the wrapper refuses non-loopback
SAVE_REFUSED = {"error": "Validation failed", "details": {"host": [REFUSED_TEXT]}}
TEST_REFUSED = {"success": False, "error": f"SMTP connection test failed: {REFUSED_TEXT}"}

LITERALS = [
    "2130706433",  # decimal
    "0177.0.0.1",  # octal
    "0x7f000001",  # hex
    "0x7f.1",
    "127.1",  # short form
    "127.0.0.1",
    "127.255.255.254",
    "0",
    "0.0.0.0",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",  # carrier-grade NAT
    "100.127.255.254",
    "169.254.169.254",  # cloud metadata
    "198.18.0.1",
    "224.0.0.1",
    "255.255.255.255",
    "::1",
    "0:0:0:0:0:0:0:1",
    "::",
    "fd00::1",  # ULA
    "fc00::1",
    "fe80::1",  # link-local
    "fec0::1",
    "ff02::1",
    "::ffff:10.0.0.1",  # IPv4-mapped
    "::ffff:7f00:1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::127.0.0.1",  # IPv4-compatible
    "64:ff9b::a00:1",  # NAT64
    "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::a00:1",
    "2002:0a00:0001::",  # 6to4
    "2002:7f00:1::",
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo to 127.0.0.1
    "localhost",
    "[::1]",
    "[::ffff:127.0.0.1]",
]

NAMES: dict[str, list[str]] = {
    "loopback.example.test": ["127.0.0.1"],
    "internal.example.test": ["10.0.0.5"],
    "metadata.example.test": ["169.254.169.254"],
    "cgnat.example.test": ["100.64.0.1"],
    "v6-loopback.example.test": ["::1"],
    "ula.example.test": ["fd12:3456::1"],
    "mapped.example.test": ["::ffff:127.0.0.1"],
    "nat64.example.test": ["64:ff9b::a9fe:a9fe"],
    "public-then-private.example.test": [PUBLIC_IP, "127.0.0.1"],
    "private-then-public.example.test": ["10.0.0.5", PUBLIC_IP],
    "v6-public-and-ula.example.test": ["2606:4700:4700::1111", "fd00::1"],
}


class FakeDns:
    """getaddrinfo for *.test names; each name answers from its queue, the last answer repeats.
    An answer is a list of addresses, or an exception to raise."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.answers: dict[str, list[Any]] = {}
        self.calls: list[str] = []

    def set(self, name: str, *answers: Any) -> None:
        self.answers[name] = list(answers)

    def __call__(self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,
                 flags: int = 0) -> list[tuple[Any, ...]]:
        name = host.lower().rstrip(".") if isinstance(host, str) else host
        if not (isinstance(name, str) and name.endswith(".test")):
            return self.real(host, port, family, type, proto, flags)
        self.calls.append(name)
        queue = self.answers.get(name)
        if not queue:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, BaseException):
            raise answer
        infos = []
        for address in answer:
            if ipaddress.ip_address(address).version == 6:
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return infos


@pytest.fixture
def dns(monkeypatch) -> FakeDns:
    fake = FakeDns(socket.getaddrinfo)
    for name, addresses in NAMES.items():
        fake.set(name, addresses)
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return fake


@pytest.fixture
def dials(monkeypatch) -> list[tuple[str, int]]:
    """Every address socket.create_connection is asked to dial; only loopback goes through."""
    real = socket.create_connection
    seen: list[tuple[str, int]] = []

    def create_connection(address, *args, **kwargs):
        seen.append((address[0], address[1]))
        try:
            loopback = ipaddress.ip_address(address[0]).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return real(address, *args, **kwargs)
        raise ConnectionRefusedError(111, "Connection refused (test: no network)")

    monkeypatch.setattr(socket, "create_connection", create_connection)
    return seen


@pytest.fixture
def target(smtp_factory):
    """The loopback server an SSRF would reach, and the connections it accepted."""
    server = smtp_factory("starttls")
    return server, count_connections(server)


@pytest.fixture
def global_seen(global_server) -> list[object]:
    return count_connections(global_server)


@pytest.fixture
def guarded(app_config) -> Iterator[Any]:
    """The app with no allowlist: only public addresses are allowed for accounts."""
    app = create_app({**app_config, "SMTP_HOST_ALLOWLIST": ""})
    assert app.config["SMTP_HOST_ALLOWLIST"] == ()
    yield app
    app.extensions["smtp_service"].pool.close_all()


def _body(host: str, port: int) -> dict[str, Any]:
    return {"host": host, "port": port, "secure": False, "user": SMTP_USER, "pass": SMTP_PASSWORD}


def _store_directly(app, account: str, host: str, port: int) -> None:
    """Settings as a file written by hand (or by the old system): no check on the way in."""
    services = app.extensions["smtp_service"]
    services.files.write(account, "smtp-settings.json", {
        "host": host,
        "port": port,
        "secure": False,
        "user": SMTP_USER,
        "pass": services.box.encrypt(account, SMTP_PASSWORD),
        "requireTls": True,
        "updatedAt": iso_utc(),
        "updatedBy": "someone",
    })


def _send(client, tokens):
    return client.post(
        "/api/messages/send-email",
        json={"from": SMTP_USER, "to": "rcpt@example.net", "subject": "s", "text": "t"},
        headers=tokens.headers(),
    )


def _assert_send_refused(r) -> None:
    assert r.status_code == 502, r.json
    assert r.json["success"] is False and r.json["transport"] == "custom"
    assert r.json["error"] == f"SMTP send failed: {REFUSED_TEXT}"
    assert r.json["bounce"] is None


def _check_everywhere(guarded, tokens, host: str, port: int) -> None:
    client = guarded.test_client()
    r = client.post("/api/smtp/settings", json=_body(host, port), headers=tokens.headers())
    assert (r.status_code, r.json) == (400, SAVE_REFUSED)
    assert client.get("/api/smtp/settings", headers=tokens.headers()).json["isGlobal"] is True
    r = client.post("/api/smtp/test", json=_body(host, port), headers=tokens.headers())
    assert (r.status_code, r.json) == (400, TEST_REFUSED)
    _store_directly(guarded, "acct-a", host, port)
    assert client.get("/api/smtp/settings", headers=tokens.headers()).json["host"] == host
    _assert_send_refused(_send(client, tokens))


@pytest.mark.parametrize("host", LITERALS)
def test_non_public_literal_is_refused_everywhere(guarded, tokens, target, global_seen, dials,
                                                  host):
    server, seen = target
    _check_everywhere(guarded, tokens, host, server.port)
    assert dials == [] and seen == [] and global_seen == []


@pytest.mark.parametrize("name", [*sorted(NAMES), "LoopBack.Example.TEST."])
def test_name_resolving_to_a_non_public_address_is_refused_everywhere(
    guarded, tokens, target, global_seen, dials, dns, name
):
    server, seen = target
    _check_everywhere(guarded, tokens, name, server.port)
    assert dials == [] and seen == [] and global_seen == []
    # save, test, send: each resolved and checked
    assert dns.calls.count(name.lower().rstrip(".")) == 3


def test_the_detectors_see_a_real_connection(client, tokens, target, dials):
    """Control: with conftest's loopback allowlist the same request does reach the server, so
    the zero counts above mean that nothing connected."""
    server, seen = target
    r = client.post("/api/smtp/test", json=_body("127.0.0.1", server.port),
                    headers=tokens.headers())
    assert r.json == {"success": True, "message": "SMTP connection test successful"}
    assert len(seen) == 1 and dials == [("127.0.0.1", server.port)]


def test_rebinding_within_one_connection_dials_the_checked_address(
    guarded, tokens, target, dials, dns
):
    """First answer public, every later one loopback: the test connection resolves once, checks
    that answer and dials it; nothing asks DNS again before connecting."""
    server, seen = target
    dns.set("rebind.example.test", [PUBLIC_IP], ["127.0.0.1"])
    r = guarded.test_client().post("/api/smtp/test", json=_body("rebind.example.test",
                                                                server.port),
                                   headers=tokens.headers())
    assert r.status_code == 400 and r.json["success"] is False
    assert r.json["error"] == (
        f"SMTP connection test failed: Connection refused by rebind.example.test:{server.port}"
    )
    assert dials == [(PUBLIC_IP, server.port)]
    assert dns.calls == ["rebind.example.test"]
    assert seen == []


def test_rebinding_between_save_and_send_is_refused_at_send(
    guarded, tokens, target, global_seen, dials, dns
):
    server, seen = target
    dns.set("rebind.example.test", [PUBLIC_IP], ["127.0.0.1"])
    client = guarded.test_client()
    r = client.post("/api/smtp/settings", json=_body("rebind.example.test", server.port),
                    headers=tokens.headers())
    assert r.status_code == 200, r.json
    _assert_send_refused(_send(client, tokens))
    assert dns.calls == ["rebind.example.test"] * 2
    assert dials == [] and seen == [] and global_seen == []


def test_rebinding_after_the_check_at_send_still_dials_the_checked_address(
    guarded, tokens, target, dials, dns
):
    """Public at save and at send, loopback for any later lookup: the send goes to the public
    address it checked (refused here by the no-network wrapper), never to loopback."""
    server, seen = target
    dns.set("rebind.example.test", [PUBLIC_IP], [PUBLIC_IP], ["127.0.0.1"])
    client = guarded.test_client()
    r = client.post("/api/smtp/settings", json=_body("rebind.example.test", server.port),
                    headers=tokens.headers())
    assert r.status_code == 200, r.json
    r = _send(client, tokens)
    assert r.status_code == 502 and r.json["transport"] == "custom"
    assert r.json["error"] == (
        f"SMTP send failed: Connection refused by rebind.example.test:{server.port}"
    )
    assert dials == [(PUBLIC_IP, server.port)]
    assert dns.calls == ["rebind.example.test"] * 2
    assert seen == []


def test_name_unresolvable_at_save_then_private_is_refused_at_send(
    guarded, tokens, target, global_seen, dials, dns
):
    """A name that does not resolve is accepted on save (README); it is checked at send."""
    server, seen = target
    dns.set("later.example.test", socket.gaierror(socket.EAI_NONAME, "unknown"), ["127.0.0.1"])
    client = guarded.test_client()
    r = client.post("/api/smtp/settings", json=_body("later.example.test", server.port),
                    headers=tokens.headers())
    assert r.status_code == 200, r.json
    _assert_send_refused(_send(client, tokens))
    assert dials == [] and seen == [] and global_seen == []


def test_the_global_server_is_trusted_but_not_an_account_bypass(
    guarded, tokens, global_server, global_seen, dials
):
    """The global server (loopback here) is used without the check; an account naming the same
    loopback host and port is still refused."""
    client = guarded.test_client()
    r = client.post(
        "/api/messages/send-email",
        json={"from": "noreply@example.com", "to": "rcpt@example.net", "subject": "s",
              "text": "t"},
        headers=tokens.headers(),
    )
    assert r.status_code == 200 and r.json["transport"] == "global", r.json
    assert len(global_seen) == 1
    for host in ("localhost", "127.0.0.1"):
        r = client.post("/api/smtp/test", json=_body(host, global_server.port),
                        headers=tokens.headers("acct-b"))
        assert (r.status_code, r.json) == (400, TEST_REFUSED)
    assert len(global_seen) == 1
    assert [d for d in dials if d[1] == global_server.port] == [("127.0.0.1", global_server.port)]
