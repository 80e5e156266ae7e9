"""A real OAuth2 authorization server on loopback, and an SMTP server that takes XOAUTH2 only
with an access token it issued and that is still valid.

The authorization server speaks HTTP (a threaded http.server): GET /{tenant}/authorize answers
the user's consent with a 302 to the redirect URI carrying a code (the user is the login_hint);
POST /{tenant}/token takes authorization_code (PKCE S256 checked, codes single use),
refresh_token (rotated on every use when `rotate`: the old one is then refused with
invalid_grant) and client_credentials (per tenant and application). Tests revoke grants,
expire access tokens, and read what was issued.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from tests.log_guard import GUARD
from tests.smtpd import RecordingHandler, SmtpServer

CLIENT_ID = "smtp-service-app"
CLIENT_SECRET = "app-secret-Zq81-never-shown"


def _secret(value: str, what: str) -> str:
    """A token or secret this server issues: the whole run's log guard looks for it too."""
    GUARD.add_secret(value, what)
    return value


@dataclass
class Grant:
    """One user's consent: its refresh token (the current one) and whether it was revoked."""

    user: str
    client_id: str
    scope: str
    refresh_token: str
    revoked: bool = False


@dataclass
class Issued:
    """An access token: who it signs in (a mailbox, or an application's mailboxes)."""

    user: str | None  # None: an application token (client credentials)
    expires_at: float
    tenant: str | None = None
    revoked: bool = False


