"""The public keys that verify bearer tokens from an identity provider, in every form providers
publish them: a PEM public key, an X.509 certificate (RFC 5280), a JWK Set (RFC 7517) given
inline or in a file, or a JWK Set URL fetched with PyJWT's PyJWKClient. The key for one token is
chosen by its `kid` header (RFC 7515 4.1.4); a kid the fetched set does not hold makes the set be
fetched again, so that the provider can rotate its keys without a restart here.

Nothing here reads the environment or knows Flask: config.py builds the keys once at start-up
(a key that cannot verify anything stops start-up there), and the JWT manager asks `key_for()`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt import PyJWK, PyJWKClient
from jwt.exceptions import PyJWTError

log = logging.getLogger(__name__)

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

# The algorithms a public key may verify here, and the EC curve each ES* algorithm signs with.
PUBLIC_KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512")
_CURVE_ALGORITHM = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
JWKS_TIMEOUT_SECONDS = 5.0  # one fetch of the JWK Set URL; a token waits for it at most this


class SigningKeyError(ValueError):
    """A key setting that cannot verify tokens; the text is one line and never holds key data."""


class UnknownSigningKey(jwt.InvalidTokenError):
    """The token's kid names no usable key, or it has none while several keys could apply.

    An InvalidTokenError, so flask-jwt-extended answers it like any invalid token (401)."""


class VerificationKeys(Protocol):
    """What the JWT manager asks for the key of one token."""

    algorithm: str

    def key_for(self, header: Mapping[str, Any]) -> PublicKey:
        """The key that must have signed a token with this (unverified) header; raises
        UnknownSigningKey."""
        ...


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def default_algorithm(key: PublicKey) -> str | None:
    """The algorithm a key signs with when JWT_ALGORITHM does not say: RS256 for RSA, ES256,
    ES384 or ES512 by the curve of an EC key (RFC 7518 3.4); None for any other key."""
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _CURVE_ALGORITHM.get(key.curve.name)
    return None


def unfit_reason(key: Any, algorithm: str) -> str | None:
    """Why `key` cannot verify `algorithm` tokens (None when it can): not a public key, the
    wrong type or curve, or an RSA key under 2048 bits (NIST SP 800-131A, as PyJWT warns)."""
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
            return "is a private key; give the public key or certificate"
        return f"is not an RSA or EC public key ({type(key).__name__})"
    verifier = jwt.get_algorithm_by_name(algorithm)
    try:
        verifier.prepare_key(key)  # PyJWT's own type and curve check
    except (PyJWTError, TypeError, ValueError):
        return f"holds {_describe(key)}, which cannot verify {algorithm}"
    if verifier.check_key_length(key):
        return f"holds {_describe(key)} of {key.key_size} bits; NIST SP 800-131A asks for 2048"
    return None


def _describe(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "an RSA key"
    return f"an EC key on {key.curve.name}"


@dataclass(frozen=True)
class StaticKeys:
    """Keys given once: a PEM public key or certificate (one key, no kid), or a JWK Set.

    `keys` pairs each kid (None for a key without one) with its key, all fit for `algorithm`.
    """

    algorithm: str
    keys: tuple[tuple[str | None, PublicKey], ...]

    def key_for(self, header: Mapping[str, Any]) -> PublicKey:
        """The key named by the header's kid; without a kid, the only key there is.

        A single key without a kid (a PEM or certificate) verifies every token, whatever kid
        it names: providers that hand out a certificate still put a kid in their tokens.
        Raises UnknownSigningKey.
        """
        return _pick(self.keys, header.get("kid"))


def _pick(keys: tuple[tuple[str | None, PublicKey], ...], kid: Any) -> PublicKey:
    if kid is None or (len(keys) == 1 and keys[0][0] is None):
        if len(keys) == 1:
            return keys[0][1]
        raise UnknownSigningKey("The token names no key (kid) and there are several")
    if isinstance(kid, str):
        for key_id, key in keys:
            if key_id == kid:
                return key
    raise UnknownSigningKey("The token's key (kid) is not known")


def parse_key_text(text: str, algorithm: str | None) -> StaticKeys:
    """Keys from the text of JWT_PUBLIC_KEY (or of the file it names).

    `text` is a JWK Set `{"keys": [...]}` or one JWK (RFC 7517 5 and 4), a PEM certificate
    (the first one of a chain is the signer's), or a PEM public key (SubjectPublicKeyInfo or
    PKCS#1 "RSA PUBLIC KEY"). `algorithm` None takes the first key's. Raises SigningKeyError
    when the text is none of these or holds no key that can verify the algorithm.
    """
    stripped = text.strip()
    if stripped.startswith("{"):
        return _from_jwks(stripped, algorithm)
    if "-----BEGIN" not in stripped:
        raise SigningKeyError("is not a PEM key, a certificate or a JWK Set")
    data = stripped.encode("ascii", "replace")
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            key: Any = x509.load_pem_x509_certificates(data)[0].public_key()
        except ValueError:
            raise SigningKeyError("holds a certificate that cannot be read") from None
    elif b"PRIVATE KEY-----" in data:
        raise SigningKeyError("is a private key; give the public key or certificate")
    else:
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise SigningKeyError("holds a PEM block that is not a public key") from None
    algorithm = algorithm or default_algorithm(key)
    if algorithm is None:
        raise SigningKeyError(
            f"holds {_describe(key)}, which none of {', '.join(PUBLIC_KEY_ALGORITHMS)} verifies"
            if isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey))
            else str(unfit_reason(key, "RS256"))
        )
    problem = unfit_reason(key, algorithm)
    if problem:
        raise SigningKeyError(problem)
    return StaticKeys(algorithm, ((None, key),))


def _from_jwks(text: str, algorithm: str | None) -> StaticKeys:
    try:
        document = json.loads(text)
    except ValueError:
        raise SigningKeyError("is not valid JSON (a JWK Set was expected)") from None
    if isinstance(document, dict) and "keys" not in document and "kty" in document:
        document = {"keys": [document]}  # one JWK: a set of one
    members = jwk_set_members(document)
    if members is None:
        raise SigningKeyError('is not a JWK Set (a JSON object with a list of "keys")')
    found, keys = usable_keys(members, algorithm)
    if not keys or found is None:
        raise SigningKeyError(f"holds no key that can verify {algorithm or 'RS256/ES256'}")
    return StaticKeys(found, keys)


def jwk_set_members(document: Any) -> list[dict[str, Any]] | None:
    """The JWKs of a JWK Set document (RFC 7517 5), None when it is not one."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        return None
    return [member for member in document["keys"] if isinstance(member, dict)]


def usable_keys(
    members: list[dict[str, Any]], algorithm: str | None
) -> tuple[str | None, tuple[tuple[str | None, PublicKey], ...]]:
    """(algorithm, (kid, key) pairs) of the JWKs that can verify it.

    Each JWK is read by PyJWT's PyJWK; it is used when its `use` is "sig" or absent, its `alg`
    (if stated) is the algorithm, and it is a public key of the right type and curve (RFC 7517
    4.2, 4.4); the others are passed over (a provider's set may hold encryption keys too).
    `algorithm` None takes the first usable key's (its `alg`, else what default_algorithm
    says). Of two keys with one kid the first is used.
    """
    found: list[tuple[str | None, PublicKey]] = []
    for member in members:
        try:
            jwk = PyJWK(member)
        except PyJWTError:
            continue
        declared = member.get("alg")
        if jwk.public_key_use not in (None, "sig"):
            continue
        if algorithm is None:
            guess = declared if isinstance(declared, str) else default_algorithm(jwk.key)
            if guess in PUBLIC_KEY_ALGORITHMS and unfit_reason(jwk.key, guess) is None:
                algorithm = guess
        if algorithm is None or declared not in (None, algorithm):
            continue
        if unfit_reason(jwk.key, algorithm) is not None:
            continue
        kid = jwk.key_id if isinstance(jwk.key_id, str) else None
        if kid is not None and any(known == kid for known, _ in found):
            continue
        found.append((kid, jwk.key))
    return algorithm, tuple(found)


def check_jwks_url(url: str) -> str:
    """The URL, if keys may be fetched from it: https, or http to a loopback address only (a
    key fetched in the clear could be replaced on the way, and every token forged with it).
    Raises SigningKeyError."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise SigningKeyError("is not a URL") from None
    if parts.scheme not in ("https", "http") or not host:
        raise SigningKeyError("must be an https:// URL")
    if parts.scheme == "http" and not _is_loopback(host):
        raise SigningKeyError("must be an https:// URL (http:// only to a loopback address)")
    return url


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RemoteKeys:
    """The keys of a JWK Set URL, fetched at start-up and again when they are needed.

    PyJWKClient fetches (no redirects, a timeout, http and https only); this class keeps the
    usable keys and decides when to fetch again:
    - after `cache_seconds`, at the next token that needs a key;
    - when a token names a kid the set does not hold (the provider rotated its keys);
    but never twice within `refresh_seconds`, so that tokens with made-up kids cannot make this
    service hammer the provider, and never by two threads at once (the second keeps using the
    keys it has). A fetch that fails, or brings no usable key, keeps the keys fetched before (a
    provider that is down for a moment does not lock every caller out) and is logged.
    """

    def __init__(
        self,
        url: str,
        algorithm: str | None,
        *,
        cache_seconds: float = 300.0,
        refresh_seconds: float = 30.0,
        timeout: float = JWKS_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Fetch the set once; raises SigningKeyError when it cannot be fetched or holds no key
        that can verify `algorithm` (None: the first usable key's)."""
        self.url = check_jwks_url(url)
        self.cache_seconds = cache_seconds
        self.refresh_seconds = refresh_seconds
        self._clock = clock
        self._client = PyJWKClient(url, cache_jwk_set=False, timeout=timeout)
        self._lock = threading.Lock()
        try:
            members = self._fetch()
        except SigningKeyError as exc:
            raise SigningKeyError(f"cannot be fetched: {exc}") from None
        found, self._keys = usable_keys(members, algorithm)
        if not self._keys or found is None:
            raise SigningKeyError(f"holds no key that can verify {algorithm or 'RS256/ES256'}")
        self.algorithm: str = found
        self._fetched_at = self._tried_at = self._clock()

    def _fetch(self) -> list[dict[str, Any]]:
        """The JWKs at the URL (PyJWKClient's fetch); raises SigningKeyError."""
        try:
            members = jwk_set_members(self._client.fetch_data())
        except PyJWTError as exc:
            raise SigningKeyError(_one_line(exc)) from None
        except ValueError:  # PyJWKClient lets json.load's error through: an answer not JSON
            raise SigningKeyError("the answer is not JSON") from None
        except OSError as exc:  # a connection broken while the answer was read
            raise SigningKeyError(_one_line(exc) or type(exc).__name__) from None
        if members is None:
            raise SigningKeyError('the answer is not a JWK Set (a JSON object with "keys")')
        return members

    def key_for(self, header: Mapping[str, Any]) -> PublicKey:
        """The key named by the header's kid (fetching the set again if it is stale or does not
        hold that kid); without a kid, the only key of the set. Raises UnknownSigningKey."""
        if self._clock() - self._fetched_at >= self.cache_seconds:
            self.refresh()
        kid = header.get("kid")
        try:
            return _pick(self._keys, kid)
        except UnknownSigningKey:
            if kid is None or not self.refresh():
                raise
        return _pick(self._keys, kid)

    def refresh(self) -> bool:
        """Fetch the set again unless one was tried within refresh_seconds or another thread is
        fetching; True when new keys were taken."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            now = self._clock()
            if now - self._tried_at < self.refresh_seconds:
                return False
            self._tried_at = now
            try:
                members = self._fetch()
            except SigningKeyError as exc:
                log.warning(
                    "JWT_JWKS_URL: fetching the keys failed, the %d fetched before stay in use: %s",
                    len(self._keys),
                    exc,
                )
                return False
            _algorithm, keys = usable_keys(members, self.algorithm)
            if not keys:
                log.warning(
                    "JWT_JWKS_URL: the fetched set holds no key for %s; the %d before stay in use",
                    self.algorithm,
                    len(self._keys),
                )
                return False
            self._keys, self._fetched_at = keys, now
            return True
        finally:
            self._lock.release()

    @property
    def key_ids(self) -> list[str | None]:
        """The kids of the keys in use (for logs and tests)."""
        return [kid for kid, _key in self._keys]
