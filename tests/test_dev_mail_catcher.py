"""DEV_MAIL_CATCHER (set by gunicorn.conf.py when `make run` starts the development mail
catcher): only a loopback address that is also the global server, so that no configuration
with a real SMTP_HOST lets accounts onto loopback; the SSRF guard's exception for it; the
catcher's mailbox reader; and gunicorn.conf.py naming the catcher it started."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from smtp_service.config import ConfigError, load_config
from smtp_service.services.devmailbox import (
    CatcherAddress,
    parse_catcher_address,
    read_mailbox,
    simulated_reply,
)
from smtp_service.services.netguard import HostGuard, HostRefused

REPO = Path(__file__).resolve().parents[1]
OK = {"JWT_SECRET_KEY": "k" * 40}
DEV = {**OK, "SMTP_HOST": "127.0.0.1", "SMTP_PORT": "1025", "DEV_MAIL_CATCHER": "127.0.0.1:1025"}


def test_unset_by_default_and_read_when_it_matches_the_global_server() -> None:
    assert load_config(OK)["DEV_MAIL_CATCHER"] is None
    assert load_config({**OK, "DEV_MAIL_CATCHER": " "})["DEV_MAIL_CATCHER"] is None
    assert load_config(DEV)["DEV_MAIL_CATCHER"] == CatcherAddress("127.0.0.1", 1025)
    ipv6 = {**DEV, "SMTP_HOST": "::1", "DEV_MAIL_CATCHER": "[::1]:1025"}
    assert load_config(ipv6)["DEV_MAIL_CATCHER"] == CatcherAddress("::1", 1025)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"SMTP_HOST": "smtp.example.com"}, "cannot be used with another SMTP_HOST"),
        ({"SMTP_HOST": ""}, "cannot be used with another SMTP_HOST"),
        ({"SMTP_PORT": "2525"}, "cannot be used with another SMTP_HOST"),
        ({"DEV_MAIL_CATCHER": "localhost:1025", "SMTP_HOST": "localhost"}, "loopback IP"),
        ({"DEV_MAIL_CATCHER": "10.0.0.5:1025", "SMTP_HOST": "10.0.0.5"}, "loopback IP"),
        ({"DEV_MAIL_CATCHER": "127.0.0.1"}, "host:port"),
        ({"DEV_MAIL_CATCHER": "127.0.0.1:0"}, "1-65535"),
    ],
)
def test_refused_outside_make_runs_shape(overrides, says) -> None:
    with pytest.raises(ConfigError, match="DEV_MAIL_CATCHER") as caught:
        load_config({**DEV, **overrides})
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_parse_catcher_address() -> None:
    assert str(parse_catcher_address("127.0.0.1:1025")) == "127.0.0.1:1025"
    assert str(parse_catcher_address("[::1]:25")) == "[::1]:25"
    for bad in ("", "1025", "[::1]", "127.0.0.1:x", "example.com:25", "192.0.2.1:25"):
        with pytest.raises(ValueError):
            parse_catcher_address(bad)


def test_the_guard_allows_exactly_the_catchers_address_and_port() -> None:
    guard = HostGuard((), dev_catcher=("127.0.0.1", 2525))
    assert guard.addresses("127.0.0.1", 2525) == ["127.0.0.1"]
    for host, port in (("127.0.0.1", 2526), ("127.0.0.2", 2525), ("10.0.0.1", 2525)):
        with pytest.raises(HostRefused):
            guard.addresses(host, port)
    with pytest.raises(HostRefused):  # without it, loopback is refused as before
        HostGuard(()).addresses("127.0.0.1", 2525)


def test_simulated_reply() -> None:
    assert simulated_reply("rcpt@example.net") is None
    assert simulated_reply("bounce@simulator.invalid.example") is None
    assert simulated_reply("success@simulator.invalid").reply is None
    assert simulated_reply("slow+x@simulator.invalid").delay is True
    full = simulated_reply("Mailbox-Full+a+b@Simulator.Invalid")
    assert full.reply.startswith("552 5.2.2 <Mailbox-Full+a+b@Simulator.Invalid>")
    assert simulated_reply("who@simulator.invalid").reply.startswith("550 5.1.1")


def test_read_mailbox_orders_filters_limits_and_skips_what_it_cannot_read(tmp_path) -> None:
    assert read_mailbox(str(tmp_path / "missing")) == []
    for n, to in enumerate(["a@example.net", "b@example.net, A@example.net", "c@example.net"]):
        path = tmp_path / f"{9 - n}.eml"  # names sort against the order of arrival
        path.write_bytes(
            f"X-Envelope-From: s@example.com\r\nX-Envelope-To: {to}\r\n"
            f"Subject: n{n}\r\nMessage-ID: <m{n}@example.com>\r\n\r\nbody {n}\r\n".encode()
        )
        os.utime(path, ns=(n * 10**9, n * 10**9))
    (tmp_path / "no-envelope.eml").write_bytes(b"Subject: x\r\n\r\nnot the catcher's\r\n")
    (tmp_path / "skip.txt").write_bytes(b"X-Envelope-To: a@example.net\r\n\r\n")
    caught = read_mailbox(str(tmp_path))
    assert [m.subject for m in caught] == ["n0", "n1", "n2"]
    assert caught[1].rcpt_tos == ("b@example.net", "A@example.net")
    assert caught[0].message_id == "m0@example.com" and caught[0].text == "body 0\n"
    assert [m.subject for m in read_mailbox(str(tmp_path), to="a@EXAMPLE.net")] == ["n0", "n1"]
    assert [m.subject for m in read_mailbox(str(tmp_path), limit=1)] == ["n2"]


def test_gunicorn_conf_names_the_catcher_it_starts(tmp_path) -> None:
    """on_starting with no SMTP_HOST: the catcher on DEV_SMTP_PORT, and the environment the
    workers inherit points the global server at it and names it in DEV_MAIL_CATCHER; with an
    SMTP_HOST, neither."""
    script = (
        "import os, runpy, socket, types\n"
        "conf = runpy.run_path('gunicorn.conf.py')\n"
        "log = types.SimpleNamespace(info=lambda *a: None)\n"
        "conf['on_starting'](types.SimpleNamespace(log=log))\n"
        "print(os.environ.get('DEV_MAIL_CATCHER', ''), os.environ.get('SMTP_HOST', ''),"
        " os.environ.get('SMTP_PORT', ''))\n"
        "conf['on_exit'](None)\n"
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SMTP_", "DEV_"))},
        "JWT_SECRET_KEY": "k" * 40,
        "DATA_DIR": str(tmp_path / "data"),
        "DEV_SMTP_PORT": str(port),
        "SMTP_HOST": "",
    }
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=60, check=True,
    ).stdout.split()
    assert out[-3:] == [f"127.0.0.1:{port}", "127.0.0.1", str(port)]
    env.update(SMTP_HOST="smtp.example.com", SMTP_PORT="587")
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=60, check=True,
    ).stdout.split()
    assert out[-2:] == ["smtp.example.com", "587"]  # DEV_MAIL_CATCHER empty: not printed
