"""OAuth2 (SASL XOAUTH2) sign-in, end to end: a real authorization server and a real SMTP server
that takes XOAUTH2 only with a currently valid token (tests/oauth_server.py), the real app."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from smtp_service import ConfigError, create_app
from tests.oauth_server import CLIENT_ID, AuthorizationServer

MAILBOX = "mailbox@contoso.example"
OTHER_MAILBOX = "other@contoso.example"


@pytest.fixture
def client(oauth_app):
    return oauth_app().test_client()


def start(client, tokens, smtp, account="acct-a", user=MAILBOX, provider="microsoft", **more):
    body = {"provider": provider, "user": user, "host": "localhost", "port": smtp.port, **more}
    return client.post("/api/smtp/oauth/start", json=body, headers=tokens.headers(account))


def sign_in(client, tokens, authority, smtp, account="acct-a", user=MAILBOX) -> dict[str, Any]:
    """The delegated flow: start, the user's consent at the provider, the callback."""
    started = start(client, tokens, smtp, account, user)
    assert started.status_code == 200, started.get_json()
    query = authority.consent(started.get_json()["authorizationUrl"])
    answer = client.get("/api/smtp/oauth/callback", query_string=query)
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


def send(client, tokens, account="acct-a", sender=MAILBOX, subject="Hello"):
    body = {"from": sender, "to": "rcpt@example.net", "subject": subject, "text": "Hi"}
    return client.post("/api/messages/send-email", json=body, headers=tokens.headers(account))


def services(client):
    return client.application.extensions["smtp_service"]


def settings_file(client, account="acct-a") -> dict[str, Any]:
    path = services(client).files.path(account, "smtp-settings.json")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def assert_no_secret(authority: AuthorizationServer, *texts: str) -> None:
    for secret in authority.secrets_issued():
        for text in texts:
            assert secret not in text


# -- the delegated flow ------------------------------------------------------------------------


def test_whole_delegated_flow_start_callback_delivered(
    client, tokens, authority, mailbox_server
):
    started = start(client, tokens, mailbox_server)
    assert started.status_code == 200
    url = started.get_json()["authorizationUrl"]
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert urlsplit(url).path == "/organizations/authorize"
    assert query["client_id"] == CLIENT_ID and query["response_type"] == "code"
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert query["redirect_uri"] == "http://localhost/api/smtp/oauth/callback"
    assert query["scope"] == "https://outlook.office.com/SMTP.Send offline_access"
    assert query["login_hint"] == MAILBOX and query["state"]

    callback = client.get(
        "/api/smtp/oauth/callback", query_string=authority.consent(url)
    )  # no bearer token: the state names the account
    assert callback.status_code == 200
    saved = callback.get_json()
    assert saved["message"] == "OAuth2 sign-in complete: SMTP settings saved"
    assert saved["settings"]["auth"] == "oauth2"
    assert saved["settings"]["user"] == MAILBOX and saved["settings"]["hasRefreshToken"]

    sent = send(client, tokens)
    assert sent.status_code == 200, sent.get_json()
    assert sent.get_json()["transport"] == "custom"
    [message] = mailbox_server.messages
    assert message.auth_login == MAILBOX and message.tls
    # the refresh token is stored encrypted, bound to the account
    stored = settings_file(client)
    assert stored["refreshToken"].startswith("enc:v1:")
    assert_no_secret(authority, json.dumps(stored), json.dumps(saved), sent.get_data(True))


def test_settings_get_shape_never_shows_a_token(client, tokens, authority, mailbox_server):
    sign_in(client, tokens, authority, mailbox_server)
    shown = client.get("/api/smtp/settings", headers=tokens.headers()).get_json()
    assert shown == {
        "host": "localhost",
        "port": mailbox_server.port,
        "secure": False,
        "user": MAILBOX,
        "hasPassword": False,
        "isGlobal": False,
        "requireTls": True,
        "auth": "oauth2",
        "provider": "microsoft",
        "grant": "authorization_code",
        "hasRefreshToken": True,
        "needsReauthorization": False,
    }


def test_refresh_token_copied_to_another_account_does_not_decrypt(
    client, tokens, authority, mailbox_server
):
    sign_in(client, tokens, authority, mailbox_server)
    files = services(client).files
    files.write("acct-b", "smtp-settings.json", settings_file(client, "acct-a"))
    shown = client.get("/api/smtp/settings", headers=tokens.headers("acct-b")).get_json()
    assert shown["isGlobal"] is True  # unusable there: the global server, as for a password


