"""Clock skew between the token issuer and this service: JWT_DECODE_LEEWAY (default 5 s) is
allowed on iat, nbf and exp (RFC 7519 4.1.4, 4.1.5), by PyJWT and by the verified-token cache
alike, and not a second more."""

from __future__ import annotations

import time

import pytest

from smtp_service import create_app
from smtp_service.tokens import TOKEN_CACHE_KEY, VerifiedTokens

PATH = "/api/smtp/settings"


def _get(client, token: str):
    return client.get(PATH, headers={"Authorization": f"Bearer {token}"})


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_a_token_from_an_issuer_two_seconds_ahead_is_accepted(client, tokens, claim):
    """The issue's case: {"iat": now+2} (and the same with nbf) was a 401 "Invalid token"."""
    now = int(time.time())
    token = tokens.make("acct-1", "me", exp=now + 3600, **{claim: now + 2})
    r = _get(client, token)
    assert r.status_code == 200, r.json
    assert r.json["isGlobal"] is True


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_a_token_from_beyond_the_leeway_is_refused(client, tokens, claim):
    now = int(time.time())
    r = _get(client, tokens.make(exp=now + 3600, **{claim: now + 60}))
    assert (r.status_code, r.json) == (401, {"error": "Invalid token"})


def test_exp_gets_the_same_leeway(client, tokens):
    now = int(time.time())
    assert _get(client, tokens.make(exp=now - 2)).status_code == 200
    r = _get(client, tokens.make(exp=now - 10))
    assert (r.status_code, r.json) == (401, {"error": "Token has expired"})


def test_the_default_is_five_seconds(app):
    assert app.config["JWT_DECODE_LEEWAY"] == 5


@pytest.mark.parametrize(
    ("leeway", "ahead", "status"),
    [("0", 2, 401), ("30", 20, 200), ("30", 40, 401)],
)
def test_the_leeway_is_configurable(app_config, tokens, leeway, ahead, status):
    app = create_app({**app_config, "JWT_DECODE_LEEWAY": leeway})
    now = int(time.time())
    for claim in ("iat", "nbf"):
        token = tokens.make(exp=now + 3600, **{claim: now + ahead})
        assert _get(app.test_client(), token).status_code == status, claim
    app.extensions["smtp_service"].database.dispose()


def test_a_cached_token_is_served_until_exp_plus_leeway_and_not_after(app_config, tokens):
    app = create_app({**app_config, "JWT_DECODE_LEEWAY": "2"})
    client = app.test_client()
    cache = app.extensions[TOKEN_CACHE_KEY]
    exp = int(time.time()) + 1
    token = tokens.make(exp=exp)
    assert _get(client, token).status_code == 200
    assert cache.get(token) is not None

    _sleep_until(exp + 1.0)  # past exp, within the leeway: still good, from the cache
    assert _get(client, token).status_code == 200
    assert cache.get(token) is not None

    _sleep_until(exp + 2.2)  # past exp + leeway: refused, and dropped from the cache
    r = _get(client, token)
    assert (r.status_code, r.json) == (401, {"error": "Token has expired"})
    assert cache.get(token) is None
    app.extensions["smtp_service"].database.dispose()


def test_a_fractional_exp_buys_no_extra_time_in_the_cache():
    """PyJWT compares int(exp): exp 1000.9 with 5 s leeway is expired at 1005.0, so the cache
    must not serve it then either."""
    now = [1004.9]
    cache = VerifiedTokens(size=10, leeway=5, clock=lambda: now[0])
    cache.put("t", {"exp": 1000.9})
    assert cache.get("t") is not None
    now[0] = 1005.0
    assert cache.get("t") is None
