"""The cache of verified tokens skips only the signature check, never a failure."""

from __future__ import annotations

import time

from flask_jwt_extended import get_jwt, get_jwt_header

from smtp_service import create_app
from smtp_service.auth import current_caller
from smtp_service.tokens import TOKEN_CACHE_KEY, VerifiedTokens

PATH = "/api/smtp/settings"


def _get(client, token: str):
    return client.get(PATH, headers={"Authorization": f"Bearer {token}"})


def test_a_verified_token_is_cached_and_still_answers(app, client, tokens):
    cache = app.extensions[TOKEN_CACHE_KEY]
    token = tokens.make()
    assert _get(client, token).status_code == 200
    assert cache.get(token) is not None
    assert _get(client, token).status_code == 200  # served from the cache


def test_a_cached_token_that_expires_is_refused(app_config, tokens):
    # No leeway here, so that exp itself is the line (tests/api/test_clock_skew.py has leeway).
    app = create_app({**app_config, "JWT_DECODE_LEEWAY": "0"})
    client = app.test_client()
    token = tokens.make(exp=int(time.time()) + 2)
    assert _get(client, token).status_code == 200
    assert app.extensions[TOKEN_CACHE_KEY].get(token) is not None
    time.sleep(max(0.0, int(time.time()) + 2 - time.time()) + 1.1)
    r = _get(client, token)
    assert r.status_code == 401
    assert r.json == {"error": "Token has expired"}
    assert app.extensions[TOKEN_CACHE_KEY].get(token) is None


def test_a_changed_token_misses_the_cache(client, tokens):
    token = tokens.make()
    assert _get(client, token).status_code == 200
    head, payload, signature = token.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    assert _get(client, f"{head}.{payload}.{flipped}").status_code == 401
    assert _get(client, f"{head}.{payload}").status_code == 401


def test_another_apps_cache_is_not_consulted(app_config, tokens):
    """Two apps in one process share flask-jwt-extended's manager, not their caches."""
    first = create_app(app_config)
    other = create_app({**app_config, "JWT_SECRET_KEY": "a-different-secret-" + "y" * 30})
    token = tokens.make()
    assert _get(first.test_client(), token).status_code == 200
    assert _get(other.test_client(), token).status_code == 401


def test_claim_checks_run_on_every_request(app, client, tokens):
    token = tokens.make(account=None)  # good signature, no account claim
    for _ in range(2):
        r = _get(client, token)
        assert r.status_code == 401
        assert r.json == {"error": "Token is missing exp, sub or a valid account id"}


def test_the_cache_is_bounded_least_recently_used_first():
    now = [1000.0]
    cache = VerifiedTokens(size=2, clock=lambda: now[0])
    for name in ("a", "b"):
        cache.put(name, {"exp": 2000})
    assert cache.get("a") == {"exp": 2000}  # a is now the most recent
    cache.put("c", {"exp": 2000})
    assert len(cache) == 2
    assert cache.get("b") is None
    assert cache.get("a") is not None and cache.get("c") is not None


def test_expiry_honours_leeway_and_tokens_without_exp_are_not_kept():
    now = [1000.0]
    cache = VerifiedTokens(size=10, leeway=30, clock=lambda: now[0])
    cache.put("t", {"exp": 1000})
    cache.put("no-exp", {"sub": "x"})
    cache.put("bool-exp", {"exp": True})
    assert cache.get("t") is not None  # 1000 > 1000 - 30
    now[0] = 1030.0
    assert cache.get("t") is None
    assert cache.get("no-exp") is None and cache.get("bool-exp") is None
    assert len(cache) == 0


def test_size_zero_turns_the_cache_off(app_config, tokens):
    app = create_app({**app_config, "JWT_CACHE_SIZE": "0"})
    token = tokens.make()
    assert _get(app.test_client(), token).status_code == 200
    assert len(app.extensions[TOKEN_CACHE_KEY]) == 0


def test_a_token_that_passed_every_check_is_not_parsed_again(app, client, tokens, monkeypatch):
    """The second request with a token that passed flask-jwt-extended's checks does not decode
    its header again (PyJWT's get_unverified_header ran on every request before)."""
    import jwt as pyjwt

    cache = app.extensions[TOKEN_CACHE_KEY]
    token = tokens.make()
    assert _get(client, token).status_code == 200
    assert cache.accepted(token) is not None
    parsed = []
    original = pyjwt.get_unverified_header
    monkeypatch.setattr(pyjwt, "get_unverified_header", lambda t: parsed.append(t) or original(t))
    assert _get(client, token).status_code == 200
    assert parsed == []
    # flask-jwt-extended's accessors answer as after its own verification
    with app.test_request_context(PATH, headers={"Authorization": f"Bearer {token}"}):
        caller = current_caller()
        assert get_jwt()["sub"] == caller.user_id and get_jwt()["accountId"] == caller.account_id
        assert get_jwt_header()["alg"] == "HS256"
    assert parsed == []
    other = tokens.make(account="another-account")  # not seen before: the whole way
    assert _get(client, other).status_code == 200
    assert parsed and set(parsed) == {other}


def test_an_accepted_token_in_another_header_form_goes_the_whole_way(app, client, tokens):
    token = tokens.make()
    assert _get(client, token).status_code == 200
    assert app.extensions[TOKEN_CACHE_KEY].accepted(token) is not None
    for header in (f"bearer {token}", f"Basic {token}", f"Bearer {token} {token}", token):
        r = client.get(PATH, headers={"Authorization": header})
        assert r.status_code == 401, header
    assert _get(client, token).status_code == 200


def test_a_token_refused_by_the_claim_checks_is_never_accepted(app, client, tokens):
    token = tokens.make(account=None)
    assert _get(client, token).status_code == 401
    assert app.extensions[TOKEN_CACHE_KEY].get(token) is not None  # the signature was good
    assert app.extensions[TOKEN_CACHE_KEY].accepted(token) is None