@dataclass
class AuthorizationServer:
    """The server's state; `start()` serves it on 127.0.0.1."""

    client_id: str = CLIENT_ID
    client_secret: str = CLIENT_SECRET
    rotate: bool = True
    access_seconds: int = 3600
    token_delay: float = 0.0  # seconds each token request waits before it is answered
    token_length: int = 24  # random bytes in each access token ("at-" + url-safe base64)
    # client credentials: (tenant, client id) -> (secret, mailboxes the application may send as)
    apps: dict[tuple[str, str], tuple[str, set[str]]] = field(default_factory=dict)
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    grants: dict[str, Grant] = field(default_factory=dict)  # refresh token -> grant
    used_refresh: set[str] = field(default_factory=set)
    tokens: dict[str, Issued] = field(default_factory=dict)
    token_requests: list[dict[str, str]] = field(default_factory=list)  # every form received
    lock: threading.Lock = field(default_factory=threading.Lock)
    httpd: ThreadingHTTPServer | None = None

    # -- serving -----------------------------------------------------------------------------

    def start(self) -> AuthorizationServer:
        _secret(self.client_secret, "the OAuth2 client secret")
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                status, headers, body = state.handle_get(self.path)
                self._send(status, headers, body)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                form = {
                    k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()
                }
                status, body = state.handle_token(self.path, form)
                self._send(status, {"Content-Type": "application/json"}, json.dumps(body))

            def _send(self, status: int, headers: dict[str, str], body: str) -> None:
                data = body.encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    @property
    def base(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def config(self, provider: str = "MICROSOFT") -> dict[str, str]:
        """The app's OAUTH_* settings pointing at this server."""
        return {
            f"OAUTH_{provider}_CLIENT_ID": self.client_id,
            f"OAUTH_{provider}_CLIENT_SECRET": self.client_secret,
            f"OAUTH_{provider}_AUTHORIZE_URL": self.base + "/{tenant}/authorize",
            f"OAUTH_{provider}_TOKEN_URL": self.base + "/{tenant}/token",
            "OAUTH_HOST_ALLOWLIST": "127.0.0.1/32",
        }

    # -- the user's side ---------------------------------------------------------------------

    def consent(self, authorization_url: str) -> dict[str, str]:
        """What a browser does: open the authorization URL (the user consents) and read where
        the provider redirects; the callback's query {code, state} (or {error, state})."""

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
                return None

        opener = urllib.request.build_opener(NoRedirect)
        try:
            opener.open(authorization_url, timeout=5)
        except urllib.error.HTTPError as exc:  # the 302, not followed
            location = exc.headers["Location"]
            exc.close()
        else:
            raise AssertionError("the authorization endpoint did not redirect")
        return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}

    def handle_get(self, path: str) -> tuple[int, dict[str, str], str]:
        parts = urlsplit(path)
        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if not parts.path.endswith("/authorize"):
            return 404, {}, "not found"
        if q.get("client_id") != self.client_id or q.get("response_type") != "code":
            return 400, {}, "bad client or response type"
        if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            return 400, {}, "PKCE S256 required"
        redirect = q["redirect_uri"]
        if q.get("deny"):
            query = {"error": "access_denied", "state": q.get("state", "")}
        else:
            code = _secret(secrets.token_urlsafe(16), "an OAuth2 authorization code")
            with self.lock:
                self.codes[code] = {
                    "user": q.get("login_hint", "someone@example.com"),
                    "redirect_uri": redirect,
                    "challenge": q["code_challenge"],
                    "scope": q.get("scope", ""),
                }
            query = {"code": code, "state": q.get("state", "")}
        return 302, {"Location": f"{redirect}?{urlencode(query)}"}, ""

    # -- the token endpoint ------------------------------------------------------------------

    def handle_token(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if self.token_delay:  # outside the lock: requests made at once overlap here
            time.sleep(self.token_delay)
        with self.lock:
            self.token_requests.append(dict(form))
            tenant = urlsplit(path).path.strip("/").split("/")[0]
            kind = form.get("grant_type")
            if kind == "client_credentials":
                return self._client_credentials(tenant, form)
            if (form.get("client_id"), form.get("client_secret")) != (
                self.client_id,
                self.client_secret,
            ):
                return 401, {"error": "invalid_client"}
            if kind == "authorization_code":
                return self._code(form)
            if kind == "refresh_token":
                return self._refresh(form)
            return 400, {"error": "unsupported_grant_type"}

    def _code(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        asked = self.codes.pop(form.get("code", ""), None)  # single use
        if asked is None or asked["redirect_uri"] != form.get("redirect_uri"):
            return 400, {"error": "invalid_grant"}
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
        if challenge.rstrip(b"=").decode() != asked["challenge"]:
            return 400, {"error": "invalid_grant", "error_description": "PKCE mismatch"}
        refresh = _secret("rt-" + secrets.token_urlsafe(24), "an OAuth2 refresh token")
        self.grants[refresh] = Grant(asked["user"], self.client_id, asked["scope"], refresh)
        return 200, self._issue(asked["user"], refresh)

    def _refresh(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        token = form.get("refresh_token", "")
        grant = self.grants.get(token)
        if grant is None or grant.revoked or token in self.used_refresh:
            return 400, {"error": "invalid_grant", "error_description": "AADSTS70000"}
        refresh = token
        if self.rotate:  # the old one is spent: presenting it again is invalid_grant
            self.used_refresh.add(token)
            refresh = _secret("rt-" + secrets.token_urlsafe(24), "an OAuth2 refresh token")
            grant.refresh_token = refresh
            self.grants[refresh] = grant
        return 200, self._issue(grant.user, refresh)

    def _client_credentials(self, tenant: str, form: dict[str, str]) -> tuple[int, dict]:
        app = self.apps.get((tenant, form.get("client_id", "")))
        if app is None or app[0] != form.get("client_secret"):
            return 401, {"error": "invalid_client"}
        if form.get("scope") != "https://outlook.office365.com/.default":
            return 400, {"error": "invalid_scope"}
        access = _secret("at-app-" + secrets.token_urlsafe(24), "an OAuth2 access token")
        self.tokens[access] = Issued(None, time.time() + self.access_seconds, tenant)
        return 200, {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.access_seconds,
        }

    def _issue(self, user: str, refresh: str) -> dict[str, Any]:
        access = _secret(
            "at-" + secrets.token_urlsafe(self.token_length), "an OAuth2 access token"
        )
        self.tokens[access] = Issued(user, time.time() + self.access_seconds)
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.access_seconds,
            "refresh_token": refresh,
            "scope": "https://outlook.office.com/SMTP.Send",
        }

    # -- what tests do -----------------------------------------------------------------------

    def valid(self, token: str, user: str) -> bool:
        """True when `token` is a current access token that may send as `user`."""
        with self.lock:
            issued = self.tokens.get(token)
            if issued is None or issued.revoked or issued.expires_at <= time.time():
                return False
            if issued.user is None:  # an application's token: the mailboxes it was granted
                return any(
                    user in mailboxes
                    for (tenant, _), (_, mailboxes) in self.apps.items()
                    if tenant == issued.tenant
                )
            return issued.user == user

    def expire_access_tokens(self) -> None:
        """Every access token issued so far expires now (the server's clock moved on)."""
        with self.lock:
            for issued in self.tokens.values():
                issued.expires_at = 0

    def revoke(self, user: str) -> None:
        """The user withdrew consent: refresh and access tokens of theirs stop working."""
        with self.lock:
            for grant in self.grants.values():
                if grant.user == user:
                    grant.revoked = True
            for issued in self.tokens.values():
                if issued.user == user:
                    issued.revoked = True

    def secrets_issued(self) -> list[str]:
        """Every token and secret a leak check must not find anywhere."""
        with self.lock:
            return [*self.tokens, *self.grants, self.client_secret] + [
                secret for secret, _ in self.apps.values()
            ]


class XOAuth2Handler(RecordingHandler):
    """Takes AUTH XOAUTH2 (with or without an initial response) only with a token the
    authorization server says is valid for the user; a refusal comes as Gmail's: a 334 with
    a base64 JSON error, the client's empty line, then 535."""

    def __init__(self, authority: AuthorizationServer) -> None:
        super().__init__()
        self.authority = authority
        self.attempts: list[tuple[str, str, bool]] = []  # (user, token, accepted)
        self.fail_next = 0  # answer this many more valid tokens with 535 all the same

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> AuthResult:  # noqa: N802
        if len(args) == 1:
            blob = await server.challenge_auth("", encode_to_b64=False)
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            blob = base64.b64decode(args[1])
        fields = dict(
            part.split("=", 1) for part in blob.decode().split("\x01") if "=" in part
        )
        user = fields.get("user", "")
        token = fields.get("auth", "").removeprefix("Bearer ")
        ok = self.authority.valid(token, user)
        if ok and self.fail_next:
            self.fail_next -= 1
            ok = False
        with self.lock:
            self.attempts.append((user, token, ok))
        if ok:
            return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))
        error = json.dumps({"status": "401", "schemes": "bearer", "scope": "SMTP.Send"})
        await server.challenge_auth(error)  # the client answers with an empty line
        return AuthResult(
            success=False, handled=False, message="535 5.7.8 Username and Password not accepted"
        )


class _LongLines(SMTP):
    """aiosmtpd with lines of up to 16 KiB: Exchange Online and Gmail take XOAUTH2 responses
    of kilobytes (aiosmtpd's own limit is RFC 5321's 1,000 octets)."""

    line_length_limit = 16384


def xoauth2_smtp(server_tls: Any, authority: AuthorizationServer) -> SmtpServer:
    """A STARTTLS SMTP server on loopback that offers only AUTH XOAUTH2 and requires it."""
    handler = XOAuth2Handler(authority)
    server = SmtpServer(
        mode="starttls",
        users={"nobody@invalid": "-"},  # AUTH required; PLAIN and LOGIN are not offered
        server_context=server_tls,
        handler=handler,
        auth_mechanisms=(),
    )
    controller = server.controller
    controller.factory = lambda: _LongLines(controller.handler, **controller.SMTP_kwargs)
    return server.start()
