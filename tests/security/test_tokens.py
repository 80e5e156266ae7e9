"""Every authenticated route refuses every bad token: a JSON 401, no file created or changed, no
SMTP connection made. The routes that need no token are exactly the health check, the OpenAPI
document and the open-tracking pixel.

The routes are read from app.url_map, so a route added later is covered without touching this
file (and an unknown path argument makes `fill_rule` fail loudly instead of skipping it).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask
from jwt.algorithms import RSAAlgorithm

from smtp_service import create_app
from smtp_service.services.crypto import new_key
from tests.conftest import JWT_SECRET, SMTP_PASSWORD, SMTP_USER, Tokens, settings_body
from tests.security import (
    count_connections,
    fill_rule,
    hmac_token,
    tree_state,
    unsigned_token,
)
from tests.smtpd import SmtpServer

# The OAuth2 callback is reached by the user's browser from the provider: its signed state
# names the account (tests/api/test_oauth2.py), never a bearer token.
PUBLIC_RULES = {
    "/healthz",
    "/api/openapi.json",
    "/t/open/<string:token>.gif",
    # for operators: readiness, the metrics (loopback and METRICS_ALLOW_CIDRS only), the docs page
    "/readyz",
    "/metrics",
    "/api/docs/",
    "/api/docs/<path:path>",
    "/api/smtp/oauth/callback",
}
GLOBAL_USER = "global@example.com"
GLOBAL_PASSWORD = "global-pass-XYZ"
SENDER = "verified@example.com"
SUPPRESSED = "bad-seed@example.net"
_DROP = object()


# -- a seeded service: account acct-a with settings, a sender, a suppression and a message ----


@dataclass
class World:
    app: Flask
    root: str  # holds DATA_DIR; a path traversal out of DATA_DIR would land here
    message_id: str
    own: SmtpServer
    own_seen: list[object]
    glob: SmtpServer
    glob_seen: list[object]

    @property
    def client(self) -> Any:
        return self.app.test_client()

    def url(self, rule: str) -> str:
        email = SUPPRESSED if rule.startswith("/api/suppressions") else SENDER
        return fill_rule(rule, {"message_id": self.message_id, "email": email, "token": "x",
                                 "path": "index.html"})

    def body(self, method: str, rule: str) -> dict[str, Any] | None:
        """A body that would act (write a file, connect to a server) if auth were bypassed."""
        if method not in {"POST", "PUT", "PATCH"}:
            return None
        if rule in {"/api/smtp/settings", "/api/smtp/test"}:
            return settings_body(self.own)
        if rule == "/api/messages/send-email":
            return {"from": SMTP_USER, "to": "rcpt@example.net", "subject": "s", "text": "t"}
        if rule == "/api/senders":
            return {"email": "new-sender@example.com"}
        return {}


def authenticated_routes(app: Flask) -> list[tuple[str, str]]:
    """(method, rule) of every route but the public ones. OPTIONS is answered by Flask itself
    without running a view (see test_options_runs_no_view); Flask's default static route is
    left to test_unauthenticated_routes_are_exactly_the_public_ones."""
    routes = []
    for rule in app.url_map.iter_rules():
        if rule.rule in PUBLIC_RULES or rule.endpoint == "static":
            continue
        for method in sorted((rule.methods or set()) - {"OPTIONS"}):
            routes.append((method, rule.rule))
    return sorted(routes)


@contextlib.contextmanager
def open_world(
    root: Path, server_tls: Any, valid_token: Callable[[], str], **config: Any
) -> Iterator[World]:
    own = SmtpServer(
        mode="starttls", users={SMTP_USER: SMTP_PASSWORD}, server_context=server_tls
    ).start()
    glob = SmtpServer(
        mode="starttls", users={GLOBAL_USER: GLOBAL_PASSWORD}, server_context=server_tls
    ).start()
    try:
        settings: dict[str, Any] = {
            "TESTING": True,
            "DATA_DIR": str(root / "data"),
            "JWT_SECRET_KEY": JWT_SECRET,
            "SMTP_ENCRYPTION_KEYS": new_key(),
            "SMTP_HOST_ALLOWLIST": "127.0.0.1/32,localhost",
            "SMTP_HOST": "localhost",
            "SMTP_PORT": str(glob.port),
            "SMTP_USER": GLOBAL_USER,
            "SMTP_PASS": GLOBAL_PASSWORD,
            "SMTP_FROM": "noreply@example.com",
            "SMTP_TIMEOUT": "3",
        }
        settings.update(config)
        app = create_app({k: v for k, v in settings.items() if v is not _DROP})
        try:
            client = app.test_client()
            auth = {"Authorization": f"Bearer {valid_token()}"}
            r = client.post("/api/smtp/settings", json=settings_body(own), headers=auth)
            assert r.status_code == 200, r.json
            r = client.post("/api/senders", json={"email": SENDER}, headers=auth)
            assert r.status_code == 201, r.json
            r = client.post(
                "/api/messages/send-email",
                json={"from": SMTP_USER, "to": SUPPRESSED, "subject": "s", "text": "t"},
                headers=auth,
            )
            assert r.status_code == 502 and r.json["bounce"]["type"] == "hard", r.json
            sup = client.get("/api/suppressions", headers=auth).json["suppressions"]
            assert [s["email"] for s in sup] == [SUPPRESSED]
            # no idle pooled connection: a bypassed send would have to open a new one
            app.extensions["smtp_service"].pool.close_all()
            yield World(
                app=app,
                root=str(root),
                message_id=r.json["messageId"],
                own=own,
                own_seen=count_connections(own),
                glob=glob,
                glob_seen=count_connections(glob),
            )
        finally:
            app.extensions["smtp_service"].pool.close_all()
    finally:
        own.stop()
        glob.stop()


def assert_refused_everywhere(world: World, headers: dict[str, str], query: str = "") -> None:
    """Every authenticated route answers 401 JSON; nothing on disk or on the wire changes."""
    routes = authenticated_routes(world.app)
    before = tree_state(world.root)
    delivered = (len(world.own.messages), len(world.glob.messages))
    client = world.client
    for method, rule in routes:
        r = client.open(
            world.url(rule) + query,
            method=method,
            headers=headers,
            json=world.body(method, rule),
        )
        answer = (method, rule, r.status_code, r.get_data(as_text=True))
        assert r.status_code == 401, answer
        assert r.mimetype == "application/json", answer
        if method != "HEAD":
            assert set(r.json) == {"error"}, answer
            assert isinstance(r.json["error"], str) and r.json["error"], answer
    assert tree_state(world.root) == before
    assert world.own_seen == [] and world.glob_seen == []
    assert (len(world.own.messages), len(world.glob.messages)) == delivered


# -- keys --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "user-1",
        "accountId": "acct-a",
        "type": "access",
        "iat": now,
        "exp": now + 600,
        "jti": os.urandom(8).hex(),
    }
    for name, value in overrides.items():
        if value is _DROP:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _hs(**overrides: Any) -> dict[str, str]:
    """A token signed with the right secret whose only fault is in its claims."""
    return _bearer(hmac_token(_claims(**overrides), JWT_SECRET.encode()))


# -- the HS256 deployment (the default) --------------------------------------------------------


@dataclass
class Mint:
    tokens: Tokens
    rsa_key: rsa.RSAPrivateKey


def _spliced(m: Mint) -> dict[str, str]:
    """acct-a's claims under the signature of a token for acct-b."""
    header, _payload, signature = m.tokens.make("acct-b").split(".")
    return _bearer(f"{header}.{m.tokens.make('acct-a').split('.')[1]}.{signature}")


