"""OAuth2 sign-in through real gunicorn (2 workers): the delegated flow over HTTP, sends that
each worker signs in for with XOAUTH2, and a revoked grant that every worker then refuses to
use, with no token in gunicorn's output."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from tests.e2e.conftest import free_port, service_environment, start_live
from tests.oauth_server import AuthorizationServer
from tests.smtpd import SmtpServer

MAILBOX = "mailbox@contoso.example"
ACCOUNT = "acct-oauth-e2e"


def test_oauth2_sign_in_and_sends_through_gunicorn(
    tmp_path: Path,
    trust_test_ca: str,
    global_server: SmtpServer,
    authority: AuthorizationServer,
    mailbox_server: SmtpServer,
) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    env = service_environment(
        port=port,
        data_dir=data_dir,
        ca_file=trust_test_ca,
        global_server=global_server,
        SMTP_POOL_SIZE="0",  # every send signs in: both workers need tokens
        **authority.config(),
    )
    live = start_live(
        port=port,
        data_dir=data_dir,
        log_path=tmp_path / "gunicorn.log",
        env=env,
        global_server=global_server,
        account_server=mailbox_server,
    )
    try:
        token = live.token(ACCOUNT)
        started = live.request(
            "POST",
            "/api/smtp/oauth/start",
            {
                "provider": "microsoft",
                "user": MAILBOX,
                "host": "localhost",
                "port": mailbox_server.port,
            },
            token=token,
        )
        assert started.status == 200, started.text
        url = started.json["authorizationUrl"]
        redirect = parse_qs(urlsplit(url).query)["redirect_uri"][0]
        assert redirect == f"http://127.0.0.1:{port}/api/smtp/oauth/callback"
        query = authority.consent(url)
        callback = live.request("GET", "/api/smtp/oauth/callback?" + urlencode(query))
        assert callback.status == 200, callback.text
        replay = live.request("GET", "/api/smtp/oauth/callback?" + urlencode(query))
        assert replay.status == 400

        def send(subject: str) -> Any:
            body = {"from": MAILBOX, "to": "rcpt@example.net", "subject": subject, "text": "Hi"}
            return live.request("POST", "/api/messages/send-email", body, token=token)

        for n in range(8):  # spread over both workers
            answer = send(f"message {n}")
            assert answer.status == 200, answer.text
        assert len(mailbox_server.messages) == 8
        assert all(m.auth_login == MAILBOX for m in mailbox_server.messages)

        authority.revoke(MAILBOX)  # access and refresh tokens stop working
        answers = [send(f"after revocation {n}") for n in range(4)]
        assert [a.status for a in answers] == [502] * 4
        assert all("needs reauthorization" in a.json["error"] for a in answers)
        shown = live.request("GET", "/api/smtp/settings", token=token).json
        assert shown["needsReauthorization"] is True and shown["hasRefreshToken"] is True
        assert len(mailbox_server.messages) == 8
        for text in [started.text, callback.text, *(a.text for a in answers), str(shown)]:
            assert not any(secret in text for secret in authority.secrets_issued())
    finally:
        live.stop()
    live.secrets.extend(authority.secrets_issued())
    live.assert_log_clean()
