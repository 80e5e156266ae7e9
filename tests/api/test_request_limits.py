"""Request limits with flask-limiter, in memory and in a real Redis (TEST_REDIS_URL): the
connection test per account (SMTP_TEST_RATE_LIMIT, answered in the endpoint's own shape) and
the open pixel per client address (TRACKING_RATE_LIMIT), both 429 with Retry-After; with Redis
the counts are shared by every app (worker or instance) on it."""

from __future__ import annotations

import re

import pytest

from smtp_service import ConfigError, create_app
from tests.conftest import settings_body
from tests.e2e.conftest import free_port
from tests.redis_store import count_keys, redis_url


@pytest.fixture
def database_url(tmp_path) -> str:
    """Request limits do not touch the message database: SQLite alone."""
    return f"sqlite:///{tmp_path / 'messages.sqlite3'}"


@pytest.fixture
def make_app(app_config, limiter_storage):
    """Apps on one limiter storage (each one is what a gunicorn worker holds)."""
    made = []

    def make(**overrides: str):
        app = create_app({**app_config, **limiter_storage, **overrides})
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions["smtp_service"].pool.close_all()
        app.extensions["smtp_service"].database.dispose()


_REFUSED = re.compile(
    r"Too many connection tests: at most 2 per 1 minute for this account; retry after (\d+) s"
)


def _test(client, tokens, server, account="acct-a"):
    return client.post(
        "/api/smtp/test", json=settings_body(server), headers=tokens.headers(account)
    )


def test_connection_tests_past_the_limit_are_429_in_the_endpoints_shape(
    make_app, tokens, smtp_server
):
    client = make_app(SMTP_TEST_RATE_LIMIT="2/minute").test_client()
    assert [_test(client, tokens, smtp_server).status_code for _ in range(2)] == [200, 200]
    r = _test(client, tokens, smtp_server)
    assert r.status_code == 429
    assert set(r.json) == {"success", "error"} and r.json["success"] is False
    match = _REFUSED.fullmatch(r.json["error"])
    assert match, r.json
    assert match.group(1) == r.headers["Retry-After"] and 1 <= int(match.group(1)) <= 60
    assert len(smtp_server.auth_attempts) == 2  # the refused test never connected
    # per account
    assert _test(client, tokens, smtp_server, account="acct-b").status_code == 200


def test_a_request_without_a_valid_token_counts_nothing(make_app, tokens, smtp_server):
    client = make_app(SMTP_TEST_RATE_LIMIT="1/minute").test_client()
    for _ in range(3):
        r = client.post(
            "/api/smtp/test", json=settings_body(smtp_server), headers={"Authorization": "x"}
        )
        assert r.status_code == 401
    assert _test(client, tokens, smtp_server).status_code == 200
    assert _test(client, tokens, smtp_server).status_code == 429


def test_a_failed_test_counts_and_a_refused_body_does_not(make_app, tokens, smtp_server):
    """Every test that tries a server counts, failed or not (a wrong password is what a caller
    probing credentials sends, a refused host what one mapping a network sends); a body refused
    before any connection (400, 415) does not."""
    client = make_app(SMTP_TEST_RATE_LIMIT="3/minute").test_client()
    for _ in range(3):
        r = client.post("/api/smtp/test", json={"host": ""}, headers=tokens.headers())
        assert r.status_code == 400 and r.json["error"] == "Validation failed"
        r = client.post("/api/smtp/test", data="x", headers=tokens.headers())
        assert r.status_code == 415
    wrong = settings_body(smtp_server, **{"pass": "wrong"})
    r = client.post("/api/smtp/test", json=wrong, headers=tokens.headers())
    assert r.status_code == 400 and r.json["success"] is False
    refused = settings_body(smtp_server, host="10.0.0.1")  # the SSRF guard: never dialled
    r = client.post("/api/smtp/test", json=refused, headers=tokens.headers())
    assert r.status_code == 400 and r.json["success"] is False
    assert _test(client, tokens, smtp_server).status_code == 200
    assert _test(client, tokens, smtp_server).status_code == 429


def test_the_default_is_5_a_minute(make_app, tokens, smtp_server):
    client = make_app(SMTP_TEST_RATE_LIMIT="").test_client()  # tests/conftest.py sets one
    codes = [_test(client, tokens, smtp_server).status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]


def test_the_pixel_past_its_limit_is_429_with_retry_after(make_app):
    client = make_app(TRACKING_RATE_LIMIT="3/minute").test_client()
    codes = [client.get("/t/open/forged.gif").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    r = client.get("/t/open/forged.gif")
    assert r.status_code == 429 and r.json == {"error": "Too many requests"}
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    # per client address
    other = client.get("/t/open/forged.gif", environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert other.status_code == 200


def test_with_redis_every_worker_shares_the_counts(make_app, tokens, smtp_server, limiter_storage):
    """Two apps on one storage: on Redis one count for both (several workers and instances);
    in memory each counts its own (per worker, as README says)."""
    first = make_app(SMTP_TEST_RATE_LIMIT="2/minute", TRACKING_RATE_LIMIT="2/minute")
    second = make_app(SMTP_TEST_RATE_LIMIT="2/minute", TRACKING_RATE_LIMIT="2/minute")
    a, b = first.test_client(), second.test_client()
    assert _test(a, tokens, smtp_server).status_code == 200
    assert _test(b, tokens, smtp_server).status_code == 200
    pixels = [a.get("/t/open/x.gif").status_code, b.get("/t/open/x.gif").status_code]
    assert pixels == [200, 200]
    shared = limiter_storage["RATELIMIT_STORAGE_URI"].startswith("redis")
    assert _test(a, tokens, smtp_server).status_code == (429 if shared else 200)
    assert b.get("/t/open/x.gif").status_code == (429 if shared else 200)
    if shared:  # every key flask-limiter made is under this test's prefix
        assert count_keys(redis_url(), limiter_storage["RATELIMIT_KEY_PREFIX"]) >= 2


def test_an_unreachable_redis_lets_requests_through(app_config, tokens, smtp_server, caplog):
    """A limit must not take the routes down with it: with Redis gone the requests are served
    (unlimited) and the failure is logged."""
    app = create_app(
        {
            **app_config,
            "RATELIMIT_STORAGE_URI": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens
            "SMTP_TEST_RATE_LIMIT": "1/minute",
        }
    )
    try:
        client = app.test_client()
        codes = [_test(client, tokens, smtp_server).status_code for _ in range(3)]
        assert codes == [200, 200, 200]
        assert client.get("/t/open/x.gif").status_code == 200
        assert "Failed to rate limit" in caplog.text
    finally:
        app.extensions["smtp_service"].pool.close_all()
        app.extensions["smtp_service"].database.dispose()


@pytest.mark.parametrize(
    "name, value, says",
    [
        ("SMTP_TEST_RATE_LIMIT", "lots", "SMTP_TEST_RATE_LIMIT must be a rate"),
        ("RATELIMIT_STORAGE_URI", "memcached://x:11211", "must start memory:// or redis://"),
        ("RATELIMIT_STORAGE_URI", "127.0.0.1:6379", "must start memory:// or redis://"),
    ],
)
def test_request_limit_config_is_checked_at_start(app_config, name, value, says):
    with pytest.raises(ConfigError, match=says):
        create_app({**app_config, name: value})


def test_a_storage_uri_password_is_not_shown(app_config):
    with pytest.raises(ConfigError) as refused:
        create_app({**app_config, "RATELIMIT_STORAGE_URI": "memcached://u:hunter2@x:11211"})
    assert "hunter2" not in str(refused.value)
