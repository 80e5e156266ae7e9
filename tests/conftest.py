"""Shared fixtures: real aiosmtpd servers with TLS and AUTH, the app on a temporary data folder,
and a helper that makes tokens (valid and hostile)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import jwt as pyjwt
import pytest
import trustme

from smtp_service import create_app
from smtp_service.services.crypto import new_key
from smtp_service.storage import database as database_module
from tests.smtpd import SmtpServer

pytest_plugins = ["tests.log_guard", "tests.databases", "tests.redis_store"]

JWT_SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
SMTP_USER = "mailer@example.com"
SMTP_PASSWORD = "s3cret-Pa55word!"
# GET /api/smtp/settings for the spec's example settings (smtp.example.com:587, user@example.com)
SPEC_EXAMPLE_VIEW = {
    "host": "smtp.example.com",
    "port": 587,
    "secure": False,
    "user": "user@example.com",
    "hasPassword": True,
    "isGlobal": False,
    "requireTls": True,
}


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A private CA; the process trusts it through SSL_CERT_FILE, as a deployment would."""
    return trustme.CA()


@pytest.fixture(autouse=True)
def _close_database_connections() -> Iterator[None]:
    """After each test, close the pooled connections of every message database still alive
    (the next use opens new ones): apps a test made are collected late, and PostgreSQL takes
    100 connections in all (each app keeps up to DATABASE_POOL_SIZE of them)."""
    yield
    for db in list(database_module._live):
        db.dispose()


@pytest.fixture(scope="session", autouse=True)
def trust_test_ca(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("ca") / "ca.pem")
    ca.cert_pem.write_to_path(path)
    old = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = path
    yield path
    if old is None:
        os.environ.pop("SSL_CERT_FILE", None)
    else:
        os.environ["SSL_CERT_FILE"] = old


