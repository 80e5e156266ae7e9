"""Every token failure is a JSON 401 and touches no file."""

from __future__ import annotations

import base64
import json
import os
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from smtp_service import create_app

ROUTES = [
    ("get", "/api/smtp/settings"),
    ("post", "/api/smtp/settings"),
    ("delete", "/api/smtp/settings"),
    ("post", "/api/smtp/test"),
]
BODY = {"host": "smtp.example.com", "port": 587, "user": "u@example.com", "pass": "pw"}


def _unsigned(payload: dict) -> str:
    def enc(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{enc({'alg': 'none', 'typ': 'JWT'})}.{enc(payload)}."


def _hostile_tokens(tokens) -> dict[str, str | None]:
    now = int(time.time())
    return {
        "missing": None,
        "expired": tokens.make(exp=now - 10),
        "no exp": tokens.make(exp=None),
        "forged": tokens.make(key="another-secret-of-sufficient-length-123456"),
        "alg none": _unsigned({"sub": "u", "accountId": "acct-a", "exp": now + 600}),
        "garbage": "not.a.token",
        "no account": tokens.make(account=None),
        "traversal account": tokens.make(account="../acct-a"),
        "slash account": tokens.make(account="a/b"),
        "long account": tokens.make(account="a" * 65),
        "unicode account": tokens.make(account="acct-\u00e9"),
        "numeric account": tokens.make(account=123),
        "empty sub": tokens.make(user=""),
    }


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_token_failure_is_401_json_and_touches_no_file(app, client, tokens, method, path):
    data_dir = app.config["DATA_DIR"]
    before = sorted(os.walk(data_dir))
    for name, token in _hostile_tokens(tokens).items():
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        r = getattr(client, method)(path, headers=headers, json=BODY)
        assert r.status_code == 401, (name, r.status_code, r.json)
        assert isinstance(r.json["error"], str) and r.json["error"], name
    assert sorted(os.walk(data_dir)) == before


def test_wrong_scheme_header_is_401(client, tokens):
    r = client.get("/api/smtp/settings", headers={"Authorization": f"Token {tokens.make()}"})
    assert r.status_code == 401


def test_custom_account_claim(app_config, tokens):
    app = create_app({**app_config, "JWT_ACCOUNT_CLAIM": "tenant"})
    c = app.test_client()
    assert c.get("/api/smtp/settings", headers=tokens.headers()).status_code == 401
    r = c.get(
        "/api/smtp/settings", headers={"Authorization": f"Bearer {tokens.make(None, tenant='t-1')}"}
    )
    assert r.status_code == 200


@pytest.mark.parametrize("kind", ["RS256", "ES256"])
def test_public_key_verification(app_config, tokens, kind):
    if kind == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private = ec.generate_private_key(ec.SECP256R1())
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    config = {**app_config, "JWT_PUBLIC_KEY": public_pem, "JWT_ALGORITHM": kind}
    config.pop("JWT_SECRET_KEY")
    c = create_app(config).test_client()
    good = tokens.make(algorithm=kind, key=private)
    assert (
        c.get("/api/smtp/settings", headers={"Authorization": f"Bearer {good}"}).status_code == 200
    )
    # An HS256 token signed with the public key text must not pass (algorithm confusion).
    confused = tokens.make(key="x" * 64)
    assert (
        c.get("/api/smtp/settings", headers={"Authorization": f"Bearer {confused}"}).status_code
        == 401
    )
    none = _unsigned({"sub": "u", "accountId": "acct-a", "exp": int(time.time()) + 60})
    assert (
        c.get("/api/smtp/settings", headers={"Authorization": f"Bearer {none}"}).status_code == 401
    )


def test_healthz_and_openapi_need_no_token(client):
    assert client.get("/healthz").json == {"status": "ok"}
    doc = client.get("/api/openapi.json").json
    assert doc["openapi"].startswith("3.")
    assert {"/api/smtp/settings", "/api/smtp/test", "/healthz"} <= set(doc["paths"])
    post = doc["paths"]["/api/smtp/settings"]["post"]
    # the password form (the spec's), or OAuth2 app-only client credentials
    forms = post["requestBody"]["content"]["application/json"]["schema"]["anyOf"]
    password, oauth = (doc["components"]["schemas"][f["$ref"].rsplit("/", 1)[1]] for f in forms)
    assert set(password["required"]) == {"host", "port", "user", "pass"}
    assert {"auth", "provider", "tenantId", "clientId", "clientSecret"} <= set(oauth["required"])