def test_google_start_asks_for_offline_access_and_gmail_scope(
    oauth_app, tokens, authority, mailbox_server
):
    client = oauth_app(**authority.config("GOOGLE")).test_client()
    answer = client.post(
        "/api/smtp/oauth/start",
        json={"provider": "google", "user": "me@workspace.example"},
        headers=tokens.headers(),
    )
    assert answer.status_code == 200
    query = parse_qs(urlsplit(answer.get_json()["authorizationUrl"]).query)
    assert query["scope"] == ["https://mail.google.com/"]
    assert query["access_type"] == ["offline"] and query["prompt"] == ["consent"]
    assert services(client).oauth.providers["google"].host == "smtp.gmail.com"


def test_start_refuses_what_cannot_work(oauth_app, tokens, mailbox_server):
    client = oauth_app().test_client()
    assert start(client, tokens, mailbox_server, provider="yahoo").status_code == 400
    refused = start(client, tokens, mailbox_server, provider="google")  # no application set up
    assert refused.status_code == 503
    assert "OAUTH_GOOGLE_CLIENT_ID" in refused.get_json()["error"]
    blocked = start(client, tokens, mailbox_server, host="10.1.2.3")
    assert blocked.status_code == 400 and blocked.get_json()["details"]["host"]
    no_base = oauth_app(PUBLIC_BASE_URL="").test_client()
    assert start(no_base, tokens, mailbox_server).status_code == 503


def test_declined_consent_is_a_400_and_saves_nothing(client, tokens, authority, mailbox_server):
    url = start(client, tokens, mailbox_server).get_json()["authorizationUrl"]
    answer = client.get("/api/smtp/oauth/callback", query_string=authority.consent(url + "&deny=1"))
    assert answer.status_code == 400
    assert answer.get_json()["error"] == "OAuth2 sign-in failed: access_denied"
    assert client.get("/api/smtp/settings", headers=tokens.headers()).get_json()["isGlobal"]


# -- states --------------------------------------------------------------------------------------


def test_forged_state_refused(client, tokens, authority, mailbox_server):
    url = start(client, tokens, mailbox_server).get_json()["authorizationUrl"]
    query = authority.consent(url)
    state = query["state"]
    for forged in (
        state[:-2] + ("AA" if state[-2:] != "AA" else "BB"),  # its signature changed
        "bm90LWEtc3RhdGU",  # not one at all
    ):
        answer = client.get(
            "/api/smtp/oauth/callback", query_string={"code": query["code"], "state": forged}
        )
        assert answer.status_code == 400
        assert "invalid, expired or was already used" in answer.get_json()["error"]
    assert client.get("/api/smtp/oauth/callback").status_code == 400  # no state at all
    assert not os.path.exists(services(client).files.path("acct-a", "smtp-settings.json"))


def test_replayed_state_refused(client, tokens, authority, mailbox_server):
    url = start(client, tokens, mailbox_server).get_json()["authorizationUrl"]
    query = authority.consent(url)
    assert client.get("/api/smtp/oauth/callback", query_string=query).status_code == 200
    before = settings_file(client)
    asked = len(authority.token_requests)
    replay = client.get("/api/smtp/oauth/callback", query_string=query)
    assert replay.status_code == 400
    assert "invalid, expired or was already used" in replay.get_json()["error"]
    assert len(authority.token_requests) == asked  # refused here, not by the provider
    assert settings_file(client) == before


def test_replay_refused_by_another_app_on_the_same_database(
    oauth_app, tokens, authority, mailbox_server
):
    """The state's single use is recorded in the shared database: a second worker or
    instance refuses it too."""
    first, second = oauth_app().test_client(), oauth_app().test_client()
    url = start(first, tokens, mailbox_server).get_json()["authorizationUrl"]
    query = authority.consent(url)
    assert first.get("/api/smtp/oauth/callback", query_string=query).status_code == 200
    replay = second.get("/api/smtp/oauth/callback", query_string=query)
    assert replay.status_code == 400
    assert "invalid, expired or was already used" in replay.get_json()["error"]


def test_expired_state_refused(oauth_app, tokens, authority, mailbox_server):
    client = oauth_app(OAUTH_STATE_SECONDS="10").test_client()
    url = start(client, tokens, mailbox_server).get_json()["authorizationUrl"]
    query = authority.consent(url)
    database = services(client).database
    clock = database._clock
    database._clock = lambda: clock() + 11  # the row's expiry, as the database reads time
    try:
        answer = client.get("/api/smtp/oauth/callback", query_string=query)
    finally:
        database._clock = clock
    assert answer.status_code == 400