@pytest.fixture(scope="session")
def server_tls(ca: trustme.CA):
    """The server-side TLS context of a certificate for localhost and 127.0.0.1."""
    import ssl

    cert = ca.issue_cert("localhost", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx


@pytest.fixture
def smtp_factory(server_tls) -> Iterator[Any]:
    """Start SMTP servers on demand; all are stopped at the end of the test."""
    started: list[SmtpServer] = []

    def _start(
        mode: str = "starttls", users: dict[str, str] | None = None, **kwargs: Any
    ) -> SmtpServer:
        users = {SMTP_USER: SMTP_PASSWORD} if users is None else users
        kwargs.setdefault("server_context", server_tls)
        server = SmtpServer(mode=mode, users=users, **kwargs).start()
        started.append(server)
        return server

    yield _start
    for server in started:
        server.stop()


# The two ways a client may send its commands (RFC 2920). In a module marked
# `pytestmark = pytest.mark.both_pipelining_modes`, every test that uses `servers` (or `server`)
# runs twice: against servers without PIPELINING, then with it.
PIPELINING_MODES = ("one command at a time", "pipelined")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run the tests marked both_pipelining_modes that use `servers` in each PIPELINING_MODE."""
    if "servers" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_pipelining_modes"
    ):
        metafunc.parametrize("servers", PIPELINING_MODES, indirect=True)


@pytest.fixture
def servers(server_tls, request) -> Iterator[Any]:
    """Fault-injecting servers on demand (tests/smtpd_faults.py); all stopped at the end.
    Parametrized indirectly with one of PIPELINING_MODES, they offer PIPELINING or not."""
    from tests.smtpd_faults import FaultyServers

    made = FaultyServers(server_tls, {SMTP_USER: SMTP_PASSWORD})
    mode = getattr(request, "param", None)
    if mode is not None:
        assert mode in PIPELINING_MODES, mode
        made.pipelining = mode == "pipelined"
    yield made
    made.stop_all()


@pytest.fixture
def server(servers) -> Any:
    """One fault-injecting server made by `servers` with its defaults (a FaultyServer)."""
    return servers()


@pytest.fixture
def smtp_server(smtp_factory) -> SmtpServer:
    """A STARTTLS-required, AUTH-required server (the common real-world setup)."""
    return smtp_factory("starttls")


@pytest.fixture
def global_server(smtp_factory) -> SmtpServer:
    """The global fallback server: STARTTLS and AUTH with its own user."""
    return smtp_factory("starttls", users={"global@example.com": "global-pass-XYZ"})


@pytest.fixture
def app_config(tmp_path, global_server, database_url) -> dict[str, Any]:
    """The app on both engines: SQLite by default (DATABASE_URL unset: the file in DATA_DIR),
    and PostgreSQL where TEST_DATABASE_URL names a server."""
    return {
        "TESTING": True,
        "DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": "" if database_url.startswith("sqlite") else database_url,
        "JWT_SECRET_KEY": JWT_SECRET,
        "SMTP_ENCRYPTION_KEYS": new_key(),
        "SMTP_HOST_ALLOWLIST": "127.0.0.1/32,localhost",
        "SMTP_HOST": "localhost",
        "SMTP_PORT": str(global_server.port),
        "SMTP_USER": "global@example.com",
        "SMTP_PASS": "global-pass-XYZ",
        "SMTP_FROM": "noreply@example.com",
        "SMTP_TIMEOUT": "3",
        "PUBLIC_BASE_URL": "http://localhost",  # open tracking on (off without it)
        # Many tests try connections with one account in one app: the default of 5 a minute
        # is tested where limits are (tests/api/test_request_limits.py).
        "SMTP_TEST_RATE_LIMIT": "10000/minute",
    }


@pytest.fixture
def app(app_config):
    app = create_app(app_config)
    yield app
    # QUIT pooled connections before the test's SMTP servers stop; close database connections
    app.extensions["smtp_service"].pool.close_all()
    app.extensions["smtp_service"].database.dispose()


@pytest.fixture
def authority():
    """A real OAuth2 authorization server on loopback (tests/oauth_server.py)."""
    from tests.oauth_server import AuthorizationServer

    server = AuthorizationServer().start()
    yield server
    server.stop()


@pytest.fixture
def mailbox_server(server_tls, authority):
    """A STARTTLS SMTP server that takes AUTH XOAUTH2 only with a token `authority` issued."""
    from tests.oauth_server import xoauth2_smtp

    server = xoauth2_smtp(server_tls, authority)
    yield server
    server.stop()


@pytest.fixture
def oauth_app(app_config, authority, mailbox_server):
    """Apps with OAuth2 pointed at `authority` (overrides: more config); torn down before the
    servers, so pooled connections QUIT while they still listen."""
    made = []

    def _make(**overrides: str):
        app = create_app({**app_config, **authority.config(), **overrides})
        made.append(app)
        return app

    yield _make
    for app in made:
        app.extensions["smtp_service"].pool.close_all()
        app.extensions["smtp_service"].database.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


class Tokens:
    """Makes bearer tokens for an account, and hostile ones."""

    def __init__(self, secret: str = JWT_SECRET) -> None:
        self.secret = secret

    def make(
        self,
        account: str | None = "acct-a",
        user: str = "user-1",
        *,
        exp: Any = "default",
        algorithm: str = "HS256",
        key: Any = None,
        **claims: Any,
    ) -> str:
        payload: dict[str, Any] = {
            "sub": user,
            "type": "access",
            "iat": int(time.time()),
            "jti": os.urandom(8).hex(),
            **claims,
        }
        if account is not None:
            payload["accountId"] = account
        if exp == "default":
            payload["exp"] = int(time.time()) + 600
        elif exp is not None:
            payload["exp"] = exp
        return pyjwt.encode(payload, key if key is not None else self.secret, algorithm=algorithm)

    def headers(self, account: str | None = "acct-a", **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.make(account, **kwargs)}"}


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """With umask 0 every mode seen is the one the code asked for, not one the umask trimmed."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


def settings_body(server: SmtpServer, **overrides: Any) -> dict[str, Any]:
    """A settings body that points at a test server and logs in as its user."""
    body = {
        "host": "localhost",
        "port": server.port,
        "secure": server.mode == "implicit",
        "user": SMTP_USER,
        "pass": SMTP_PASSWORD,
    }
    body.update(overrides)
    return body
