"""Per-account send rate limits through the real app and real SMTP servers, on SQLite and
PostgreSQL: SEND_RATE_LIMIT and the account's rateLimit, 429 with Retry-After, what counts
(a send that reached a server, also one it refused) and what does not (refused before SMTP, a
connection that failed, a replay), and the settings field (saved, shown, validated)."""

from __future__ import annotations

import math
import threading
import time

import pytest

from smtp_service import ConfigError, create_app
from tests.conftest import SMTP_USER, settings_body
from tests.e2e.conftest import free_port

DAY = 86400


@pytest.fixture(autouse=True)
def _not_at_the_end_of_a_window():
    """Windows are aligned on UTC days: a test never straddles midnight (it waits it out)."""
    left = DAY - time.time() % DAY
    if left < 30:
        time.sleep(left + 0.5)


def _app(app_config, **overrides):
    return create_app({**app_config, **overrides})


@pytest.fixture
def limited(app_config):
    """The app with SEND_RATE_LIMIT=3/day (the default of every account)."""
    app = _app(app_config, SEND_RATE_LIMIT="3/day")
    yield app
    app.extensions["smtp_service"].pool.close_all()
    app.extensions["smtp_service"].database.dispose()


def _send(client, tokens, account="acct-a", sender=SMTP_USER, to="rcpt@example.net", **headers):
    body = {"from": sender, "to": to, "subject": "limited", "text": "x"}
    return client.post(
        "/api/messages/send-email", json=body, headers={**tokens.headers(account), **headers}
    )


def _use(client, tokens, server, account="acct-a", **overrides):
    r = client.post(
        "/api/smtp/settings",
        json=settings_body(server, **overrides),
        headers=tokens.headers(account),
    )
    assert r.status_code == 200, r.json
    return r


def _seconds_to_midnight() -> float:
    return DAY - time.time() % DAY


def test_past_the_default_limit_a_send_is_429_with_retry_after(limited, tokens, smtp_server):
    client = limited.test_client()
    _use(client, tokens, smtp_server)
    assert [_send(client, tokens).status_code for _ in range(3)] == [200, 200, 200]
    expected = _seconds_to_midnight()
    r = _send(client, tokens)
    assert r.status_code == 429
    retry_after = int(r.headers["Retry-After"])
    assert math.ceil(expected) - 2 <= retry_after <= math.ceil(expected)
    assert r.json == {
        "error": "Send rate limit reached for this account (3 per day); nothing was sent. "
        f"Retry after {retry_after} s"
    }
    assert len(smtp_server.messages) == 3
    # per account: another account has its own 3
    _use(client, tokens, smtp_server, account="acct-b")
    assert _send(client, tokens, account="acct-b").status_code == 200