def test_one_account_cannot_complete_anothers_flow(client, tokens, authority, mailbox_server):
    url_a = start(client, tokens, mailbox_server, "acct-a").get_json()["authorizationUrl"]
    url_b = start(client, tokens, mailbox_server, "acct-b", OTHER_MAILBOX).get_json()[
        "authorizationUrl"
    ]
    code_a = authority.consent(url_a)["code"]
    state_b = authority.consent(url_b)["state"]
    # B's state with A's code: the exchange uses B's PKCE verifier, which A's code was not
    # issued for; the provider refuses it and nothing is saved for either account.
    answer = client.get(
        "/api/smtp/oauth/callback", query_string={"code": code_a, "state": state_b}
    )
    assert answer.status_code == 400
    assert answer.get_json()["error"] == "OAuth2 sign-in failed: invalid_grant"
    for account in ("acct-a", "acct-b"):
        shown = client.get("/api/smtp/settings", headers=tokens.headers(account)).get_json()
        assert shown["isGlobal"] is True
    # a state signed for A cannot be edited to name B: the signature no longer matches
    from itsdangerous import URLSafeTimedSerializer

    forged = URLSafeTimedSerializer(b"not the service's key", salt="smtp-service oauth state")
    answer = client.get(
        "/api/smtp/oauth/callback",
        query_string={"code": code_a, "state": forged.dumps({"s": "x", "a": "acct-b"})},
    )
    assert answer.status_code == 400


# -- tokens on the send path ----------------------------------------------------------------------


def test_token_expiring_between_two_sends_is_renewed_unnoticed(
    oauth_app, tokens, authority, mailbox_server
):
    client = oauth_app(SMTP_POOL_SIZE="0").test_client()  # a new connection (and AUTH) per send
    sign_in(client, tokens, authority, mailbox_server)
    assert send(client, tokens, subject="one").status_code == 200
    authority.expire_access_tokens()
    oauth = services(client).oauth
    oauth.clock = lambda: time.time() + 3600  # an hour later, for the worker's cache too
    assert send(client, tokens, subject="two").status_code == 200
    attempts = mailbox_server.handler.attempts
    assert [ok for _, _, ok in attempts] == [True, True]  # the expired token never went out
    assert attempts[0][1] != attempts[1][1]
    assert [r["grant_type"] for r in authority.token_requests] == [
        "authorization_code",
        "refresh_token",
    ]
    assert len(mailbox_server.messages) == 2


def test_535_to_a_token_gets_one_renewed_token_and_a_retry(
    oauth_app, tokens, authority, mailbox_server
):
    client = oauth_app(SMTP_POOL_SIZE="0").test_client()
    sign_in(client, tokens, authority, mailbox_server)
    authority.expire_access_tokens()  # the provider ended it early; the worker does not know
    sent = send(client, tokens)
    assert sent.status_code == 200, sent.get_json()
    assert [ok for _, _, ok in mailbox_server.handler.attempts] == [False, True]
    assert len(mailbox_server.messages) == 1


def test_pooled_connection_signed_in_with_a_token_stays_usable(
    client, tokens, authority, mailbox_server
):
    sign_in(client, tokens, authority, mailbox_server)
    assert send(client, tokens, subject="one").status_code == 200
    authority.expire_access_tokens()  # the connection signed in already: it is not asked again
    assert send(client, tokens, subject="two").status_code == 200
    assert len(mailbox_server.handler.attempts) == 1
    assert len(mailbox_server.messages) == 2


def test_rotated_refresh_token_is_saved(oauth_app, tokens, authority, mailbox_server):
    client = oauth_app(SMTP_POOL_SIZE="0").test_client()
    sign_in(client, tokens, authority, mailbox_server)
    first = settings_file(client)["refreshToken"]
    oauth = services(client).oauth
    for hours in (1, 2, 3):  # each send after the token's hour: a refresh that rotates
        oauth.clock = lambda h=hours: time.time() + 3600 * h
        assert send(client, tokens, subject=str(hours)).status_code == 200
    assert settings_file(client)["refreshToken"] != first
    assert not settings_file(client)["needsReauthorization"]
    assert [r["grant_type"] for r in authority.token_requests].count("refresh_token") == 3


