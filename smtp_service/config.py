"""Settings from the environment (and .env), validated once at start-up."""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from typing import Any

from smtp_service.services.devmailbox import CatcherAddress, parse_catcher_address
from smtp_service.services.hostnames import InvalidHost, normalise_host
from smtp_service.signing_keys import (
    PUBLIC_KEY_ALGORITHMS,
    RemoteKeys,
    SigningKeyError,
    VerificationKeys,
    parse_key_text,
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(Exception):
    """Raised when the configuration cannot start the service; the text is one line."""


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}")


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, not {value}")
    return value


def _float(
    env: Mapping[str, str],
    name: str,
    default: float,
    low: float,
    high: float,
    unit: str = "seconds",
) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a number of {unit}, not {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, not {value}")
    return value


def _list(env: Mapping[str, str], name: str) -> list[str]:
    return [item.strip() for item in env.get(name, "").split(",") if item.strip()]


def _allowlist(env: Mapping[str, str], name: str = "SMTP_HOST_ALLOWLIST") -> tuple[str, ...]:
    """Host names and CIDRs (SMTP_HOST_ALLOWLIST, OAUTH_HOST_ALLOWLIST)."""
    entries = []
    for item in _list(env, name):
        if "/" in item:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ConfigError(f"{name} has an invalid CIDR {item!r}") from None
            entries.append(item.lower())
        else:  # in the form hosts are compared in: "Bücher.example." is xn--bcher-kva.example
            entries.append(_host(item, f"{name} entry"))
    return tuple(entries)


def _dev_catcher(
    env: Mapping[str, str], smtp_host: str | None, smtp_port: int
) -> CatcherAddress | None:
    """DEV_MAIL_CATCHER: the development mail catcher's address, set by gunicorn.conf.py when
    `make run` started it (never by hand). Only a loopback IP and port that are also the global
    server's (smtp_host as normalised from SMTP_HOST, None when unset; smtp_port): a
    configuration with a real global server never has it, so no production instance allows
    accounts onto loopback through it. Raises ConfigError naming the variable."""
    raw = env.get("DEV_MAIL_CATCHER", "").strip()
    if not raw:
        return None
    try:
        catcher = parse_catcher_address(raw)
    except ValueError as exc:
        raise ConfigError(f"DEV_MAIL_CATCHER {raw!r} {exc}") from None
    if (catcher.host, catcher.port) != (smtp_host, smtp_port):  # smtp_host: normalised
        raise ConfigError(
            "DEV_MAIL_CATCHER is set by `make run` when it starts the development mail "
            "catcher as the global server; it cannot be used with another SMTP_HOST/SMTP_PORT"
        )
    return catcher


def _host(value: str, name: str) -> str:
    try:
        return normalise_host(value)
    except InvalidHost as exc:
        raise ConfigError(f"{name} {value!r} is not a host: {exc}") from None


def _is_inline_key(raw: str) -> bool:
    return raw.startswith("{") or "-----BEGIN" in raw


def _public_key_text(raw: str) -> str:
    """The key text JWT_PUBLIC_KEY gives: inline (a JWK Set or JWK, or PEM with \\n escapes), or
    the content of the file it names. Inline values are recognised by their first characters,
    so that a long inline value is never opened as a file name."""
    if _is_inline_key(raw):
        return raw.replace("\\n", "\n") if "-----BEGIN" in raw else raw
    try:
        with open(raw, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        if len(raw) <= 255 and not any(c.isspace() for c in raw):  # looks like a path: name it
            raise ConfigError(f"JWT_PUBLIC_KEY file {raw!r} cannot be read: {reason}") from None
        raise ConfigError(  # never echoed: it may be key material pasted without its PEM lines
            "JWT_PUBLIC_KEY is not a PEM key, a certificate, a JWK Set or a readable file"
        ) from None


def _token_keys(
    env: Mapping[str, str], algorithm: str
) -> tuple[str, VerificationKeys | None, str | None]:
    """The algorithm, and for RS*/ES* the keys that verify tokens (None: the HS256 secret) and
    JWT_PUBLIC_KEY's key text (None for JWT_JWKS_URL).

    JWT_PUBLIC_KEY (a PEM public key, an X.509 certificate or a JWK Set, inline or in a file)
    or JWT_JWKS_URL (fetched now, so that a URL that gives no usable key stops start-up); an
    unset JWT_ALGORITHM takes the first key's. Raises ConfigError naming the variable.
    """
    raw = env.get("JWT_PUBLIC_KEY", "").strip()
    url = env.get("JWT_JWKS_URL", "").strip()
    if raw and url:
        raise ConfigError("set JWT_PUBLIC_KEY or JWT_JWKS_URL, not both")
    if not raw and not url:
        return algorithm or "HS256", None, None
    name = "JWT_PUBLIC_KEY" if raw else "JWT_JWKS_URL"
    if algorithm and algorithm not in PUBLIC_KEY_ALGORITHMS:
        raise ConfigError(f"JWT_ALGORITHM {algorithm} cannot be used with {name}")
    text = _public_key_text(raw) if raw else None
    if raw and not _is_inline_key(raw):
        name = f"JWT_PUBLIC_KEY file {raw!r}"  # say which file holds what cannot be used
    try:
        if text is not None:
            keys: VerificationKeys = parse_key_text(text, algorithm or None)
        else:
            keys = RemoteKeys(
                url,
                algorithm or None,
                cache_seconds=_int(env, "JWT_JWKS_CACHE_SECONDS", 300, 1, 86400),
                refresh_seconds=_int(env, "JWT_JWKS_REFRESH_SECONDS", 30, 0, 3600),
            )
    except SigningKeyError as exc:
        raise ConfigError(f"{name} {exc}") from None
    return keys.algorithm, keys, text


# The providers' own endpoints (https). Microsoft's {tenant} is filled in per request:
# "organizations" for delegated sign-in (work and school accounts, what Microsoft 365 is), the
# account's tenantId for app-only client credentials.
OAUTH_DEFAULTS = {
    "MICROSOFT": (
        "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize",
        "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
    ),
    "GOOGLE": (
        "https://accounts.google.com/o/oauth2/v2/auth",
        "https://oauth2.googleapis.com/token",
    ),
}


def _oauth_url(env: Mapping[str, str], name: str, default: str, allowlist: tuple[str, ...]) -> str:
    """An OAuth2 endpoint URL: https, or http only to a loopback host OAUTH_HOST_ALLOWLIST
    names or covers (a test server). The address is checked again before each request
    (services.oauth)."""
    from urllib.parse import urlsplit

    url = env.get(name, "").strip() or default
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        raise ConfigError(f"{name} is not a URL: {url!r}") from None
    if parts.scheme not in ("https", "http") or not host or parts.username or parts.password:
        raise ConfigError(f"{name} must be an https:// URL without credentials, not {url!r}")
    if parts.scheme == "http" and not _allowlisted(host, allowlist):
        raise ConfigError(
            f"{name} must be https:// (http only to a loopback host OAUTH_HOST_ALLOWLIST names)"
        )
    return url


def _allowlisted(host: str, allowlist: tuple[str, ...]) -> bool:
    """True for a loopback host (an address, or "localhost") that the allowlist names or
    covers: the only hosts an http:// OAuth2 URL may name."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        name = _host(host, "OAuth2 URL host")
        return name == "localhost" and name in allowlist
    return ip.is_loopback and any(
        "/" in entry
        and ip.version == ipaddress.ip_network(entry, strict=False).version
        and ip in ipaddress.ip_network(entry, strict=False)
        for entry in allowlist
    )


def _oauth(env: Mapping[str, str]) -> dict[str, Any]:
    """OAUTH_{MICROSOFT,GOOGLE}_{CLIENT_ID,CLIENT_SECRET,AUTHORIZE_URL,TOKEN_URL}, the allowlist
    and OAUTH_HTTP_TIMEOUT (seconds per token request)."""
    # names or CIDRs whose non-public addresses the OAuth2 endpoints may use (loopback in
    # tests, an internal proxy)
    allowlist = _allowlist(env, "OAUTH_HOST_ALLOWLIST")
    config: dict[str, Any] = {"OAUTH_HOST_ALLOWLIST": allowlist}
    for provider, (authorize, token) in OAUTH_DEFAULTS.items():
        prefix = f"OAUTH_{provider}_"
        config[prefix + "CLIENT_ID"] = env.get(prefix + "CLIENT_ID", "").strip() or None
        config[prefix + "CLIENT_SECRET"] = env.get(prefix + "CLIENT_SECRET", "").strip() or None
        config[prefix + "AUTHORIZE_URL"] = _oauth_url(
            env, prefix + "AUTHORIZE_URL", authorize, allowlist
        )
        config[prefix + "TOKEN_URL"] = _oauth_url(env, prefix + "TOKEN_URL", token, allowlist)
    config["OAUTH_HTTP_TIMEOUT"] = _float(env, "OAUTH_HTTP_TIMEOUT", 10.0, 0.1, 120.0)
    config["OAUTH_STATE_SECONDS"] = _int(env, "OAUTH_STATE_SECONDS", 600, 10, 86400)
    return config


def _log_level(env: Mapping[str, str]) -> str:
    level = env.get("LOG_LEVEL", "").strip().upper() or "INFO"
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL: {level!r}")
    return level


def _cidrs(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Comma-separated networks ("10.0.0.0/8, 192.168.1.7"), each checked and normalised."""
    networks = []
    for item in _list(env, name):
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(f"{name} has an invalid network {item!r}") from None
    return tuple(networks)


def _base_url(env: Mapping[str, str]) -> str | None:
    """The URL mail readers reach the service at; None (open tracking off) when unset: a pixel
    pointing at the listen address would reach no reader."""
    url = env.get("PUBLIC_BASE_URL", "").strip()
    if not url:
        return None
    if not url.startswith(("http://", "https://")) or any(c.isspace() for c in url):
        raise ConfigError(f"PUBLIC_BASE_URL must be an http:// or https:// URL, not {url!r}")
    return url.rstrip("/")


def _database_url(env: Mapping[str, str], data_dir: str) -> str:
    url = env.get("DATABASE_URL", "").strip()
    if not url:
        return f"sqlite:///{os.path.join(data_dir, 'messages.sqlite3')}"
    scheme = url.split(":", 1)[0].lower()
    if scheme not in ("sqlite", "postgresql", "postgresql+psycopg", "postgres"):
        # The scheme only: the rest of a URL may hold a password.
        raise ConfigError(f"DATABASE_URL must start sqlite:/// or postgresql+psycopg://: {scheme}")
    if scheme in ("postgresql", "postgres"):  # psycopg 3 is the driver this service ships
        url = "postgresql+psycopg:" + url.split(":", 1)[1]
    return url


def _smtp_timeouts(env: Mapping[str, str]) -> dict[str, float | None]:
    """Seconds per stage of an SMTP conversation and for a whole operation (README, "SMTP
    timeouts"). SMTP_TIMEOUT, the one timeout of old, is still the default of the connect and
    command timeouts where a deployment sets it."""
    legacy = _float(env, "SMTP_TIMEOUT", 0.0, 0.1, 300.0) or None
    return {
        "SMTP_TIMEOUT": legacy,
        "SMTP_CONNECT_TIMEOUT": _float(env, "SMTP_CONNECT_TIMEOUT", legacy or 10.0, 0.1, 300.0),
        "SMTP_COMMAND_TIMEOUT": _float(env, "SMTP_COMMAND_TIMEOUT", legacy or 30.0, 0.1, 600.0),
        "SMTP_FINAL_REPLY_TIMEOUT": _float(env, "SMTP_FINAL_REPLY_TIMEOUT", 120.0, 0.1, 1200.0),
        "SMTP_DEADLINE": _float(env, "SMTP_DEADLINE", 150.0, 0.5, 3600.0),
    }


# RFC 5321 4.1.2: Domain (dot-separated labels) or address-literal ("[192.0.2.1]", "[IPv6:...]")
_EHLO_NAME = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
    r"[A-Za-z0-9])?)*|\[(?:IPv6:)?[0-9A-Fa-f.:]+\]"
)


def _ehlo_name(env: Mapping[str, str]) -> str:
    """SMTP_EHLO_NAME, or this machine's name when it is a fully qualified one (has a dot), or
    "localhost.localdomain": a name, never an address literal worked out per connection."""
    name = env.get("SMTP_EHLO_NAME", "").strip()
    if name:
        if len(name) > 255 or not _EHLO_NAME.fullmatch(name):
            raise ConfigError(f"SMTP_EHLO_NAME must be a domain name or [address], not {name!r}")
        return name
    return _machine_name()


@functools.lru_cache(maxsize=1)
def _machine_name() -> str:
    fqdn = socket.getfqdn()
    if "." in fqdn and _EHLO_NAME.fullmatch(fqdn) and not fqdn.replace(".", "").isdigit():
        return fqdn
    return "localhost.localdomain"


def _rate(env: Mapping[str, str], name: str, default: str) -> str:
    """A rate limit as flask-limiter writes it ("60 per minute", "10/second;100/hour")."""
    from limits import parse_many

    value = env.get(name, "").strip() or default
    try:
        parse_many(value)
    except ValueError:
        raise ConfigError(f"{name} must be a rate such as '60 per minute', not {value!r}") from None
    return value


def _send_rate(env: Mapping[str, str]) -> str:
    """SEND_RATE_LIMIT: the sends each account may make ("100/minute;2000/hour"), "" for no
    limit (the default: a deployment that sets nothing sends as before, uncounted)."""
    from smtp_service.services.send_rate import InvalidRate, parse_rates

    value = env.get("SEND_RATE_LIMIT", "").strip()
    try:
        parse_rates(value)
    except InvalidRate as exc:
        raise ConfigError(f"SEND_RATE_LIMIT {value!r}: {exc}") from None
    return value


_STORAGE_SCHEMES = ("memory", "redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster")


def _limiter_storage(env: Mapping[str, str]) -> str:
    """RATELIMIT_STORAGE_URI: where flask-limiter counts requests (memory://, per worker, or
    redis://host:port[/db] shared by every worker and instance)."""
    uri = env.get("RATELIMIT_STORAGE_URI", "").strip() or "memory://"
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme not in _STORAGE_SCHEMES:
        # The scheme only: the rest of a URI may hold a password.
        raise ConfigError(
            f"RATELIMIT_STORAGE_URI must start memory:// or redis://, not {scheme or uri[:10]!r}"
        )
    return uri


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (the first when unset)."""
    value = env.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise ConfigError(f"{name} must be {' or '.join(choices)}, not {value!r}")
    return value


def load_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Build the Flask config mapping from environment variables; raise ConfigError if unusable."""
    env = os.environ if env is None else env
    algorithm, token_keys, key_text = _token_keys(
        env, env.get("JWT_ALGORITHM", "").strip().upper()
    )
    secret = env.get("JWT_SECRET_KEY", "")
    if token_keys is None:
        if algorithm != "HS256":
            raise ConfigError(
                f"JWT_ALGORITHM {algorithm} needs JWT_PUBLIC_KEY or JWT_JWKS_URL (or use HS256)"
            )
        if not secret:
            raise ConfigError("JWT_SECRET_KEY is not set (or set JWT_PUBLIC_KEY for RS256/ES256)")
        if len(secret) < 32:
            raise ConfigError("JWT_SECRET_KEY must be at least 32 characters")

    account_claim = env.get("JWT_ACCOUNT_CLAIM", "accountId").strip() or "accountId"
    smtp_host = env.get("SMTP_HOST", "").strip() or None
    if smtp_host is not None:
        smtp_host = _host(smtp_host, "SMTP_HOST")
    smtp_port = _int(env, "SMTP_PORT", 587, 1, 65535)
    smtp_secure = _bool(env, "SMTP_SECURE", smtp_port == 465)
    max_request = _int(env, "MAX_REQUEST_BYTES", 16 * 1024 * 1024, 1024, 1024**3)

    data_dir = os.path.abspath(env.get("DATA_DIR", "").strip() or "data")
    return {
        "DATA_DIR": data_dir,
        "DATABASE_URL": _database_url(env, data_dir),
        "DATABASE_POOL_SIZE": _int(env, "DATABASE_POOL_SIZE", 10, 1, 1000),
        "JWT_SECRET_KEY": secret or None,
        # The key text as given (flask-jwt-extended's own setting; tokens are verified with
        # JWT_VERIFICATION_KEYS, which chooses by kid), the JWK Set URL, and the keys.
        "JWT_PUBLIC_KEY": key_text,
        "JWT_JWKS_URL": token_keys.url if isinstance(token_keys, RemoteKeys) else None,
        "JWT_VERIFICATION_KEYS": token_keys,
        "JWT_ALGORITHM": algorithm,
        "JWT_DECODE_ALGORITHMS": [algorithm],
        "JWT_ACCOUNT_CLAIM": account_claim,
        "JWT_DECODE_ISSUER": env.get("JWT_ISSUER", "").strip() or None,
        "JWT_DECODE_AUDIENCE": env.get("JWT_AUDIENCE", "").strip() or None,
        # Clock skew allowed on exp, nbf and iat (RFC 7519 4.1.4/4.1.5: "a few minutes" at most);
        # flask-jwt-extended hands it to PyJWT and the token cache expires entries with it.
        "JWT_DECODE_LEEWAY": _int(env, "JWT_DECODE_LEEWAY", 5, 0, 300),
        "JWT_TOKEN_LOCATION": ["headers"],
        "JWT_CACHE_SIZE": _int(env, "JWT_CACHE_SIZE", 4096, 0, 1_000_000),
        "SMTP_HOST": smtp_host,
        "SMTP_PORT": smtp_port,
        "SMTP_SECURE": smtp_secure,
        "SMTP_USER": env.get("SMTP_USER", "").strip() or None,
        "SMTP_PASS": env.get("SMTP_PASS", "") or None,
        "SMTP_FROM": env.get("SMTP_FROM", "").strip() or None,
        "SMTP_REQUIRE_TLS": _bool(env, "SMTP_REQUIRE_TLS", True),
        **_smtp_timeouts(env),
        "SMTP_EHLO_NAME": _ehlo_name(env),
        "SMTP_HOST_ALLOWLIST": _allowlist(env),
        "DEV_MAIL_CATCHER": _dev_catcher(env, smtp_host, smtp_port),
        "SMTP_ENCRYPTION_KEYS": _list(env, "SMTP_ENCRYPTION_KEYS"),
        "MAX_CONTENT_LENGTH": max_request,
        "LOG_LEVEL": _log_level(env),
        "LOG_FORMAT": _choice(env, "LOG_FORMAT", ("auto", "json", "text")),
        "METRICS_ALLOW_CIDRS": _cidrs(env, "METRICS_ALLOW_CIDRS"),
        "READYZ_SMTP_TIMEOUT": _float(env, "READYZ_SMTP_TIMEOUT", 2.0, 0.1, 60.0),
        "READYZ_CACHE_SECONDS": _float(env, "READYZ_CACHE_SECONDS", 5.0, 0.0, 3600.0),
        "MAX_MESSAGE_BYTES": _int(env, "MAX_MESSAGE_BYTES", 10 * 1024 * 1024, 1024, 1024**3),
        "MAX_RECIPIENTS": _int(env, "MAX_RECIPIENTS", 50, 1, 10000),
        "PUBLIC_BASE_URL": _base_url(env),
        "SMTP_POOL_SIZE": _int(env, "SMTP_POOL_SIZE", 3, 0, 100),
        "SMTP_POOL_MAX_MESSAGES": _int(env, "SMTP_POOL_MAX_MESSAGES", 100, 1, 1_000_000),
        "SMTP_POOL_IDLE_SECONDS": _float(env, "SMTP_POOL_IDLE_SECONDS", 60.0, 0.1, 86400.0),
        "SMTP_POOL_MAX_LIFETIME_SECONDS": _float(
            env, "SMTP_POOL_MAX_LIFETIME_SECONDS", 300.0, 0.1, 86400.0
        ),
        "SMTP_POOL_MAX_ACCOUNTS": _int(env, "SMTP_POOL_MAX_ACCOUNTS", 1000, 1, 1_000_000),
        "SMTP_POOL_WAIT_SECONDS": _float(env, "SMTP_POOL_WAIT_SECONDS", 10.0, 0.0, 600.0),
        "SMTP_GLOBAL_POOL_SIZE": _int(env, "SMTP_GLOBAL_POOL_SIZE", 10, 0, 1000),
        "SMTP_PIPELINING": _bool(env, "SMTP_PIPELINING", True),
        "SUPPRESSION_DAYS": _float(env, "SUPPRESSION_DAYS", 30.0, 0.0, 36500.0, "days"),
        "SOFT_BOUNCE_LIMIT": _int(env, "SOFT_BOUNCE_LIMIT", 3, 0, 1000),
        "SOFT_BOUNCE_DAYS": _float(env, "SOFT_BOUNCE_DAYS", 7.0, 0.001, 3650.0, "days"),
        "GLOBAL_SENDER_VERIFICATION": _choice(
            env, "GLOBAL_SENDER_VERIFICATION", ("confirm", "manual")
        ),
        "GLOBAL_SENDER_DOMAINS": [d.lower() for d in _list(env, "GLOBAL_SENDER_DOMAINS")],
        "TRACKING_RATE_LIMIT": _rate(env, "TRACKING_RATE_LIMIT", "60 per minute"),
        # Health and failover (issue 12): an account's default when its settings do not say,
        # what becomes of a From the global server may not send as, and the circuit breaker.
        "SMTP_FAILOVER": _bool(env, "SMTP_FAILOVER", False),
        "SMTP_FAILOVER_FROM": _choice(env, "SMTP_FAILOVER_FROM", ("rewrite", "refuse")),
        "SMTP_CIRCUIT_FAILURES": _int(env, "SMTP_CIRCUIT_FAILURES", 5, 1, 1000),
        "SMTP_CIRCUIT_SECONDS": _float(env, "SMTP_CIRCUIT_SECONDS", 60.0, 0.1, 86400.0),
        "SMTP_TEST_RATE_LIMIT": _rate(env, "SMTP_TEST_RATE_LIMIT", "5 per minute"),
        "RATELIMIT_STORAGE_URI": _limiter_storage(env),
        "RATELIMIT_KEY_PREFIX": env.get("RATELIMIT_KEY_PREFIX", "").strip() or "smtp-service",
        "SEND_RATE_LIMIT": _send_rate(env),
        **_oauth(env),
    }
