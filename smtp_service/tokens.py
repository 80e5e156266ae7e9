"""Verified bearer tokens kept per app, and the JWTManager that consults them."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from flask import Flask, current_app
from flask_jwt_extended import JWTManager

from smtp_service.caches import LRUCache

TOKEN_CACHE_KEY = "smtp_service_verified_tokens"


class VerifiedTokens:
    """A bounded LRU of tokens whose signature and claims were verified, with their claims.

    Verifying an HS256 token costs about half a millisecond (PyJWT decodes it twice); a service
    calling us sends the same token for many requests. Only a token that passed full
    verification is stored, the entry is keyed on the whole encoded token (so any change to it
    misses), and `exp` is checked again on every hit: time only moves forward, so `exp` is the
    only claim that can turn a verified token invalid. An expired entry is dropped and the token
    verified again from scratch, which raises the usual "expired" error.

    `leeway` (seconds, JWT_DECODE_LEEWAY) is the one PyJWT verifies with, and an entry expires
    exactly when PyJWT would call the token expired: `int(exp) <= now - leeway` (RFC 7519
    4.1.4), so the cache never serves a token past exp + leeway.
    """

    def __init__(
        self,
        size: int = 4096,
        leeway: float | timedelta = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.size = size
        self.leeway = leeway.total_seconds() if isinstance(leeway, timedelta) else leeway
        self._clock = clock
        self._items: LRUCache[str, _Entry] = LRUCache(size)

    def _live(self, token: str) -> _Entry | None:
        entry = self._items.get(token)
        if entry is None:
            return None
        # int() as PyJWT does: a fractional exp must not buy the cached token extra time.
        if int(entry.claims["exp"]) <= self._clock() - self.leeway:
            self._items.discard(token)
            return None
        return entry

    def get(self, token: str) -> dict[str, Any] | None:
        """The claims of a verified, unexpired token; None when it must be verified again."""
        entry = self._live(token)
        return None if entry is None else dict(entry.claims)

    def put(self, token: str, claims: dict[str, Any]) -> None:
        """Remember a verified token; only tokens with a numeric exp are kept."""
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, (int, float)):
            return
        self._items.put(token, _Entry(dict(claims)))

    def accept(self, token: str, header: Mapping[str, Any]) -> None:
        """Mark a kept token as having passed every check of a request (the token type and
        the claim checks of auth.py, which depend on the token and the configuration only),
        with its decoded header."""
        entry = self._items.get(token)
        if entry is not None:
            entry.header = dict(header)

    def accepted(self, token: str) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
        """(claims, header), read-only, of an unexpired token that accept() marked; None when
        the request must be verified the whole way (an expired entry is dropped here)."""
        entry = self._live(token)
        if entry is None or entry.header is None:
            return None
        return entry.claims, entry.header

    def __len__(self) -> int:
        return len(self._items)


class _Entry:
    """One verified token: its claims, and its header once a request with it passed every
    check (None until then)."""

    __slots__ = ("claims", "header")

    def __init__(self, claims: dict[str, Any]) -> None:
        self.claims = claims
        self.header: dict[str, Any] | None = None


class CachingJWTManager(JWTManager):
    """flask-jwt-extended with the app's VerifiedTokens in front of signature verification.

    Everything after decoding (token type, our claim checks, the error callbacks) still runs on
    every request; only the PyJWT decode of an already verified token is skipped. Each app gets
    its own cache (JWT_CACHE_SIZE entries), so two apps never share a verification.
    """

    def init_app(self, app: Flask, add_context_processor: bool = False) -> None:
        """Bind to the app and give it an empty token cache."""
        super().init_app(app, add_context_processor)
        app.extensions[TOKEN_CACHE_KEY] = VerifiedTokens(
            size=app.config["JWT_CACHE_SIZE"], leeway=app.config["JWT_DECODE_LEEWAY"]
        )

    def _decode_jwt_from_config(
        self, encoded_token: str, csrf_value: Any = None, allow_expired: bool = False
    ) -> dict:
        cache: VerifiedTokens | None = current_app.extensions.get(TOKEN_CACHE_KEY)
        if cache is None or csrf_value is not None or allow_expired:
            return super()._decode_jwt_from_config(encoded_token, csrf_value, allow_expired)
        claims = cache.get(encoded_token)
        if claims is None:
            claims = super()._decode_jwt_from_config(encoded_token, csrf_value, allow_expired)
            cache.put(encoded_token, claims)
        return claims