def test_the_global_route_counts_against_the_default(limited, tokens, global_server):
    client = limited.test_client()
    codes = [_send(client, tokens, sender="noreply@example.com").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    assert len(global_server.messages) == 3


def test_refused_before_smtp_does_not_count(limited, tokens, smtp_server):
    client = limited.test_client()
    _use(client, tokens, smtp_server)
    # validation, sender not verified, suppressed: nothing reached a server
    assert _send(client, tokens, to="not an address").status_code == 400
    assert _send(client, tokens, sender="stranger@example.com").status_code == 403
    services = limited.extensions["smtp_service"]
    services.suppressions.suppress(
        "acct-a", "gone@example.net", reason="hard bounce", code=550, enhanced_code="5.1.1",
        message_id="earlier@example.com",
    )
    assert _send(client, tokens, to="gone@example.net").status_code == 422
    assert [_send(client, tokens).status_code for _ in range(4)] == [200, 200, 200, 429]


def test_a_send_the_server_refused_counts(limited, tokens, smtp_server):
    client = limited.test_client()
    _use(client, tokens, smtp_server)
    bounced = _send(client, tokens, to="bad-user@example.net")  # 550 5.1.1 at RCPT
    assert bounced.status_code == 502 and bounced.json["bounce"]["type"] == "hard"
    soft = _send(client, tokens, to="later@example.net")  # 451 4.7.1
    assert soft.status_code == 502 and soft.json["temporary"] is True
    assert _send(client, tokens).status_code == 200
    assert _send(client, tokens).status_code == 429
    assert len(smtp_server.messages) == 1


def test_a_connection_that_failed_gives_its_slot_back(limited, tokens, smtp_server):
    """Nothing reached a server (connection refused): the send is 502 and counts nothing."""
    client = limited.test_client()
    dead = {**settings_body(smtp_server), "port": free_port()}  # nothing listens there
    r = client.post("/api/smtp/settings", json=dead, headers=tokens.headers())
    assert r.status_code == 200
    for _ in range(4):
        failed = _send(client, tokens)
        assert failed.status_code == 502 and failed.json["category"] == "refused", failed.json
    _use(client, tokens, smtp_server)
    assert [_send(client, tokens).status_code for _ in range(4)] == [200, 200, 200, 429]


def test_a_replay_of_an_idempotency_key_counts_nothing(limited, tokens, smtp_server):
    client = limited.test_client()
    _use(client, tokens, smtp_server)
    first = _send(client, tokens, **{"Idempotency-Key": "order-1"})
    assert first.status_code == 200
    for _ in range(5):
        again = _send(client, tokens, **{"Idempotency-Key": "order-1"})
        assert again.status_code == 200 and again.json == first.json
    assert [_send(client, tokens).status_code for _ in range(3)] == [200, 200, 429]
    assert len(smtp_server.messages) == 3


def test_a_limited_send_releases_its_idempotency_key(limited, tokens, smtp_server):
    client = limited.test_client()
    _use(client, tokens, smtp_server, rateLimit="1/day")
    assert _send(client, tokens).status_code == 200
    assert _send(client, tokens, **{"Idempotency-Key": "k"}).status_code == 429
    again = _send(client, tokens, **{"Idempotency-Key": "k"})
    assert again.status_code == 429  # not 409 "still being processed": the key was let go


def test_the_accounts_rate_limit_replaces_the_default(limited, tokens, smtp_server):
    client = limited.test_client()
    _use(client, tokens, smtp_server, rateLimit="5/day")
    codes = [_send(client, tokens).status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]
    r = _send(client, tokens)
    assert "(5 per day)" in r.json["error"]
    # "unlimited" lifts the default for the account
    _use(client, tokens, smtp_server, account="acct-free", rateLimit="unlimited")
    assert {_send(client, tokens, account="acct-free").status_code for _ in range(6)} == {200}
    # a stricter one; and without the field, the default again
    _use(client, tokens, smtp_server, account="acct-strict", rateLimit="1/day")
    assert [_send(client, tokens, account="acct-strict").status_code for _ in range(2)] == [
        200,
        429,
    ]
    _use(client, tokens, smtp_server, account="acct-strict")  # 3/day: the day counts 1 already
    assert [_send(client, tokens, account="acct-strict").status_code for _ in range(3)] == [
        200,
        200,
        429,
    ]


def test_an_account_may_have_a_limit_without_a_default(app_config, tokens, smtp_server):
    app = _app(app_config)  # SEND_RATE_LIMIT unset: no limit, nothing counted
    try:
        client = app.test_client()
        _use(client, tokens, smtp_server)
        assert {_send(client, tokens).status_code for _ in range(5)} == {200}
        db = app.extensions["smtp_service"].database
        import sqlalchemy as sa

        assert db.query(sa.text("SELECT count(*) AS n FROM send_rate"))[0].n == 0
        _use(client, tokens, smtp_server, account="acct-capped", rateLimit="2/minute;4/day")
        codes = [_send(client, tokens, account="acct-capped").status_code for _ in range(3)]
        assert codes == [200, 200, 429]
    finally:
        app.extensions["smtp_service"].pool.close_all()
        app.extensions["smtp_service"].database.dispose()


def test_rate_limit_is_saved_shown_and_validated(client, tokens, smtp_server):
    saved = _use(client, tokens, smtp_server, rateLimit=" 100/minute;2000/hour ")
    assert saved.json["settings"]["rateLimit"] == "100/minute;2000/hour"
    shown = client.get("/api/smtp/settings", headers=tokens.headers())
    assert shown.json["rateLimit"] == "100/minute;2000/hour"
    # without it (or null): the default, and the field is not shown
    saved = _use(client, tokens, smtp_server, rateLimit=None)
    assert "rateLimit" not in saved.json["settings"]
    assert "rateLimit" not in client.get("/api/smtp/settings", headers=tokens.headers()).json
    for bad, says in [
        ("lots", "Must be a rate such as '500/day' or '100/minute;2000/hour', or 'unlimited'."),
        ("0/day", "A rate must allow at least 1 send (for no limit: 'unlimited')."),
        ("", "Must be a non-empty string."),
        (500, "Not a valid string."),
        ("1/day;" * 40, "Must be at most 200 characters."),
    ]:
        r = client.post(
            "/api/smtp/settings",
            json=settings_body(smtp_server, rateLimit=bad),
            headers=tokens.headers(),
        )
        assert r.status_code == 400, (bad, r.json)
        assert r.json == {"error": "Validation failed", "details": {"rateLimit": [says]}}
    assert "rateLimit" not in client.get("/api/smtp/settings", headers=tokens.headers()).json


def test_a_settings_file_with_a_bad_rate_limit_is_unusable(app, client, tokens, smtp_server):
    """A rateLimit edited by hand into something else: the file fails validation as any bad
    field does (the account uses the global server), never a send without the account's cap."""
    _use(client, tokens, smtp_server, rateLimit="1/day")
    files = app.extensions["smtp_service"].files
    document = files.read("acct-a", "smtp-settings.json")
    files.write("acct-a", "smtp-settings.json", {**document, "rateLimit": "lots"})
    shown = client.get("/api/smtp/settings", headers=tokens.headers())
    assert shown.json["isGlobal"] is True


def test_send_rate_limit_config_is_checked_at_start(app_config):
    with pytest.raises(ConfigError, match=r"SEND_RATE_LIMIT 'lots': Must be a rate such as"):
        _app(app_config, SEND_RATE_LIMIT="lots")
    with pytest.raises(ConfigError, match="at least 1 send"):
        _app(app_config, SEND_RATE_LIMIT="0/minute")


def test_a_busy_pool_gives_its_slot_back(app_config, tokens, servers):
    """503 (every connection stayed busy, nothing sent) counts nothing."""
    server = servers()
    app = _app(
        app_config,
        SEND_RATE_LIMIT="2/day",
        SMTP_POOL_SIZE="1",
        SMTP_POOL_WAIT_SECONDS="0.3",
    )
    try:
        client = app.test_client()
        _use(client, tokens, server)
        server.fault("content", "delay", seconds=1.0, times=1)
        first = {}
        thread = threading.Thread(
            target=lambda: first.update(r=_send(app.test_client(), tokens))
        )
        thread.start()
        assert server.wait_until(lambda: server.count("DATA") == 1)
        busy = _send(client, tokens)
        assert busy.status_code == 503, busy.json
        thread.join(10)
        assert first["r"].status_code == 200
        assert [_send(client, tokens).status_code for _ in range(2)] == [200, 429]
        assert len(server.messages) == 2
    finally:
        app.extensions["smtp_service"].pool.close_all()
        app.extensions["smtp_service"].database.dispose()