def _stripped(m: Mint) -> dict[str, str]:
    header, payload, _signature = m.tokens.make().split(".")
    return _bearer(f"{header}.{payload}.")


HOSTILE: dict[str, Callable[[Mint], dict[str, str] | tuple[dict[str, str], str]]] = {
    "no header": lambda m: {},
    "empty bearer": lambda m: {"Authorization": "Bearer "},
    "basic scheme": lambda m: {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()},
    "token scheme": lambda m: {"Authorization": f"Token {m.tokens.make()}"},
    "other header": lambda m: {"X-Access-Token": m.tokens.make()},
    "query string": lambda m: ({}, f"?jwt={m.tokens.make()}&access_token={m.tokens.make()}"),
    "cookie": lambda m: {"Cookie": f"access_token_cookie={m.tokens.make()}"},
    "garbage": lambda m: _bearer("not.a.token"),
    "two segments": lambda m: _bearer(".".join(m.tokens.make().split(".")[:2])),
    "forged signature": lambda m: _bearer(
        m.tokens.make(key="another-secret-of-sufficient-length-123456")
    ),
    "spliced signature": _spliced,
    "stripped signature": _stripped,
    "expired": lambda m: _bearer(m.tokens.make(exp=int(time.time()) - 10)),
    "expired long ago": lambda m: _bearer(m.tokens.make(exp=1)),
    "exp missing": lambda m: _bearer(m.tokens.make(exp=None)),
    "exp null": lambda m: _hs(exp=None),
    "exp a string": lambda m: _bearer(m.tokens.make(exp=str(int(time.time()) + 600))),
    "exp true": lambda m: _bearer(m.tokens.make(exp=True)),
    "nbf in the future": lambda m: _bearer(m.tokens.make(nbf=int(time.time()) + 3600)),
    "iat not a number": lambda m: _bearer(m.tokens.make(iat="yesterday")),
    "refresh token": lambda m: _bearer(m.tokens.make(type="refresh")),
    "sub missing": lambda m: _hs(sub=_DROP),
    "sub empty": lambda m: _bearer(m.tokens.make(user="")),
    "sub a number": lambda m: _hs(sub=5),
    "alg none": lambda m: _bearer(unsigned_token(_claims())),
    "alg None": lambda m: _bearer(unsigned_token(_claims(), "None")),
    "alg NONE": lambda m: _bearer(unsigned_token(_claims(), "NONE")),
    "alg none with a real signature": lambda m: _bearer(
        unsigned_token(_claims(), "none", m.tokens.make().split(".")[2])
    ),
    "HS512 with the right secret": lambda m: _bearer(
        hmac_token(_claims(), JWT_SECRET.encode(), "HS512")
    ),
    "HS384 with the right secret": lambda m: _bearer(
        hmac_token(_claims(), JWT_SECRET.encode(), "HS384")
    ),
    "RS256 by some RSA key": lambda m: _bearer(m.tokens.make(algorithm="RS256", key=m.rsa_key)),
    "account missing": lambda m: _bearer(m.tokens.make(None)),
    "account under another claim": lambda m: _bearer(m.tokens.make(None, tenant="acct-a")),
    "account null": lambda m: _hs(accountId=None),
    "account a number": lambda m: _bearer(m.tokens.make(123)),
    "account a list": lambda m: _bearer(m.tokens.make(["acct-a"])),
    "account an object": lambda m: _bearer(m.tokens.make({"id": "acct-a"})),
    "account empty": lambda m: _bearer(m.tokens.make("")),
    "account dot": lambda m: _bearer(m.tokens.make(".")),
    "account dotdot": lambda m: _bearer(m.tokens.make("..")),
    "account ../acct-b": lambda m: _bearer(m.tokens.make("../acct-b")),
    "account acct-a/../acct-b": lambda m: _bearer(m.tokens.make("acct-a/../acct-b")),
    "account ../../data": lambda m: _bearer(m.tokens.make("../../data")),
    "account /etc": lambda m: _bearer(m.tokens.make("/etc")),
    "account trailing slash": lambda m: _bearer(m.tokens.make("acct-a/")),
    "account backslashes": lambda m: _bearer(m.tokens.make("..\\acct-b")),
    "account encoded slash": lambda m: _bearer(m.tokens.make("acct-a%2f..")),
    "account NUL": lambda m: _bearer(m.tokens.make("acct-a\x00")),
    "account newline": lambda m: _bearer(m.tokens.make("acct-a\n")),
    "account leading space": lambda m: _bearer(m.tokens.make(" acct-a")),
    "account leading dash": lambda m: _bearer(m.tokens.make("-acct")),
    "account with a dot": lambda m: _bearer(m.tokens.make("acct.a")),
    "account 65 chars": lambda m: _bearer(m.tokens.make("a" * 65)),
    "account cyrillic a": lambda m: _bearer(m.tokens.make("\u0430cct-a")),
}


