"""Who is calling: the account and user named by a verified JWT; every failure is a JSON 401."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import current_app, g, jsonify, request
from flask_jwt_extended import get_jwt, get_jwt_header, verify_jwt_in_request

from smtp_service.extensions import jwt
from smtp_service.storage.files import ACCOUNT_ID_PATTERN
from smtp_service.tokens import TOKEN_CACHE_KEY, VerifiedTokens


@dataclass(frozen=True)
class Caller:
    """The account a request acts for, and the user (`sub`) who made it."""

    account_id: str
    user_id: str


def current_caller() -> Caller:
    """Verify the bearer token of the current request; raise on any failure (answered as 401).

    A token that passed every check of an earlier request and has not expired since (the
    app's VerifiedTokens) is taken as it is: flask-jwt-extended would decode its header again,
    check its type and run the claim checks below, all with the same outcome (they depend on
    the token and the configuration only), about 60 us a request. Any other token, and any
    Authorization header that is not exactly "Bearer <token>", goes the whole way. Either way
    flask-jwt-extended's get_jwt() and get_jwt_header() answer for the request afterwards. (No
    token blocklist or user loader is installed: one that is must be consulted here too.)
    """
    config = current_app.config
    cache: VerifiedTokens | None = current_app.extensions.get(TOKEN_CACHE_KEY)
    token = _bearer_token(request.headers.get(config["JWT_HEADER_NAME"]), config)
    if cache is not None and token is not None:
        found = cache.accepted(token)
        if found is not None:
            claims, header = found
            # What verify_jwt_in_request() leaves for get_jwt() and the other accessors.
            g._jwt_extended_jwt = dict(claims)
            g._jwt_extended_jwt_header = dict(header)
            g._jwt_extended_jwt_user = {"loaded_user": None}
            g._jwt_extended_jwt_location = "headers"
            return Caller(claims[config["JWT_ACCOUNT_CLAIM"]], claims["sub"])
    verify_jwt_in_request()
    claims = get_jwt()
    if cache is not None and token is not None:
        cache.accept(token, get_jwt_header())
    return Caller(claims[config["JWT_ACCOUNT_CLAIM"]], claims["sub"])


def _bearer_token(header: str | None, config: Mapping[str, Any]) -> str | None:
    """The token of a header "<JWT_HEADER_TYPE> <token>" (one value, no comma), else None."""
    if not header or "," in header or config["JWT_TOKEN_LOCATION"] != ["headers"]:
        return None
    parts = header.split()
    if len(parts) != 2 or parts[0] != config["JWT_HEADER_TYPE"]:
        return None
    return parts[1]


def _unauthorized(reason: str):
    return jsonify({"error": reason}), 401


def init_auth() -> None:
    """Install flask-jwt-extended callbacks: the key by kid, exp required, a valid account
    claim, 401 for all."""

    @jwt.decode_key_loader
    def _key(header: dict[str, Any], _payload: dict[str, Any]) -> Any:
        # Called with the UNVERIFIED header: kid only chooses among keys configured here (the
        # algorithm stays JWT_DECODE_ALGORITHMS, a key in the token is never used). An unknown
        # kid raises UnknownSigningKey, an InvalidTokenError: answered 401 like any bad token.
        keys = current_app.config["JWT_VERIFICATION_KEYS"]
        if keys is None:
            return current_app.config["JWT_SECRET_KEY"]
        return keys.key_for(header)

    @jwt.token_verification_loader
    def _verify(_header: dict[str, Any], payload: dict[str, Any]) -> bool:
        # PyJWT accepts a token without exp; we do not.
        if not isinstance(payload.get("exp"), (int, float)) or isinstance(payload["exp"], bool):
            return False
        if not isinstance(payload.get("sub"), str) or not payload["sub"]:
            return False
        account = payload.get(current_app.config["JWT_ACCOUNT_CLAIM"])
        return isinstance(account, str) and ACCOUNT_ID_PATTERN.fullmatch(account) is not None

    @jwt.token_verification_failed_loader
    def _failed(_header: dict[str, Any], _payload: dict[str, Any]):
        return _unauthorized("Token is missing exp, sub or a valid account id")

    @jwt.unauthorized_loader
    def _missing(_reason: str):
        return _unauthorized("Missing or malformed Authorization header")

    @jwt.invalid_token_loader
    def _invalid(_reason: str):
        return _unauthorized("Invalid token")

    @jwt.expired_token_loader
    def _expired(_header: dict[str, Any], _payload: dict[str, Any]):
        return _unauthorized("Token has expired")

    @jwt.revoked_token_loader
    def _revoked(_header: dict[str, Any], _payload: dict[str, Any]):
        return _unauthorized("Token has been revoked")

    @jwt.needs_fresh_token_loader
    def _not_fresh(_header: dict[str, Any], _payload: dict[str, Any]):
        return _unauthorized("Fresh token required")

    @jwt.user_lookup_error_loader
    def _lookup(_header: dict[str, Any], _payload: dict[str, Any]):
        return _unauthorized("Unknown user")
