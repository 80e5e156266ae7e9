"""The development mail catcher as `make run` runs it (a real aiosmtpd on loopback, the real
catcher code), through the real app: an account's own server while DEV_MAIL_CATCHER names it,
the mailbox simulator's outcomes and what the service makes of them (answer, bounce
classification, suppression: README "Mailbox simulator" and the bounce table), and the
mailbox served at /api/dev/mailbox."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from smtp_service import create_app
from smtp_service.devmail import make_controller
from smtp_service.services.crypto import new_key
from smtp_service.services.devmailbox import AUTH_FAILURE_USER, SIMULATOR, SIMULATOR_DOMAIN
from tests.conftest import JWT_SECRET, Tokens

SLOW_SECONDS = 0.5  # the catcher's slow accept, shortened for the test (make run: 5 s)
SOFT_BOUNCE_LIMIT = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def catcher(tmp_path) -> Iterator[Any]:
    """The catcher on a free loopback port, writing to DATA_DIR/outbox as under make run."""
    controller = make_controller(
        str(tmp_path / "data" / "outbox"), port=_free_port(), slow_seconds=SLOW_SECONDS
    )
    controller.start()
    yield controller
    controller.stop()


def _config(tmp_path, database_url: str, catcher: Any, **overrides: str) -> dict[str, Any]:
    """What gunicorn.conf.py makes of .env.example under make run: the catcher is the global
    server, named in DEV_MAIL_CATCHER; no SMTP_HOST_ALLOWLIST."""
    config = {
        "TESTING": True,
        "DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": "" if database_url.startswith("sqlite") else database_url,
        "JWT_SECRET_KEY": JWT_SECRET,
        "SMTP_ENCRYPTION_KEYS": new_key(),
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(catcher.port),
        "SMTP_SECURE": "false",
        "SMTP_REQUIRE_TLS": "false",
        "SMTP_FROM": "dev@example.com",
        "SMTP_TIMEOUT": "5",
        "SOFT_BOUNCE_LIMIT": str(SOFT_BOUNCE_LIMIT),
        "DEV_MAIL_CATCHER": f"127.0.0.1:{catcher.port}",
    }
    config.update(overrides)
    return config


@pytest.fixture
def world(tmp_path, database_url, catcher) -> Iterator[Any]:
    app = create_app(_config(tmp_path, database_url, catcher))
    yield app.test_client(), catcher
    app.extensions["smtp_service"].pool.close_all()
    app.extensions["smtp_service"].database.dispose()


def _auth(account: str = "acct-sim") -> dict[str, str]:
    return Tokens().headers(account)


def _settings(catcher: Any, **overrides: Any) -> dict[str, Any]:
    body = {
        "host": "127.0.0.1",
        "port": catcher.port,
        "user": "me@example.com",
        "pass": "any password at all",
        "requireTls": False,
    }
    body.update(overrides)
    return body


def _use_catcher(client: Any, catcher: Any, account: str = "acct-sim") -> None:
    r = client.post("/api/smtp/settings", json=_settings(catcher), headers=_auth(account))
    assert r.status_code == 200, r.get_json()


def _send(client: Any, to: Any, account: str = "acct-sim", sender: str = "me@example.com") -> Any:
    return client.post(
        "/api/messages/send-email",
        json={"from": sender, "to": to, "subject": "Simulated", "text": "Hi"},
        headers=_auth(account),
    )


def _suppressed(client: Any, account: str = "acct-sim") -> list[str]:
    r = client.get("/api/suppressions", headers=_auth(account))
    return [s["email"] for s in r.get_json()["suppressions"]]


def _outbox(client: Any, **query: str) -> list[dict[str, Any]]:
    r = client.get("/api/dev/mailbox", query_string=query, headers=_auth())
    assert r.status_code == 200, r.get_json()
    return r.get_json()["messages"]


# What README's "Mailbox simulator" table documents for each refusing address.
REFUSALS = {
    "bounce": {"code": 550, "enhanced": "5.1.1", "type": "hard", "category": "mailbox",
               "temporary": False, "suppressed_at_once": True},
    "soft-bounce": {"code": 451, "enhanced": "4.7.1", "type": "soft", "category": "transient",
                    "temporary": True, "suppressed_at_once": False},
    "mailbox-full": {"code": 552, "enhanced": "5.2.2", "type": "soft",
                     "category": "mailbox-full", "temporary": True, "suppressed_at_once": False},
    "blocked": {"code": 554, "enhanced": "5.7.1", "type": "hard", "category": "policy",
                "temporary": False, "suppressed_at_once": False},
}


def test_the_table_covers_every_simulator_address() -> None:
    assert set(SIMULATOR) == set(REFUSALS) | {"success", "slow"}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_each_refusing_address_gives_its_documented_answer(world, name) -> None:
    client, catcher = world
    _use_catcher(client, catcher)
    expected = REFUSALS[name]
    address = f"{name}@{SIMULATOR_DOMAIN}"
    r = _send(client, address)
    assert r.status_code == 502, r.get_json()
    body = r.get_json()
    assert body["transport"] == "custom"
    assert body["bounce"] == {
        "type": expected["type"],
        "code": expected["code"],
        "enhancedCode": expected["enhanced"],
        "recipients": [address],
    }
    assert body["category"] == expected["category"]
    assert body["temporary"] is expected["temporary"]
    assert f"{expected['code']} {expected['enhanced']}" in body["error"]
    # The record says so too, and nothing reached the outbox.
    record = client.get(f"/api/messages/{body['messageId']}", headers=_auth()).get_json()
    assert record["status"] != "sent"
    assert _outbox(client) == []

    # Suppression as the bounce table says: at once for a mailbox, not for the others
    # (mailbox-full: after SOFT_BOUNCE_LIMIT, the next test; transient and policy: never).
    assert _suppressed(client) == ([address] if expected["suppressed_at_once"] else [])
    again = _send(client, address)
    if expected["suppressed_at_once"]:
        assert again.status_code == 422
        assert again.get_json()["suppressed"] == [address]
    else:
        assert again.status_code == 502, again.get_json()
        if name != "mailbox-full":
            assert _suppressed(client) == []


def test_mailbox_full_suppresses_after_the_soft_bounce_limit(world) -> None:
    client, catcher = world
    _use_catcher(client, catcher)
    address = f"mailbox-full+limit@{SIMULATOR_DOMAIN}"
    for _ in range(SOFT_BOUNCE_LIMIT):
        assert _send(client, address).status_code == 502
    assert _suppressed(client) == [address]
    assert _send(client, address).status_code == 422


def test_a_hard_bounce_among_accepted_recipients_is_reported_and_suppressed(world) -> None:
    client, catcher = world
    _use_catcher(client, catcher)
    bad = f"bounce+partial@{SIMULATOR_DOMAIN}"
    r = _send(client, ["rcpt@example.net", bad])
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["accepted"] == ["rcpt@example.net"] and body["rejected"] == [bad]
    assert body["refusals"] == [
        {"email": bad, "code": 550, "enhancedCode": "5.1.1", "temporary": False,
         "category": "mailbox"}
    ]
    assert _suppressed(client) == [bad]
    assert [m["to"] for m in _outbox(client)] == [["rcpt@example.net"]]


def test_success_and_slow_are_accepted_and_kept_in_the_outbox(world) -> None:
    client, catcher = world
    _use_catcher(client, catcher)
    r = _send(client, f"success@{SIMULATOR_DOMAIN}")
    assert r.status_code == 200 and r.get_json()["accepted"] == [f"success@{SIMULATOR_DOMAIN}"]
    started = time.monotonic()
    slow = _send(client, f"slow@{SIMULATOR_DOMAIN}")
    waited = time.monotonic() - started
    assert slow.status_code == 200, slow.get_json()
    assert waited >= SLOW_SECONDS  # the catcher held the reply to the final dot
    caught = _outbox(client)
    assert [(m["to"], m["from"], m["messageId"]) for m in caught] == [
        ([f"success@{SIMULATOR_DOMAIN}"], "me@example.com", r.get_json()["messageId"]),
        ([f"slow@{SIMULATOR_DOMAIN}"], "me@example.com", slow.get_json()["messageId"]),
    ]
    assert caught[0]["subject"] == "Simulated" and caught[0]["text"].strip() == "Hi"


def test_tags_and_letter_case_keep_the_outcome_and_unknown_names_bounce(world) -> None:
    client, catcher = world
    _use_catcher(client, catcher)
    tagged = _send(client, f"Soft-Bounce+run7@{SIMULATOR_DOMAIN.upper()}")
    assert tagged.status_code == 502 and tagged.get_json()["bounce"]["code"] == 451
    unknown = _send(client, f"no-such-name@{SIMULATOR_DOMAIN}")
    assert unknown.status_code == 502
    assert unknown.get_json()["bounce"]["enhancedCode"] == "5.1.1"
    assert "bounce, soft-bounce, mailbox-full, blocked, slow" in unknown.get_json()["error"]
    # another domain is simply accepted, whatever its local part
    assert _send(client, "bounce@example.net").status_code == 200


def test_the_catcher_takes_any_credentials_but_the_simulators_refused_user(world) -> None:
    client, catcher = world
    ok = client.post(
        "/api/smtp/test", json=_settings(catcher, user="anyone", **{"pass": "anything"}),
        headers=_auth(),
    )
    assert ok.status_code == 200
    assert ok.get_json() == {"success": True, "message": "SMTP connection test successful"}
    refused = client.post(
        "/api/smtp/test",
        json=_settings(catcher, user=AUTH_FAILURE_USER, **{"pass": "Secret-Word-42"}),
        headers=_auth(),
    )
    assert refused.status_code == 400
    body = refused.get_json()
    assert body["success"] is False and "535" in body["error"]
    assert "Secret-Word-42" not in refused.get_data(as_text=True)
    # sends through settings with that user fail as an authentication failure (not a bounce)
    client.post(
        "/api/smtp/settings", json=_settings(catcher, user=AUTH_FAILURE_USER), headers=_auth()
    )
    failed = _send(client, "rcpt@example.net", sender=AUTH_FAILURE_USER)
    assert failed.status_code == 502
    assert failed.get_json()["bounce"] is None and failed.get_json()["category"] == "auth"


def test_only_the_catchers_address_is_allowed_and_only_while_it_runs(
    tmp_path, database_url, catcher
) -> None:
    # with DEV_MAIL_CATCHER: its port, not another port of the same loopback address
    config = _config(tmp_path, database_url, catcher)
    app = create_app(config)
    client = app.test_client()
    try:
        assert client.post(
            "/api/smtp/settings", json=_settings(catcher), headers=_auth()
        ).status_code == 200
        other = client.post(
            "/api/smtp/settings", json=_settings(catcher, port=catcher.port + 1),
            headers=_auth(),
        )
        assert other.status_code == 400
        assert other.get_json()["details"] == {"host": ["SMTP host is not allowed"]}
        other_ip = client.post(
            "/api/smtp/settings", json=_settings(catcher, host="127.0.0.2"), headers=_auth()
        )
        assert other_ip.status_code == 400
    finally:
        app.extensions["smtp_service"].pool.close_all()
        app.extensions["smtp_service"].database.dispose()

    # the same configuration without it (as any configuration with a real SMTP_HOST is):
    # refused, and no mailbox route
    app = create_app({**config, "DEV_MAIL_CATCHER": ""})
    client = app.test_client()
    try:
        refused = client.post("/api/smtp/settings", json=_settings(catcher), headers=_auth())
        assert refused.status_code == 400
        assert refused.get_json()["details"] == {"host": ["SMTP host is not allowed"]}
        assert client.get("/api/dev/mailbox", headers=_auth()).status_code == 404
        # the account saved under make run falls back to the global server at send time:
        # its stored host is checked again before the connection, and refused
        sent = _send(client, "rcpt@example.net")
        assert sent.status_code == 502 and sent.get_json()["category"] == "blocked"
    finally:
        app.extensions["smtp_service"].pool.close_all()
        app.extensions["smtp_service"].database.dispose()


def test_the_mailbox_view(world, tmp_path) -> None:
    client, catcher = world
    assert client.get("/api/dev/mailbox").status_code == 401
    forged = Tokens(secret="another-secret-0123456789-abcdefghijklmnop").headers("acct-sim")
    expired = Tokens().headers("acct-sim", exp=int(time.time()) - 600)
    for bad in (forged, expired, {"Authorization": "Bearer not-a-jwt"}):
        r = client.get("/api/dev/mailbox", headers=bad)
        assert r.status_code == 401 and "messages" not in r.get_json()
    empty = client.get("/api/dev/mailbox", headers=_auth()).get_json()
    assert empty == {
        "smtp": {"host": "127.0.0.1", "port": catcher.port},
        "simulatorDomain": SIMULATOR_DOMAIN,
        "messages": [],
    }
    _use_catcher(client, catcher)
    for n in range(3):
        assert _send(client, f"reader{n}@example.net").status_code == 200
    # any account may read it: every account's mail goes to the one catcher
    r = client.get("/api/dev/mailbox", headers=_auth("acct-other"))
    assert [m["to"] for m in r.get_json()["messages"]] == [
        ["reader0@example.net"], ["reader1@example.net"], ["reader2@example.net"]
    ]
    assert [m["to"] for m in _outbox(client, limit="2")] == [
        ["reader1@example.net"], ["reader2@example.net"]
    ]
    assert [m["to"] for m in _outbox(client, to="READER1@example.net")] == [
        ["reader1@example.net"]
    ]
    # a file that is not a message is skipped, not a 500
    (tmp_path / "data" / "outbox" / "zz-garbage.eml").write_bytes(b"\xff\xfe\x00not mail")
    assert len(_outbox(client)) == 3
    for bad in ({"limit": "0"}, {"limit": "x"}, {"limit": "501"}, {"nope": "1"}, {"to": ""}):
        r = client.get("/api/dev/mailbox", query_string=bad, headers=_auth())
        assert r.status_code == 400, (bad, r.get_json())
        assert r.get_json()["error"] == "Validation failed"


def test_the_outbox_keeps_only_what_the_catcher_accepted(world, tmp_path) -> None:
    client, catcher = world
    _use_catcher(client, catcher)
    _send(client, [f"bounce@{SIMULATOR_DOMAIN}", f"blocked@{SIMULATOR_DOMAIN}"])
    assert not [p for p in os.listdir(tmp_path / "data" / "outbox") if p.endswith(".eml")]