@pytest.fixture(scope="module")
def hs_world(tmp_path_factory, server_tls, trust_test_ca) -> Iterator[World]:
    tokens = Tokens()
    with open_world(tmp_path_factory.mktemp("hs"), server_tls, tokens.make) as world:
        yield world


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_token_is_refused_on_every_route(hs_world, rsa_key, kind):
    made = HOSTILE[kind](Mint(Tokens(), rsa_key))
    headers, query = made if isinstance(made, tuple) else (made, "")
    assert_refused_everywhere(hs_world, headers, query)


def test_the_route_list_covers_the_api(hs_world):
    routes = authenticated_routes(hs_world.app)
    assert {
        ("GET", "/api/smtp/settings"),
        ("POST", "/api/smtp/settings"),
        ("DELETE", "/api/smtp/settings"),
        ("POST", "/api/smtp/test"),
        ("POST", "/api/messages/send-email"),
        ("GET", "/api/messages/<path:message_id>"),
        ("GET", "/api/messages"),
        ("GET", "/api/messages/stats"),
        ("GET", "/api/senders"),
        ("POST", "/api/senders"),
        ("DELETE", "/api/senders/<path:email>"),
        ("GET", "/api/suppressions"),
        ("DELETE", "/api/suppressions/<path:email>"),
    } <= set(routes)