def test_revoked_grant_needs_reauthorization_and_leaks_nothing(
    oauth_app, tokens, authority, mailbox_server, caplog
):
    caplog.set_level(logging.DEBUG)
    client = oauth_app(SMTP_POOL_SIZE="0").test_client()
    sign_in(client, tokens, authority, mailbox_server)
    assert send(client, tokens, subject="before").status_code == 200
    authority.revoke(MAILBOX)  # consent withdrawn: the refresh token is refused
    services(client).oauth.clock = lambda: time.time() + 3600
    failed = send(client, tokens, subject="after")
    assert failed.status_code == 502
    body = failed.get_json()
    assert body["category"] == "auth" and body["temporary"] is False
    assert "needs reauthorization" in body["error"] and body["bounce"] is None
    shown = client.get("/api/smtp/settings", headers=tokens.headers())
    assert shown.get_json()["needsReauthorization"] is True
    assert services(client).oauth.needs_reauthorization("acct-a") is True
    health = client.get("/api/smtp/health", headers=tokens.headers())
    assert health.status_code == 200 and health.get_json()["needsReauthorization"] is True
    requests_before = len(authority.token_requests)
    again = send(client, tokens, subject="again")  # no new request to the provider
    assert again.status_code == 502 and "needs reauthorization" in again.get_json()["error"]
    assert len(authority.token_requests) == requests_before
    test = client.post("/api/smtp/test", json={"auth": "oauth2"}, headers=tokens.headers())
    assert test.status_code == 400 and "reauthorization" in test.get_json()["error"]
    assert len(mailbox_server.messages) == 1
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert "needs reauthorization" in logs  # the warning was written, and holds no secret
    assert_no_secret(
        authority,
        logs,
        failed.get_data(True),
        again.get_data(True),
        shown.get_data(True),
        health.get_data(True),
        test.get_data(True),
    )
    # signing in again clears it
    sign_in(client, tokens, authority, mailbox_server)
    assert send(client, tokens, subject="signed in again").status_code == 200


def test_test_route_uses_the_saved_sign_in(client, tokens, authority, mailbox_server):
    nothing = client.post("/api/smtp/test", json={"auth": "oauth2"}, headers=tokens.headers())
    assert nothing.status_code == 400
    sign_in(client, tokens, authority, mailbox_server)
    tested = client.post("/api/smtp/test", json={"auth": "oauth2"}, headers=tokens.headers())
    assert tested.get_json() == {"success": True, "message": "SMTP connection test successful"}
    assert mailbox_server.handler.attempts[-1][0] == MAILBOX


def test_delete_forgets_the_tokens(client, tokens, authority, mailbox_server):
    sign_in(client, tokens, authority, mailbox_server)
    assert send(client, tokens).status_code == 200
    oauth = services(client).oauth
    assert any(login.account_id == "acct-a" for login in oauth._cache)
    assert client.delete("/api/smtp/settings", headers=tokens.headers()).status_code == 200
    assert not any(login.account_id == "acct-a" for login in oauth._cache)
    assert not os.path.exists(services(client).files.path("acct-a", "smtp-settings.json"))
    shown = client.get("/api/smtp/settings", headers=tokens.headers()).get_json()
    assert shown["isGlobal"] is True and "hasRefreshToken" not in shown


# -- app-only: Microsoft client credentials -------------------------------------------------------

APP_SECRET = "app-only-secret-7Hq2-never-shown"


def app_only_body(smtp, **overrides: Any) -> dict[str, Any]:
    return {
        "auth": "oauth2",
        "provider": "microsoft",
        "user": MAILBOX,
        "tenantId": "contoso.onmicrosoft.com",
        "clientId": "app-123",
        "clientSecret": APP_SECRET,
        "host": "localhost",
        "port": smtp.port,
        **overrides,
    }


