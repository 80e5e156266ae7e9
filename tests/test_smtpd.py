"""The test SMTP servers themselves (tests/smtpd.py)."""

from __future__ import annotations

import smtplib

from tests.smtpd import SmtpServer


def test_the_port_is_chosen_when_the_server_binds_it():
    """No port is picked before start (one picked early could be taken by another process
    before the bind: EADDRINUSE under load); the one the system gave is read back."""
    server = SmtpServer(mode="plain")
    assert server.port == 0
    server.start()
    try:
        assert server.port > 0
        with smtplib.SMTP(server.host, server.port, timeout=5) as client:
            assert client.noop()[0] == 250
    finally:
        server.stop()


def test_two_servers_get_two_ports():
    first, second = SmtpServer(mode="plain").start(), SmtpServer(mode="plain").start()
    try:
        assert first.port != second.port
    finally:
        first.stop()
        second.stop()
