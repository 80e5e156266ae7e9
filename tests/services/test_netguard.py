"""SSRF guard: which addresses a user-supplied host may resolve to."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from smtp_service.services.netguard import REFUSED_TEXT, HostGuard, HostRefused, is_public

REFUSED = [
    "127.0.0.1",
    "127.8.9.10",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "fec0::1",
    "ff02::1",
    "2001:db8::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::127.0.0.1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b::7f00:1",
    "64:ff9b:1::a00:1",
    "2002:7f00:1::",
    "2002:a9fe:a9fe::1",
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo to 127.0.0.1
]
ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
]


@pytest.mark.parametrize("address", REFUSED)
def test_refused_addresses(address):
    assert is_public(ipaddress.ip_address(address)) is False


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses(address):
    assert is_public(ipaddress.ip_address(address)) is True


@pytest.mark.parametrize("literal", ["2130706433", "0177.0.0.1", "0x7f.1", "127.1", "[::1]"])
def test_numeric_spellings_of_loopback_are_refused(literal):
    host = literal.strip("[]")
    with pytest.raises(HostRefused) as info:
        HostGuard().resolve(host, 25)
    assert str(info.value) == REFUSED_TEXT


def test_a_name_with_any_private_address_is_refused(monkeypatch):
    def fake(host, port, *args, **kwargs):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with pytest.raises(HostRefused):
        HostGuard().resolve("mixed.example", 25)


def test_allowlist_by_cidr_and_name():
    assert HostGuard(("127.0.0.0/8",)).resolve("127.0.0.1", 25) == "127.0.0.1"
    assert HostGuard(("localhost",)).resolve("localhost", 25) == "127.0.0.1"
    with pytest.raises(HostRefused):
        HostGuard(("10.0.0.0/8",)).resolve("127.0.0.1", 25)


def test_trusted_global_server_skips_the_check():
    assert HostGuard().resolve("127.0.0.1", 25, trusted=True) == "127.0.0.1"


@pytest.mark.parametrize(
    "host",
    ["10.1.2.3", "192.168.0.10", "169.254.169.254", "::ffff:7f00:1", "167772161", "0xa000001"],
)
def test_refused_host_on_save_and_test_with_one_error_text(client, tokens, host):
    body = {"host": host, "port": 25, "user": "u", "pass": "p"}
    r = client.post("/api/smtp/settings", json=body, headers=tokens.headers())
    assert r.status_code == 400
    assert r.json == {"error": "Validation failed", "details": {"host": [REFUSED_TEXT]}}
    r = client.post("/api/smtp/test", json=body, headers=tokens.headers())
    assert r.status_code == 400
    assert r.json == {"success": False, "error": f"SMTP connection test failed: {REFUSED_TEXT}"}