def test_client_credentials_end_to_end(client, tokens, authority, mailbox_server):
    authority.apps[("contoso.onmicrosoft.com", "app-123")] = (APP_SECRET, {MAILBOX})
    tested = client.post(
        "/api/smtp/test", json=app_only_body(mailbox_server), headers=tokens.headers()
    )
    assert tested.status_code == 200, tested.get_json()
    saved = client.post(
        "/api/smtp/settings", json=app_only_body(mailbox_server), headers=tokens.headers()
    )
    assert saved.status_code == 200
    assert saved.get_json()["settings"]["grant"] == "client_credentials"
    shown = client.get("/api/smtp/settings", headers=tokens.headers()).get_json()
    assert shown["tenantId"] == "contoso.onmicrosoft.com" and shown["clientId"] == "app-123"
    assert shown["hasClientSecret"] is True and shown["hasRefreshToken"] is False
    assert settings_file(client)["clientSecret"].startswith("enc:v1:")
    sent = send(client, tokens)
    assert sent.status_code == 200, sent.get_json()
    assert mailbox_server.messages[0].auth_login == MAILBOX
    grants = [r["grant_type"] for r in authority.token_requests]
    assert grants and set(grants) == {"client_credentials"}
    for text in (tested.get_data(True), saved.get_data(True), json.dumps(shown)):
        assert APP_SECRET not in text
        assert_no_secret(authority, text)


def test_client_credentials_refused_say_so_without_the_secret(
    client, tokens, authority, mailbox_server
):
    authority.apps[("contoso.onmicrosoft.com", "app-123")] = ("another-secret", {MAILBOX})
    tested = client.post(
        "/api/smtp/test", json=app_only_body(mailbox_server), headers=tokens.headers()
    )
    assert tested.status_code == 400
    assert "invalid_client" in tested.get_json()["error"]
    assert APP_SECRET not in tested.get_data(True)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tenantId", "../../evil"),
        ("tenantId", "contoso.com/x?y"),
        ("clientId", "a b"),
        ("provider", "google"),
        ("clientSecret", ""),
    ],
)
def test_client_credentials_input_checked(client, tokens, mailbox_server, field, value):
    answer = client.post(
        "/api/smtp/settings",
        json=app_only_body(mailbox_server, **{field: value}),
        headers=tokens.headers(),
    )
    assert answer.status_code == 400
    assert field in answer.get_json()["details"]


def test_password_form_unchanged(client, tokens, smtp_server):
    from tests.conftest import settings_body

    body = settings_body(smtp_server)
    saved = client.post("/api/smtp/settings", json=body, headers=tokens.headers())
    assert saved.status_code == 200
    assert "auth" not in saved.get_json()["settings"]
    assert "auth" not in client.get("/api/smtp/settings", headers=tokens.headers()).get_json()


# -- the endpoints' guard -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allowlist"),
    [
        ("http://127.0.0.1:8080/{tenant}/token", ""),  # loopback, not allowlisted
        ("http://10.1.2.3/{tenant}/token", "10.0.0.0/8"),  # allowlisted, not loopback
        ("http://idp.internal/{tenant}/token", "idp.internal"),
        ("ftp://login.example/token", "127.0.0.1/32"),
        ("https://user:pw@login.example/token", ""),
    ],
)
def test_token_url_must_be_https_or_allowlisted_loopback(app_config, url, allowlist):
    config = {**app_config, "OAUTH_MICROSOFT_TOKEN_URL": url, "OAUTH_HOST_ALLOWLIST": allowlist}
    with pytest.raises(ConfigError, match="OAUTH_MICROSOFT_TOKEN_URL must be (an )?https"):
        create_app(config)


def test_token_request_to_a_refused_address_is_not_made(
    oauth_app, tokens, authority, mailbox_server
):
    """An https URL passes the configuration, but the guard checks the host's addresses before
    each request: loopback that OAUTH_HOST_ALLOWLIST does not cover is refused, unasked."""
    client = oauth_app(OAUTH_MICROSOFT_TOKEN_URL="https://[::1]:9/{tenant}/token").test_client()
    url = start(client, tokens, mailbox_server).get_json()["authorizationUrl"]
    answer = client.get("/api/smtp/oauth/callback", query_string=authority.consent(url))
    assert answer.status_code == 502
    assert "host is not allowed or does not resolve" in answer.get_json()["error"]


def test_a_slow_token_endpoint_is_bounded_by_the_send_deadline(
    oauth_app, tokens, authority, mailbox_server
):
    """A refresh is one stage of the send: it gets what is left of SMTP_DEADLINE, not more
    (the answer is a temporary auth failure instead of a late delivery)."""
    client = oauth_app(SMTP_POOL_SIZE="0", SMTP_DEADLINE="1").test_client()
    sign_in(client, tokens, authority, mailbox_server)
    authority.token_delay = 3.0
    services(client).oauth.clock = lambda: time.time() + 3600  # the cached token is old
    answer = send(client, tokens)
    assert answer.status_code == 502
    body = answer.get_json()
    assert body["category"] == "auth" and body["temporary"] is True
    assert mailbox_server.messages == []
