"""Tokens from an identity provider, verified with the key in the form the provider publishes it:
a PEM public key, an X.509 certificate, a JWK Set (file, inline, or one JWK), or a JWK Set URL
served by a real HTTP server on loopback, with the key chosen by the token's kid and a rotation
picked up without a restart. Every key setting that cannot verify tokens stops start-up with one
line; no token is ever answered with a 500.

Keys are real RSA 2048 and EC P-256 keys (cryptography); tokens are signed with PyJWT.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from smtp_service import create_app
from smtp_service.config import ConfigError, load_config
from tests.security import b64url, hmac_token

PATH = "/api/smtp/settings"
KINDS = {"RS256": "rsa", "ES256": "ec"}

# -- keys, certificates, JWKs and tokens -------------------------------------------------------


def _new_key(kind: str) -> Any:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    """Two RSA and two EC P-256 private keys: "rsa", "rsa-2", "ec", "ec-2"."""
    return {name: _new_key(name.split("-")[0]) for name in ("rsa", "rsa-2", "ec", "ec-2")}


def public_pem(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def certificate_pem(key: Any) -> str:
    """A self-signed certificate for the key, as identity providers hand out signing keys."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.example.test signing")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def jwk(key: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    algorithm = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
    member = json.loads(algorithm.to_jwk(key.public_key()))
    if kid is not None:
        member["kid"] = kid
    member.update(extra)
    return member


def mint(key: Any, algorithm: str, kid: Any = "key-1", **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "sub": "user-1",
        "accountId": "acct-a",
        "iat": now,
        "exp": now + 600,
        "jti": os.urandom(8).hex(),  # RS256 signatures are deterministic: keep tokens apart
        **claims,
    }
    headers = {} if kid is None else {"kid": kid}
    return pyjwt.encode(payload, key, algorithm=algorithm, headers=headers)


def rs256_with_header(key: rsa.RSAPrivateKey, **header: Any) -> str:
    """An RS256 token with any header (PyJWT will not put a non-string kid in one)."""
    now = int(time.time())
    claims = {"sub": "user-1", "accountId": "acct-a", "iat": now, "exp": now + 600}
    signing_input = f"{_segment({'alg': 'RS256', 'typ': 'JWT', **header})}.{_segment(claims)}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def _segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value).encode())


def status(app, token: str) -> int:
    r = app.test_client().get(PATH, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code < 500, r.get_data(as_text=True)
    assert r.status_code == 200 or r.json == {"error": "Invalid token"}, r.json
    return r.status_code


@pytest.fixture
def make_app(app_config) -> Iterator[Any]:
    """create_app with the HS256 secret left out and these settings added; closed at the end."""
    made = []

    def _make(**settings: str):
        config = {k: v for k, v in app_config.items() if k != "JWT_SECRET_KEY"}
        app = create_app({**config, **settings})
        made.append(app)
        return app

    yield _make
    for app in made:
        app.extensions["smtp_service"].database.dispose()


# -- the forms of JWT_PUBLIC_KEY ----------------------------------------------------------------


def _setting(form: str, key: Any, tmp_path) -> str:
    """JWT_PUBLIC_KEY for the key, in one of the forms providers publish."""
    if form.startswith("pem"):
        text = public_pem(key)
    elif form.startswith("certificate"):
        text = certificate_pem(key)
    elif form == "one jwk inline":
        text = json.dumps(jwk(key, "key-1"))
    else:  # a provider's JWKS document: the key among others it publishes
        text = json.dumps({"keys": [jwk(key, "key-1", use="sig")]})
    if form.endswith("file"):
        path = tmp_path / "idp-key"
        path.write_text(text)
        return str(path)
    return text.replace("\n", "\\n") if form == "pem inline escaped" else text


FORMS = [
    "pem inline",
    "pem inline escaped",
    "pem file",
    "certificate inline",
    "certificate file",
    "jwks inline",
    "jwks file",
    "one jwk inline",
]


@pytest.mark.parametrize("algorithm", sorted(KINDS))
@pytest.mark.parametrize("form", FORMS)
def test_each_published_key_form_verifies_tokens(make_app, keys, tmp_path, form, algorithm):
    kind = KINDS[algorithm]
    app = make_app(JWT_PUBLIC_KEY=_setting(form, keys[kind], tmp_path))
    assert app.config["JWT_ALGORITHM"] == algorithm  # taken from the key when not set
    assert status(app, mint(keys[kind], algorithm)) == 200
    assert status(app, mint(keys[f"{kind}-2"], algorithm)) == 401  # another key's signature
    assert status(app, mint(keys[kind], algorithm, kid=None)) == 200  # the only key


def test_the_issues_jwks_file_with_rs256(make_app, keys, tmp_path):
    """The issue's case: JWT_ALGORITHM=RS256 and JWT_PUBLIC_KEY naming a JWKS file was a 500
    on every authenticated request (InvalidKeyError), and the same JWKS inline failed start-up
    with "File name too long"."""
    document = json.dumps({"keys": [jwk(keys["rsa"], "key-1")]})
    path = tmp_path / "jwks.json"
    path.write_text(document)
    for setting in (str(path), document):
        app = make_app(JWT_ALGORITHM="RS256", JWT_PUBLIC_KEY=setting)
        assert status(app, mint(keys["rsa"], "RS256")) == 200


def test_a_certificate_key_verifies_whatever_kid_the_token_names(make_app, keys):
    """Azure AD and others hand out a certificate and put a kid (and x5t) in their tokens."""
    app = make_app(JWT_PUBLIC_KEY=certificate_pem(keys["rsa"]))
    assert status(app, mint(keys["rsa"], "RS256", kid="nQ3cOm2bKIHz6x-pdpzd3rD9mY0")) == 200


def test_a_jwks_chooses_the_key_by_kid(make_app, keys):
    document = {
        "keys": [
            jwk(keys["rsa"], "key-1", use="sig", alg="RS256"),
            jwk(keys["rsa-2"], "key-2", use="sig"),
            jwk(keys["ec"], "ec-1"),  # another type: never used for RS256
            jwk(keys["rsa-2"], "enc-1", use="enc"),  # an encryption key: never used to verify
            {"kty": "oct", "kid": "hmac-1", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"},
            {"kty": "RSA", "kid": "broken"},  # unusable members are passed over
        ]
    }
    app = make_app(JWT_ALGORITHM="RS256", JWT_PUBLIC_KEY=json.dumps(document))
    assert status(app, mint(keys["rsa"], "RS256", kid="key-1")) == 200
    assert status(app, mint(keys["rsa-2"], "RS256", kid="key-2")) == 200
    assert status(app, mint(keys["rsa"], "RS256", kid="key-2")) == 401  # kid names another key
    assert status(app, mint(keys["rsa-2"], "RS256", kid="enc-1")) == 401
    assert status(app, mint(keys["rsa"], "RS256", kid="key-3")) == 401
    assert status(app, mint(keys["rsa"], "RS256", kid=None)) == 401  # several keys: which?
    assert status(app, rs256_with_header(keys["rsa"], kid=7)) == 401
    assert status(app, rs256_with_header(keys["rsa"], kid=["key-1"])) == 401
    assert status(app, rs256_with_header(keys["rsa"], kid={"kid": "key-1"})) == 401
    # a kid naming a key of another type or use is a 401, never a 500 (InvalidKeyError)
    assert status(app, mint(keys["ec"], "ES256", kid="ec-1")) == 401
    assert status(app, mint(keys["rsa"], "RS256", kid="ec-1")) == 401
    assert status(app, pyjwt.encode(
        {"sub": "u", "accountId": "acct-a", "exp": int(time.time()) + 60},
        "secret-secret-secret-secret-secret!",  # the oct key's bytes would be a HMAC secret
        algorithm="HS256",
        headers={"kid": "hmac-1"},
    )) == 401


def test_the_public_key_text_is_not_an_hmac_secret(make_app, keys):
    """Algorithm confusion with each form: an HS256 token keyed with the configured text."""
    for text in (public_pem(keys["rsa"]), certificate_pem(keys["rsa"])):
        app = make_app(JWT_PUBLIC_KEY=text)
        claims = {"sub": "u", "accountId": "acct-a", "exp": int(time.time()) + 60}
        assert status(app, hmac_token(claims, text.encode())) == 401


# -- settings that cannot verify anything stop start-up ----------------------------------------


def _private_pem(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _bad_settings(keys: dict[str, Any], tmp_path) -> dict[str, tuple[dict[str, str], str]]:
    garbage_file = tmp_path / "garbage.json"
    garbage_file.write_text('{"keys": [{"kty": "RSA", "kid": "x"}]}')
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    p384 = ec.generate_private_key(ec.SECP384R1())
    return {
        "text that is no key": ({"JWT_PUBLIC_KEY": "not a key at all"}, "JWT_PUBLIC_KEY"),
        "a long base64 value without PEM lines": (
            {"JWT_PUBLIC_KEY": "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" * 10},
            "JWT_PUBLIC_KEY",
        ),
        "a PEM block that is no key": (
            {"JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"},
            "JWT_PUBLIC_KEY",
        ),
        "a private key": ({"JWT_PUBLIC_KEY": _private_pem(keys["rsa"])}, "private key"),
        "an RSA key of 1024 bits": ({"JWT_PUBLIC_KEY": public_pem(small)}, "1024 bits"),
        "a P-384 key for ES256": (
            {"JWT_PUBLIC_KEY": public_pem(p384), "JWT_ALGORITHM": "ES256"},
            "cannot verify ES256",
        ),
        "an RSA key for ES256": (
            {"JWT_PUBLIC_KEY": public_pem(keys["rsa"]), "JWT_ALGORITHM": "ES256"},
            "cannot verify ES256",
        ),
        "an EC certificate for RS256": (
            {"JWT_PUBLIC_KEY": certificate_pem(keys["ec"]), "JWT_ALGORITHM": "RS256"},
            "cannot verify RS256",
        ),
        "an Ed25519 key": (
            {"JWT_PUBLIC_KEY": public_pem(ed25519.Ed25519PrivateKey.generate())},
            "not an RSA or EC public key",
        ),
        "a JWKS of EC keys for RS256": (
            {
                "JWT_PUBLIC_KEY": json.dumps({"keys": [jwk(keys["ec"], "ec-1")]}),
                "JWT_ALGORITHM": "RS256",
            },
            "no key that can verify RS256",
        ),
        "a JWKS with only an HMAC key": (
            {"JWT_PUBLIC_KEY": json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})},
            "no key",
        ),
        "a JWKS of encryption keys": (
            {"JWT_PUBLIC_KEY": json.dumps({"keys": [jwk(keys["rsa"], "e", use="enc")]})},
            "no key",
        ),
        "an empty JWKS": ({"JWT_PUBLIC_KEY": '{"keys": []}'}, "no key"),
        "keys that are not a list": ({"JWT_PUBLIC_KEY": '{"keys": "key-1"}'}, "not a JWK Set"),
        "JSON that is not JSON": ({"JWT_PUBLIC_KEY": '{"keys": [}'}, "not valid JSON"),
        "a JWKS file of broken keys": (
            {"JWT_PUBLIC_KEY": str(garbage_file)},
            f"JWT_PUBLIC_KEY file '{garbage_file}' holds no key",
        ),
        "a missing file": ({"JWT_PUBLIC_KEY": str(tmp_path / "nope.pem")}, "cannot be read"),
        "HS256 with a public key": (
            {"JWT_PUBLIC_KEY": public_pem(keys["rsa"]), "JWT_ALGORITHM": "HS256"},
            "JWT_ALGORITHM HS256 cannot be used with JWT_PUBLIC_KEY",
        ),
        "both a key and a URL": (
            {"JWT_PUBLIC_KEY": public_pem(keys["rsa"]), "JWT_JWKS_URL": "https://idp.test/k"},
            "not both",
        ),
        "a JWKS URL in the clear": (
            {"JWT_JWKS_URL": "http://idp.example.test/jwks.json"},
            "JWT_JWKS_URL must be an https:// URL",
        ),
        "a file URL": ({"JWT_JWKS_URL": "file:///etc/passwd"}, "JWT_JWKS_URL must be an https"),
        "a URL without a host": ({"JWT_JWKS_URL": "https:///jwks.json"}, "JWT_JWKS_URL must"),
        "nothing listening at the URL": (
            {"JWT_JWKS_URL": f"http://127.0.0.1:{_closed_port()}/jwks.json"},
            "JWT_JWKS_URL cannot be fetched",
        ),
    }


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BAD = [
    "text that is no key",
    "a long base64 value without PEM lines",
    "a PEM block that is no key",
    "a private key",
    "an RSA key of 1024 bits",
    "a P-384 key for ES256",
    "an RSA key for ES256",
    "an EC certificate for RS256",
    "an Ed25519 key",
    "a JWKS of EC keys for RS256",
    "a JWKS with only an HMAC key",
    "a JWKS of encryption keys",
    "an empty JWKS",
    "keys that are not a list",
    "JSON that is not JSON",
    "a JWKS file of broken keys",
    "a missing file",
    "HS256 with a public key",
    "both a key and a URL",
    "a JWKS URL in the clear",
    "a file URL",
    "a URL without a host",
    "nothing listening at the URL",
]


@pytest.mark.parametrize("case", BAD)
def test_a_key_setting_that_cannot_verify_stops_start_up_with_one_line(
    app_config, keys, tmp_path, case
):
    settings, expected = _bad_settings(keys, tmp_path)[case]
    env = {"JWT_SECRET_KEY": "k" * 40, **settings}
    with pytest.raises(ConfigError) as caught:
        load_config(env)
    text = str(caught.value)
    assert expected in text and "\n" not in text, text
    assert "PRIVATE" not in text and "MII" not in text  # never key material
    with pytest.raises(ConfigError):
        create_app({**app_config, **settings})


# -- a JWKS URL, served by a real HTTP server on loopback ---------------------------------------


class JwksServer:
    """An identity provider's JWKS endpoint: serves `document` at /jwks.json (or `status`),
    counting the fetches; over TLS when given a server context."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.document: Any = {"keys": []}
        self.status = 200
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.fetches += 1
                document = server.document
                body = document if isinstance(document, bytes) else json.dumps(document).encode()
                self.send_response(server.status if self.path == "/jwks.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.scheme = "http"
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, host: str = "127.0.0.1", path: str = "/jwks.json") -> str:
        return f"{self.scheme}://{host}:{self.httpd.server_address[1]}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def idp() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.stop()


@pytest.mark.parametrize("algorithm", sorted(KINDS))
def test_a_jwks_url_rotation_is_picked_up_without_a_restart(make_app, keys, idp, algorithm):
    kind = KINDS[algorithm]
    idp.document = {"keys": [jwk(keys[kind], "key-1")]}
    app = make_app(JWT_JWKS_URL=idp.url(), JWT_JWKS_REFRESH_SECONDS="0")
    assert app.config["JWT_ALGORITHM"] == algorithm and idp.fetches == 1  # fetched at start-up
    before = mint(keys[kind], algorithm, kid="key-1")
    assert status(app, before) == 200
    assert status(app, mint(keys[f"{kind}-2"], algorithm, kid="key-2")) == 401  # not published
    assert idp.fetches == 2  # the unknown kid made it look again

    # The provider rotates: key-2 published, key-1 withdrawn. Same app, no restart.
    idp.document = {"keys": [jwk(keys[f"{kind}-2"], "key-2")]}
    assert status(app, mint(keys[f"{kind}-2"], algorithm, kid="key-2")) == 200
    assert idp.fetches == 3
    assert status(app, mint(keys[kind], algorithm, kid="key-1")) == 401  # a new token, old key
    assert status(app, mint(keys[f"{kind}-2"], algorithm, kid="key-2")) == 200
    assert idp.fetches == 4  # only the key-1 miss fetched; a known kid does not
    # A token verified before the rotation is remembered (JWT_CACHE_SIZE) until its exp.
    assert status(app, before) == 200 and idp.fetches == 4


def test_made_up_kids_do_not_make_the_service_hammer_the_provider(make_app, keys, idp):
    idp.document = {"keys": [jwk(keys["rsa"], "key-1")]}
    app = make_app(JWT_JWKS_URL=idp.url())  # default: at most one refresh per 30 s
    for n in range(20):
        assert status(app, mint(keys["rsa"], "RS256", kid=f"made-up-{n}")) == 401
    assert status(app, mint(keys["rsa"], "RS256", kid="key-1")) == 200
    assert idp.fetches == 1


def test_the_fetched_keys_stay_in_use_while_the_provider_is_down(make_app, keys, idp, caplog):
    idp.document = {"keys": [jwk(keys["rsa"], "key-1")]}
    app = make_app(
        JWT_JWKS_URL=idp.url(), JWT_JWKS_CACHE_SECONDS="1", JWT_JWKS_REFRESH_SECONDS="0"
    )
    idp.status = 503
    time.sleep(1.1)  # the set is stale: the next token makes the service fetch it again
    caplog.set_level(logging.WARNING, logger="smtp_service.signing_keys")
    assert status(app, mint(keys["rsa"], "RS256", kid="key-1")) == 200
    assert idp.fetches == 2
    assert "the 1 fetched before stay in use" in caplog.text
    assert status(app, mint(keys["rsa-2"], "RS256", kid="key-2")) == 401  # no 500 either
    idp.status, idp.document = 200, b"<html>maintenance</html>"  # up, but not a JWK Set
    assert status(app, mint(keys["rsa-2"], "RS256", kid="key-3")) == 401
    assert status(app, mint(keys["rsa"], "RS256", kid="key-1")) == 200
    assert "the answer is not JSON" in caplog.text


def test_a_jwks_url_over_https_is_verified_against_the_trust_store(make_app, keys, ca):
    """The form a deployment uses: https, the certificate checked (conftest trusts its CA)."""
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(tls)
    server = JwksServer(tls)
    try:
        server.document = {"keys": [jwk(keys["ec"], "key-1", alg="ES256")]}
        app = make_app(JWT_JWKS_URL=server.url("localhost"))
        assert status(app, mint(keys["ec"], "ES256")) == 200
    finally:
        server.stop()
    # A certificate that does not name the host: start-up stops, nothing is trusted.
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("idp.example.test").configure_cert(tls)
    server = JwksServer(tls)
    try:
        server.document = {"keys": [jwk(keys["ec"], "key-1", alg="ES256")]}
        with pytest.raises(ConfigError, match="JWT_JWKS_URL cannot be fetched: .*certificate"):
            make_app(JWT_JWKS_URL=server.url("localhost"))
        assert server.fetches == 0
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ((404, {"keys": []}), "JWT_JWKS_URL cannot be fetched: "),
        ((200, ["not", "a", "set"]), "JWT_JWKS_URL cannot be fetched: "),
        ((200, {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}), "JWT_JWKS_URL holds no key"),
        ((200, b"<html>Sign in</html>"), "JWT_JWKS_URL cannot be fetched: the answer is not JSON"),
    ],
)
def test_a_jwks_url_without_usable_keys_stops_start_up(app_config, idp, answer, expected):
    idp.status, idp.document = answer
    with pytest.raises(ConfigError) as caught:
        load_config({"JWT_JWKS_URL": idp.url()})
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)