def test_a_valid_token_reaches_every_authenticated_route(tmp_path, server_tls):
    """The control for the 401s above: the same requests with a good token get past auth."""
    tokens = Tokens()
    with open_world(tmp_path, server_tls, tokens.make) as world:
        client = world.client
        for method, rule in authenticated_routes(world.app):
            r = client.open(
                world.url(rule),
                method=method,
                headers=tokens.headers(),
                json=world.body(method, rule),
            )
            assert r.status_code != 401, (method, rule, r.get_data(as_text=True))
            assert r.status_code < 500, (method, rule, r.get_data(as_text=True))


def test_unauthenticated_routes_are_exactly_the_public_ones(hs_world):
    client = hs_world.client
    public = set()
    for rule in hs_world.app.url_map.iter_rules():
        url = fill_rule(rule.rule, {"message_id": "m", "email": "e", "token": "t", "filename": "f",
                                     "path": "index.html"})
        for method in (rule.methods or set()) - {"OPTIONS"}:
            if client.open(url, method=method).status_code != 401:
                public.add(rule.rule)
    assert public == PUBLIC_RULES


def test_public_routes_answer_without_a_token(hs_world):
    client = hs_world.client
    before = tree_state(hs_world.root)
    assert client.get("/healthz").json == {"status": "ok"}
    assert client.get("/api/openapi.json").json["openapi"].startswith("3.")
    r = client.get("/t/open/not-a-token.gif")
    assert r.status_code == 200 and r.mimetype == "image/gif"
    r = client.get("/api/smtp/oauth/callback?code=c&state=not-a-state")
    assert r.status_code == 400 and "invalid, expired" in r.json["error"]
    assert tree_state(hs_world.root) == before


def test_openapi_marks_exactly_the_authenticated_routes(hs_world):
    doc = hs_world.client.get("/api/openapi.json").json
    public_paths = {
        "/healthz",
        "/readyz",
        "/api/openapi.json",
        "/t/open/{token}.gif",
        "/api/smtp/oauth/callback",
    }
    seen = set()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            seen.add(path)
            assert ("security" in operation) == (path not in public_paths), (method, path)
    assert public_paths <= seen


def test_options_runs_no_view(hs_world):
    """Flask answers OPTIONS itself (the Allow header), without running a view or checking a
    token; it must not leak more than the method list nor touch anything."""
    client = hs_world.client
    before = tree_state(hs_world.root)
    # (the world is shared by the module: an earlier GET /readyz has probed the global server)
    seen = (len(hs_world.own_seen), len(hs_world.glob_seen))
    adapter = hs_world.app.url_map.bind("localhost")
    for rule in hs_world.app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        url = hs_world.url(rule.rule)
        r = client.options(url)
        assert r.status_code == 200 and r.data == b"", rule.rule
        # the methods of every rule matching the URL (/api/messages/send-email is also a
        # message id for the GET rule)
        allowed = set(adapter.allowed_methods(url))
        assert set(rule.methods or ()) <= allowed, rule.rule
        assert set(r.headers["Allow"].split(", ")) == allowed, rule.rule
    assert tree_state(hs_world.root) == before
    assert (len(hs_world.own_seen), len(hs_world.glob_seen)) == seen


# -- an RS256 deployment: tokens from an auth service, verified with its public key ------------


