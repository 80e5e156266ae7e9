"""OAuth2 access tokens across workers, long tokens, key rotation: OAuthService against the real
authorization server and XOAUTH2 SMTP server of tests/oauth_server.py."""

from __future__ import annotations

import json
import threading

from smtp_service.services.crypto import new_key
from smtp_service.services.transport import Secret, xoauth2_response
from tests.api.test_oauth2 import MAILBOX, send, services, settings_file, sign_in


def test_xoauth2_response_is_the_providers_format():
    """Google's and Microsoft's XOAUTH2: base64 of user=...^Aauth=Bearer ...^A^A."""
    import base64

    assert base64.b64decode(xoauth2_response("a@b.example", "tok")) == (
        b"user=a@b.example\x01auth=Bearer tok\x01\x01"
    )


def test_two_workers_refreshing_at_once_keep_the_newest_refresh_token(
    oauth_app, tokens, authority, mailbox_server
):
    """Two workers (two apps on one data folder and database, each with its own token cache)
    renew at the same moment, against a provider that spends a refresh token on first use:
    the account's refresh lock makes the second read the token the first saved, so neither
    is refused and the file ends with the newest one."""
    first, second = oauth_app(), oauth_app()
    sign_in(first.test_client(), tokens, authority, mailbox_server)
    login = services(first.test_client()).settings.load("acct-a").endpoint.oauth
    authority.token_delay = 0.3  # both requests would be in flight together without the lock
    for _round in range(3):
        barrier = threading.Barrier(2)
        failures: list[BaseException] = []

        def renew(app, barrier=barrier, failures=failures) -> None:
            barrier.wait()
            try:
                app.extensions["smtp_service"].oauth.access_token(login, renew=True)
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        threads = [threading.Thread(target=renew, args=(app,)) for app in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
    grant = services(first.test_client()).settings.read_grant("acct-a")
    current = next(g for g in authority.grants.values() if g.user == MAILBOX).refresh_token
    assert grant is not None and grant.refresh_token.reveal() == current
    assert grant.needs_reauthorization is False
    refreshes = [r for r in authority.token_requests if r["grant_type"] == "refresh_token"]
    assert len(refreshes) == 6 and len({r["refresh_token"] for r in refreshes}) == 6


def test_a_new_sign_in_wins_over_a_refresh_that_ran_meanwhile(
    oauth_app, tokens, authority, mailbox_server
):
    """A rotated refresh token is saved only while the file still holds the sign-in it came
    from (compare-and-swap): a sign-in saved in between is not overwritten."""
    app = oauth_app()
    client = app.test_client()
    sign_in(client, tokens, authority, mailbox_server)
    settings = services(client).settings
    old = settings.read_grant("acct-a")
    sign_in(client, tokens, authority, mailbox_server)  # a new sign-in: a new grant id
    new = settings.read_grant("acct-a")

    stale = (old.grant_id, old.refresh_token)
    assert not settings.store_refresh_token("acct-a", *stale, Secret("x"))
    assert not settings.mark_needs_reauthorization("acct-a", *stale)
    assert settings.read_grant("acct-a") == new


def test_long_access_tokens_go_after_the_servers_challenge(
    oauth_app, tokens, authority, mailbox_server
):
    """Microsoft's access tokens run to kilobytes: the response goes on its own line after
    AUTH XOAUTH2's empty challenge (RFC 4954 section 4), not on the command line."""
    authority.token_length = 1500
    client = oauth_app().test_client()
    sign_in(client, tokens, authority, mailbox_server)
    assert send(client, tokens).status_code == 200
    [(user, token, ok)] = mailbox_server.handler.attempts
    assert ok and user == MAILBOX and len(token) > 2000


def test_rotate_key_reencrypts_oauth_secrets(
    oauth_app, app_config, tokens, authority, mailbox_server
):
    old_key = app_config["SMTP_ENCRYPTION_KEYS"]
    client = oauth_app().test_client()
    sign_in(client, tokens, authority, mailbox_server)
    authority.apps[("contoso.onmicrosoft.com", "app-1")] = ("app-secret-rotate-1", {MAILBOX})
    body = {
        "auth": "oauth2",
        "provider": "microsoft",
        "user": MAILBOX,
        "tenantId": "contoso.onmicrosoft.com",
        "clientId": "app-1",
        "clientSecret": "app-secret-rotate-1",
        "host": "localhost",
        "port": mailbox_server.port,
    }
    saved = client.post("/api/smtp/settings", json=body, headers=tokens.headers("acct-b"))
    assert saved.status_code == 200
    before = {a: settings_file(client, a) for a in ("acct-a", "acct-b")}
    rotated = oauth_app(SMTP_ENCRYPTION_KEYS=f"{new_key()},{old_key}")
    result = rotated.test_cli_runner().invoke(args=["smtp", "rotate-key"])
    assert result.exit_code == 0, result.output
    box = rotated.extensions["smtp_service"].box
    after = {a: settings_file(client, a) for a in ("acct-a", "acct-b")}
    assert box.is_current(after["acct-a"]["refreshToken"])
    assert box.is_current(after["acct-b"]["clientSecret"])
    assert after["acct-a"]["refreshToken"] != before["acct-a"]["refreshToken"]
    again = rotated.test_cli_runner().invoke(args=["smtp", "rotate-key"])
    assert again.exit_code == 0 and {a: settings_file(client, a) for a in after} == after
    rotated_client = rotated.test_client()
    for account in ("acct-a", "acct-b"):
        assert send(rotated_client, tokens, account).status_code == 200
    assert json.dumps(after).count("app-secret-rotate-1") == 0
