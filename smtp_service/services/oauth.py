"""OAuth2 sign-in for SMTP (SASL XOAUTH2) with Microsoft 365 and Google Workspace.

Authlib is the OAuth2 client: the authorization URL with PKCE (RFC 7636, S256), the code
exchange (RFC 6749 section 4.1.3), refresh (section 6) and client credentials (section 4.4).
This module decides what the service does around it:

- **Delegated sign-in**: start() records a sign-in in the database (the PKCE verifier
  encrypted for the account) and answers the provider's authorization URL with a signed,
  expiring `state` naming it; callback() takes that record once (a replay finds it used),
  exchanges the code and saves the refresh token encrypted for the account.
- **App-only** (Microsoft client credentials): the settings hold tenant, client id and secret.
- **Access tokens** are cached per worker until shortly before they expire. A refresh runs
  under a lock file of the account shared by every worker and instance on the data folder,
  and reads the refresh token from the file inside it: two workers never spend one refresh
  token twice, so a provider that rotates them never sees the older one again, and a rotated
  token is saved (atomically, compare-and-swap on the sign-in) before the lock is let go.
- A refresh the provider refuses (`invalid_grant`: consent revoked, password changed) marks
  the account `needsReauthorization`; its sends fail with an "auth" transport failure.
- Every request to a provider goes to an https URL (http only to a host OAUTH_HOST_ALLOWLIST
  names) whose addresses the SSRF guard checks first, without following redirects.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from authlib.common.security import generate_token
from authlib.integrations.base_client import OAuthError
from authlib.integrations.requests_client import OAuth2Session
from filelock import Timeout as LockTimeout
from itsdangerous import BadSignature, URLSafeTimedSerializer

from smtp_service.services.crypto import SecretBox, SecretError
from smtp_service.services.errors import (
    InvalidInput,
    OAuthNotConfigured,
    OAuthProviderUnavailable,
    OAuthSignInFailed,
    OAuthStateInvalid,
)
from smtp_service.services.hostnames import InvalidHost, normalise_host
from smtp_service.services.netguard import REFUSED_TEXT, HostGuard, HostRefused, HostUnresolved
from smtp_service.services.settings import SettingsService, StoredSettings
from smtp_service.services.transport import (
    REAUTHORIZE_TEXT,
    ConnectionCheck,
    OAuthLogin,
    Secret,
    SmtpEndpoint,
    TransportError,
)
from smtp_service.storage.oauth_states import OAuthStates

log = logging.getLogger(__name__)

CALLBACK_PATH = "/api/smtp/oauth/callback"
# Microsoft's {tenant} for delegated sign-in: work and school accounts of any tenant, which is
# what Microsoft 365 is ("common" would add personal accounts, "consumers" only those).
DELEGATED_TENANT = "organizations"
# App-only SMTP for Exchange Online: the .default scope of the Exchange resource.
MICROSOFT_APP_SCOPE = "https://outlook.office365.com/.default"
# An access token is renewed this long before it expires (at most half its lifetime), so that
# one handed to a connection is still good when the server reads it.
EXPIRY_MARGIN_SECONDS = 60.0
REFRESH_LOCK = "oauth-refresh"
REFRESH_LOCK_SECONDS = 30.0
# RFC 4954 section 6: 454 is a temporary authentication failure; a token endpoint that cannot
# be reached is one (TransportError.temporary reads the code).
TEMPORARY_AUTH_FAILURE = 454


@dataclass(frozen=True)
class Provider:
    """One provider as the operator configured it, with its documented SMTP defaults."""

    name: str  # "microsoft" or "google"
    client_id: str | None
    client_secret: Secret | None
    authorize_url: str  # Microsoft's may hold {tenant}
    token_url: str
    scope: str
    host: str
    port: int

    def url(self, template: str, tenant: str) -> str:
        """`template` with {tenant} filled in (Microsoft's endpoints are per tenant)."""
        return template.replace("{tenant}", tenant)


PROVIDER_DEFAULTS = {
    # name: (SMTP scope, submission host, port): Microsoft's "Authenticate an IMAP, POP or SMTP
    # connection using OAuth"; Google's "OAuth 2.0 Mechanism" for Gmail SMTP.
    "microsoft": ("https://outlook.office.com/SMTP.Send offline_access", "smtp.office365.com", 587),
    "google": ("https://mail.google.com/", "smtp.gmail.com", 587),
}


def providers_from_config(config: Any) -> dict[str, Provider]:
    """The two providers from the app's config (OAUTH_<NAME>_CLIENT_ID and the rest)."""
    made = {}
    for name, (scope, host, port) in PROVIDER_DEFAULTS.items():
        prefix = f"OAUTH_{name.upper()}_"
        secret = config[prefix + "CLIENT_SECRET"]
        made[name] = Provider(
            name=name,
            client_id=config[prefix + "CLIENT_ID"],
            client_secret=Secret(secret) if secret else None,
            authorize_url=config[prefix + "AUTHORIZE_URL"],
            token_url=config[prefix + "TOKEN_URL"],
            scope=scope,
            host=host,
            port=port,
        )
    return made


@dataclass(frozen=True)
class SignInRequest:
    """What POST /api/smtp/oauth/start asks for: the provider, the mailbox, and its server
    (None: the provider's submission server)."""

    provider: str
    user: str
    host: str | None = None
    port: int | None = None
    secure: bool | None = None
    require_tls: bool = True


@dataclass
class _Cached:
    token: Secret
    renew_at: float  # clock() seconds


class OAuthService:
    """OAuth2 sign-in and access tokens; implements transport.AccessTokens."""

    def __init__(
        self,
        *,
        settings: SettingsService,
        states: OAuthStates,
        box: SecretBox,
        providers: dict[str, Provider],
        guard: HostGuard,
        public_base_url: str | None,
        state_secret: bytes,
        state_seconds: int = 600,
        http_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.states = states
        self.box = box
        self.providers = providers
        self.guard = guard  # OAUTH_HOST_ALLOWLIST: which non-public endpoints are allowed
        self.redirect_uri = f"{public_base_url}{CALLBACK_PATH}" if public_base_url else None
        self._signer = URLSafeTimedSerializer(state_secret, salt="smtp-service oauth state")
        self.state_seconds = state_seconds
        self.http_timeout = http_timeout
        self.clock = clock
        self._cache: dict[OAuthLogin, _Cached] = {}
        self._locks: dict[OAuthLogin, threading.Lock] = {}
        self._lock = threading.Lock()
        self.refreshes = 0  # token requests made by this worker (tests, the benchmark)

    # -- delegated sign-in -------------------------------------------------------------------

    def start(self, account_id: str, user_id: str, request: SignInRequest) -> str:
        """Begin a delegated sign-in; the provider's authorization URL to send the user to.

        The URL carries PKCE (RFC 7636: S256 challenge; the verifier stays here, encrypted for
        the account) and a `state` signed by this service that names the sign-in, expires after
        OAUTH_STATE_SECONDS and can be used once. Raises OAuthNotConfigured (no application for
        the provider, or no PUBLIC_BASE_URL), InvalidInput on "host" (not a host, or one the
        SSRF guard refuses)."""
        provider = self._provider(request.provider)
        if self.redirect_uri is None:
            raise OAuthNotConfigured("PUBLIC_BASE_URL is not set (the callback's address)")
        host = self._host(request.host or provider.host)
        port = request.port or provider.port
        self.guard_smtp(host, port)
        secure = True if port == 465 else bool(request.secure)
        verifier = generate_token(64)  # RFC 7636 4.1: 43-128 characters of [A-Za-z0-9-._~]
        state_id = secrets.token_urlsafe(24)
        self.states.create(
            state_id,
            account_id,
            {
                "provider": provider.name,
                "user": request.user,
                "host": host,
                "port": port,
                "secure": secure,
                "requireTls": request.require_tls,
                "by": user_id,
            },
            self.box.encrypt(account_id, verifier),
            self.state_seconds,
        )
        state = self._signer.dumps({"s": state_id, "a": account_id})
        extra: dict[str, str] = {"login_hint": request.user}
        if provider.name == "google":  # a refresh token on every consent (Google's docs)
            extra.update(access_type="offline", prompt="consent")
        with self._client(provider) as client:
            url, _ = client.create_authorization_url(
                provider.url(provider.authorize_url, DELEGATED_TENANT),
                state=state,
                code_verifier=verifier,
                **extra,
            )
        log.info(
            "account %s: OAuth2 sign-in with %s started by %s", account_id, provider.name, user_id
        )
        return url

    def callback(
        self, state: str, code: str | None, error: str | None = None
    ) -> tuple[str, StoredSettings]:
        """Finish a delegated sign-in: (the account id, its saved settings).

        `state` must be one start() signed, unexpired and not used before; it names the
        account (the callback has no bearer token). The code is exchanged with the verifier
        of that sign-in, so a code issued for another sign-in fails PKCE at the provider.
        Raises OAuthStateInvalid, OAuthSignInFailed (the provider refused: `error` given, a
        refused code, no refresh token), OAuthProviderUnavailable."""
        try:
            signed = self._signer.loads(state, max_age=self.state_seconds)
        except BadSignature:
            raise OAuthStateInvalid() from None
        if not isinstance(signed, dict) or not isinstance(signed.get("s"), str):
            raise OAuthStateInvalid()
        pending = self.states.take(signed["s"])
        if pending is None or pending.account_id != signed.get("a"):
            raise OAuthStateInvalid()
        account_id = pending.account_id
        asked = pending.request
        if error:
            raise OAuthSignInFailed(_error_code(error))
        if not code:
            raise OAuthSignInFailed("the provider sent no authorization code")
        provider = self._provider(asked["provider"])
        try:
            verifier = self.box.decrypt(account_id, pending.verifier)
        except SecretError:
            raise OAuthStateInvalid() from None
        token_url = provider.url(provider.token_url, DELEGATED_TENANT)
        try:
            token = self._token_request(
                provider,
                token_url,
                lambda client: client.fetch_token(
                    token_url,
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=verifier,
                    **self._request_options(None),
                ),
            )
        except TransportError as exc:
            raise OAuthProviderUnavailable(exc.text) from None
        except OAuthError as exc:
            raise OAuthSignInFailed(_error_code(exc.error)) from None
        refresh = token.get("refresh_token")
        if not isinstance(refresh, str) or not refresh:
            raise OAuthSignInFailed(
                "the provider issued no refresh token (offline access was not granted)"
            )
        endpoint = SmtpEndpoint(
            host=asked["host"],
            port=asked["port"],
            secure=asked["secure"],
            user=asked["user"],
            require_tls=asked.get("requireTls", True),
            oauth=OAuthLogin(account_id, provider.name),
        )
        saved = self.settings.save_oauth(account_id, asked["by"], endpoint, Secret(refresh))
        self._remember(saved.endpoint.oauth, token)
        return account_id, saved

    # -- app-only (client credentials) --------------------------------------------------------

    def app_only_endpoint(self, account_id: str, fields: Mapping[str, Any]) -> SmtpEndpoint:
        """The endpoint of Microsoft client credentials (OAuthSettingsInput's fields: user,
        tenantId, clientId, clientSecret; host, port, secure, requireTls, maxConnections
        optional, the provider's submission server by default), not saved."""
        provider = self._provider_urls("microsoft")
        port = fields.get("port") or provider.port
        return SmtpEndpoint(
            host=fields.get("host") or provider.host,
            port=port,
            secure=True if port == 465 else bool(fields.get("secure")),
            user=fields["user"],
            require_tls=fields.get("requireTls", True),
            max_connections=fields.get("maxConnections"),
            oauth=OAuthLogin(
                account_id,
                provider.name,
                grant="client_credentials",
                tenant_id=fields["tenantId"],
                client_id=fields["clientId"],
                client_secret=Secret(fields["clientSecret"]),
            ),
        )

    def save_app_only(
        self, account_id: str, user_id: str, fields: Mapping[str, Any]
    ) -> StoredSettings:
        """Save Microsoft client credentials as the account's settings (app_only_endpoint's
        fields; the secret encrypted). InvalidInput on "host" as SettingsService.save."""
        return self.settings.save_oauth(
            account_id, user_id, self.app_only_endpoint(account_id, fields)
        )

    def test_app_only(self, account_id: str, fields: Mapping[str, Any]) -> ConnectionCheck:
        """The connection test of unsaved client credentials: a token from the provider, then
        connect, TLS, AUTH XOAUTH2, QUIT. Raises TransportError as SettingsService.test."""
        return self.settings.test(self.app_only_endpoint(account_id, fields))

    # -- access tokens (transport.AccessTokens) -----------------------------------------------

    def access_token(
        self, login: OAuthLogin, *, renew: bool = False, deadline: float | None = None
    ) -> Secret:
        """A valid access token for `login`: this worker's cached one until EXPIRY_MARGIN
        before it expires, else a new one (refresh token, or client credentials). `renew`
        skips the cache (the SMTP server refused the cached token with 535). `deadline`
        (time.monotonic() seconds) bounds the wait for another worker's refresh and the request
        to the provider, so that a send still ends within SMTP_DEADLINE.

        Raises TransportError "auth": the account needs reauthorization (the provider refused
        the grant: marked in its settings), the client credentials were refused, or the token
        endpoint failed (code 454: temporary). No text holds a token or secret."""
        if login.needs_reauthorization:
            raise TransportError("auth", REAUTHORIZE_TEXT)
        if not login.grant_id:  # unsaved client credentials (a connection test): not kept
            return self._remember(None, self._client_credentials(login, deadline))
        with self._lock:
            lock = self._locks.setdefault(login, threading.Lock())
        with lock:  # one refresh per login and worker at a time; the others use its token
            cached = self._cache.get(login)
            if cached is not None and not renew and self.clock() < cached.renew_at:
                return cached.token
            if login.grant == "client_credentials":
                token = self._client_credentials(login, deadline)
            else:
                token = self._refresh(login, deadline)
            return self._remember(login, token)

    def forget(self, account_id: str) -> None:
        """Drop this worker's access tokens of the account (its settings changed or went)."""
        with self._lock:
            for login in [k for k in self._cache if k.account_id == account_id]:
                self._cache.pop(login, None)
                self._locks.pop(login, None)

    def needs_reauthorization(self, account_id: str) -> bool:
        """True when the account's OAuth2 grant was refused and it must sign in again (for the
        health report)."""
        return self.settings.needs_reauthorization(account_id)

    def _remember(self, login: OAuthLogin | None, token: dict[str, Any]) -> Secret:
        access = token.get("access_token")
        if not isinstance(access, str) or not access:
            raise TransportError(
                "auth", "Authentication failed: the OAuth2 provider issued no access token",
                TEMPORARY_AUTH_FAILURE,
            )
        secret = Secret(access)
        try:
            lifetime = float(token.get("expires_in") or 3600)
        except (TypeError, ValueError):
            lifetime = 3600.0
        if login is not None:
            renew_at = self.clock() + lifetime - min(EXPIRY_MARGIN_SECONDS, lifetime / 2)
            self._cache[login] = _Cached(secret, renew_at)
        return secret

    def _client_credentials(self, login: OAuthLogin, deadline: float | None) -> dict[str, Any]:
        provider = self._provider_urls(login.provider)
        assert login.tenant_id and login.client_id and login.client_secret is not None
        token_url = provider.url(provider.token_url, login.tenant_id)
        app = Provider(
            name=provider.name,
            client_id=login.client_id,
            client_secret=login.client_secret,
            authorize_url=provider.authorize_url,
            token_url=token_url,
            scope=MICROSOFT_APP_SCOPE,
            host=provider.host,
            port=provider.port,
        )
        try:
            return self._token_request(
                app,
                token_url,
                lambda client: client.fetch_token(
                    token_url, grant_type="client_credentials", **self._request_options(deadline)
                ),
            )
        except OAuthError as exc:
            raise TransportError(
                "auth",
                "Authentication failed: the OAuth2 provider refused the client credentials "
                f"({_error_code(exc.error)})",
            ) from None

    def _refresh(self, login: OAuthLogin, deadline: float | None) -> dict[str, Any]:
        """A new access token from the stored refresh token, under the account's refresh lock
        (every worker and instance): the refresh token is read inside it, and a rotated one
        saved before it is let go."""
        provider = self._provider_urls(login.provider)
        token_url = provider.url(provider.token_url, DELEGATED_TENANT)
        try:
            wait = _within(REFRESH_LOCK_SECONDS, deadline)
            with self.settings.files.lock(login.account_id, REFRESH_LOCK, wait):
                grant = self.settings.read_grant(login.account_id)
                if grant is None or grant.grant_id != login.grant_id:
                    raise TransportError(
                        "auth",
                        "Authentication failed: the account's OAuth2 sign-in changed while "
                        "the message was being sent; send it again",
                        TEMPORARY_AUTH_FAILURE,
                    )
                if grant.needs_reauthorization:
                    raise TransportError("auth", REAUTHORIZE_TEXT)
                if grant.refresh_token is None:
                    raise TransportError("auth", REAUTHORIZE_TEXT)
                used = grant.refresh_token
                try:
                    token = self._token_request(
                        provider,
                        token_url,
                        lambda client: client.refresh_token(
                            token_url,
                            refresh_token=used.reveal(),
                            **self._request_options(deadline),
                        ),
                    )
                except OAuthError as exc:
                    if exc.error == "invalid_grant":
                        self.settings.mark_needs_reauthorization(
                            login.account_id, grant.grant_id, used
                        )
                        raise TransportError("auth", REAUTHORIZE_TEXT) from None
                    raise TransportError(
                        "auth",
                        "Authentication failed: the OAuth2 provider refused to renew the "
                        f"access token ({_error_code(exc.error)})",
                        TEMPORARY_AUTH_FAILURE,
                    ) from None
                rotated = token.get("refresh_token")
                if isinstance(rotated, str) and rotated and rotated != used.reveal():
                    self.settings.store_refresh_token(
                        login.account_id, grant.grant_id, used, Secret(rotated)
                    )
                return token
        except LockTimeout:
            raise TransportError(
                "auth",
                "Authentication failed: another worker is renewing the OAuth2 token; "
                "send it again",
                TEMPORARY_AUTH_FAILURE,
            ) from None

    # -- requests to the provider --------------------------------------------------------------

    def _request_options(self, deadline: float | None) -> dict[str, Any]:
        # No redirect is followed: a token endpoint answers, it does not send us elsewhere.
        return {"timeout": _within(self.http_timeout, deadline), "allow_redirects": False}

    def _token_request(
        self, provider: Provider, url: str, call: Callable[[OAuth2Session], Any]
    ) -> dict[str, Any]:
        """One request to a token endpoint through Authlib, after the SSRF guard checked the
        URL's host. Raises OAuthError (the provider's error answer, RFC 6749 5.2) or
        TransportError "auth" with code 454 (unreachable, refused by the guard, a server
        error, an answer that is not a token); never with the response's text."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            addresses = self.guard.addresses(host, parts.port or 443)
            # http only to loopback (a test server; the configuration allows no other): a
            # name that came to resolve elsewhere does not get a token request in the clear
            if parts.scheme != "https" and not all(
                ipaddress.ip_address(a).is_loopback for a in addresses
            ):
                raise HostRefused()
        except (HostRefused, HostUnresolved):
            raise TransportError(
                "auth",
                "Authentication failed: the OAuth2 token endpoint's host is not allowed or "
                "does not resolve",
                TEMPORARY_AUTH_FAILURE,
            ) from None
        self.refreshes += 1
        with self._client(provider) as client:
            try:
                token = call(client)
            except OAuthError:
                raise
            except (requests.RequestException, ValueError) as exc:
                raise TransportError(
                    "auth",
                    "Authentication failed: the OAuth2 token endpoint could not be used "
                    f"({type(exc).__name__})",
                    TEMPORARY_AUTH_FAILURE,
                ) from None
        return dict(token)

    def _client(self, provider: Provider) -> OAuth2Session:
        """An Authlib client for one exchange (client_secret_post: both providers document
        the secret in the form body)."""
        secret = provider.client_secret.reveal() if provider.client_secret else None
        session = OAuth2Session(
            client_id=provider.client_id,
            client_secret=secret,
            scope=provider.scope,
            redirect_uri=self.redirect_uri,
            code_challenge_method="S256",
            token_endpoint_auth_method="client_secret_post" if secret else "none",
        )
        session.trust_env = False  # no proxy or .netrc from the environment: the guard decides
        return session

    def _provider(self, name: str) -> Provider:
        """A provider that can run delegated sign-in (an application is configured)."""
        provider = self._provider_urls(name)
        if not provider.client_id:
            raise OAuthNotConfigured(f"OAUTH_{name.upper()}_CLIENT_ID is not set")
        return provider

    def _provider_urls(self, name: str) -> Provider:
        provider = self.providers.get(name)
        if provider is None:
            raise InvalidInput.field("provider", "Must be microsoft or google.")
        return provider

    def _host(self, host: str) -> str:
        try:
            return normalise_host(host)
        except InvalidHost as exc:
            raise InvalidInput.field("host", str(exc)) from None

    def guard_smtp(self, host: str, port: int) -> None:
        """Refuse an SMTP host accounts may not use (the settings' SSRF guard), as InvalidInput
        on "host"."""
        try:
            self.settings.guard.check(host, port)
        except HostRefused:
            raise InvalidInput.field("host", REFUSED_TEXT) from None


def _within(seconds: float, deadline: float | None) -> float:
    """`seconds`, or what is left of `deadline` (time.monotonic()) when that is less; raises
    TransportError "timeout" when nothing is left."""
    if deadline is None:
        return seconds
    left = deadline - time.monotonic()
    if left <= 0:
        raise TransportError("timeout", "Timed out before an OAuth2 access token was had")
    return min(seconds, left)


def _error_code(error: Any) -> str:
    """An OAuth2 error code as it may be shown: RFC 6749's characters only, at most 64."""
    text = str(error or "unknown_error")
    clean = "".join(c for c in text if c.isascii() and (c.isalnum() or c in "_-."))
    return clean[:64] or "unknown_error"