@pytest.fixture(scope="module")
def rs_world(tmp_path_factory, server_tls, rsa_key, trust_test_ca) -> Iterator[World]:
    tokens = Tokens()
    config = {
        "JWT_ALGORITHM": "RS256",
        "JWT_PUBLIC_KEY": _public_pem(rsa_key),
        "JWT_SECRET_KEY": _DROP,
    }
    with open_world(
        tmp_path_factory.mktemp("rs"),
        server_tls,
        lambda: tokens.make(algorithm="RS256", key=rsa_key),
        **config,
    ) as world:
        assert world.app.config["JWT_ALGORITHM"] == "RS256"
        assert world.app.config["JWT_SECRET_KEY"] is None
        yield world


def _embedded_jwk_token(attacker: rsa.RSAPrivateKey) -> str:
    """A token signed by the attacker's key that carries the attacker's public key in its
    header (CVE-2018-0114 style): a verifier must never take the key from the token."""
    jwk = json.loads(RSAAlgorithm.to_jwk(attacker.public_key()))
    return pyjwt.encode(_claims(), attacker, algorithm="RS256", headers={"jwk": jwk})


def _der(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


KEY_CONFUSION: dict[str, Callable[[World, rsa.RSAPrivateKey, rsa.RSAPrivateKey], str]] = {
    # The classic attack: the verifier's public key (public knowledge) used as an HMAC secret.
    "HS256 keyed with the configured public key PEM": lambda w, k, o: hmac_token(
        _claims(), w.app.config["JWT_PUBLIC_KEY"].encode()
    ),
    "HS256 keyed with the PEM without final newline": lambda w, k, o: hmac_token(
        _claims(), w.app.config["JWT_PUBLIC_KEY"].rstrip("\n").encode()
    ),
    "HS256 keyed with the DER public key": lambda w, k, o: hmac_token(_claims(), _der(k)),
    "HS512 keyed with the public key PEM": lambda w, k, o: hmac_token(
        _claims(), w.app.config["JWT_PUBLIC_KEY"].encode(), "HS512"
    ),
    "HS256 keyed with the test HS secret": lambda w, k, o: hmac_token(
        _claims(), JWT_SECRET.encode()
    ),
    "alg none": lambda w, k, o: unsigned_token(_claims()),
    "RS256 by another key": lambda w, k, o: Tokens().make(algorithm="RS256", key=o),
    "RS256 by another key with its JWK embedded": lambda w, k, o: _embedded_jwk_token(o),
    "PS256 by the right key": lambda w, k, o: Tokens().make(algorithm="PS256", key=k),
    "RS512 by the right key": lambda w, k, o: Tokens().make(algorithm="RS512", key=k),
    "ES256 by an EC key": lambda w, k, o: Tokens().make(
        algorithm="ES256", key=ec.generate_private_key(ec.SECP256R1())
    ),
    "RS256 by the right key, expired": lambda w, k, o: Tokens().make(
        algorithm="RS256", key=k, exp=int(time.time()) - 10
    ),
    "RS256 by the right key, no exp": lambda w, k, o: Tokens().make(
        algorithm="RS256", key=k, exp=None
    ),
    "RS256 by the right key, traversal account": lambda w, k, o: Tokens().make(
        "../acct-b", algorithm="RS256", key=k
    ),
}


def test_rs256_deployment_accepts_its_own_tokens(rs_world, rsa_key):
    good = Tokens().make(algorithm="RS256", key=rsa_key)
    r = rs_world.client.get("/api/smtp/settings", headers=_bearer(good))
    assert r.status_code == 200 and r.json["isGlobal"] is False


@pytest.mark.parametrize("kind", sorted(KEY_CONFUSION))
def test_rs256_deployment_refuses_other_algorithms_and_keys(rs_world, rsa_key, other_rsa_key,
                                                            kind):
    token = KEY_CONFUSION[kind](rs_world, rsa_key, other_rsa_key)
    assert_refused_everywhere(rs_world, _bearer(token))


# -- issuer and audience, when the deployment sets them ----------------------------------------


def test_issuer_and_audience_are_required_when_configured(tmp_path, server_tls):
    tokens = Tokens()
    iss, aud = "https://auth.example.test", "smtp-service"
    with open_world(
        tmp_path,
        server_tls,
        lambda: tokens.make(iss=iss, aud=aud),
        JWT_ISSUER=iss,
        JWT_AUDIENCE=aud,
    ) as world:
        for claims in (
            {"aud": aud},
            {"iss": "https://evil.example.test", "aud": aud},
            {"iss": iss},
            {"iss": iss, "aud": "other-service"},
        ):
            assert_refused_everywhere(world, tokens.headers(**claims))
