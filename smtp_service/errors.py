"""The edge of the app: how every error is answered, as JSON, in one place.

Services raise domain errors (smtp_service.services.errors) that say what happened; STATUS says
how each kind is answered. ApiError is for the few refusals that are about HTTP itself (a wrong
Content-Type, a malformed body or header).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from smtp_service.schemas.responses import ErrorResponse
from smtp_service.services.errors import (
    CircuitOpen,
    ConfirmationNotSent,
    DomainError,
    IdempotencyConflict,
    IdempotencyPending,
    InvalidInput,
    MessageTooLarge,
    NoServerConfigured,
    NotFound,
    OAuthNotConfigured,
    OAuthProviderUnavailable,
    OAuthSignInFailed,
    OAuthStateInvalid,
    RecipientsSuppressed,
    SenderExists,
    SenderNotVerified,
    SendRateLimited,
    SmtpPoolBusy,
    shown,
)

__all__ = ["STATUS", "ApiError", "register_error_handlers", "shown", "status_of"]

log = logging.getLogger(__name__)

# Domain error -> HTTP status. A subclass answers as its nearest listed ancestor (every NotFound
# is a 404); a DomainError not listed here is a bug and answers 500.
STATUS: dict[type[DomainError], int] = {
    InvalidInput: 400,
    SenderNotVerified: 403,
    NotFound: 404,
    SenderExists: 409,
    IdempotencyConflict: 409,
    IdempotencyPending: 409,
    MessageTooLarge: 413,
    RecipientsSuppressed: 422,
    SendRateLimited: 429,
    ConfirmationNotSent: 502,
    OAuthStateInvalid: 400,
    OAuthSignInFailed: 400,
    OAuthProviderUnavailable: 502,
    NoServerConfigured: 503,
    OAuthNotConfigured: 503,
    SmtpPoolBusy: 503,
    CircuitOpen: 503,
}

_ERROR_BODY = ErrorResponse()


class ApiError(Exception):
    """A refusal about the HTTP request itself, with its status and a message safe to show."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def status_of(exc: DomainError) -> int:
    """The HTTP status that answers a domain error (500 for one missing from STATUS)."""
    for kind in type(exc).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 500


def error_body(exc: DomainError) -> dict[str, Any]:
    """The JSON body for a domain error: {"error": message}, plus what the kind carries."""
    body: dict[str, Any] = {"error": exc.message}
    if isinstance(exc, InvalidInput):
        body["details"] = exc.fields
    elif isinstance(exc, RecipientsSuppressed):
        body["suppressed"] = list(exc.addresses)
    return _ERROR_BODY.dump(body)


_HTTP_MESSAGES = {
    400: "Bad request",
    404: "Not found",
    405: "Method not allowed",
    413: "Request body too large",
    415: "Unsupported media type",
    429: "Too many requests",
}


def register_error_handlers(app: Flask) -> None:
    """Install the handlers so that every error leaves the app as JSON."""

    @app.errorhandler(DomainError)
    def _domain_error(exc: DomainError):
        status = status_of(exc)
        if status == 500:
            return _unexpected(exc)
        response = jsonify(error_body(exc))
        if isinstance(exc, (SmtpPoolBusy, CircuitOpen, SendRateLimited)):  # RFC 9110 section 10.2.3
            response.headers["Retry-After"] = str(exc.retry_after)
        return response, status

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return jsonify(_ERROR_BODY.dump({"error": exc.message})), exc.status

    @app.errorhandler(ValidationError)
    def _validation_error(exc: ValidationError):
        return _domain_error(InvalidInput(_as_details(exc.messages)))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if exc.response is not None:  # made by the app itself (flask-limiter's on_breach)
            return exc.response
        status = exc.code or 500
        response = jsonify({"error": _HTTP_MESSAGES.get(status, exc.name)})
        if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return response, status

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        # The client gets no detail; the log gets the traceback (our exceptions carry no secret).
        log.error("unhandled %s", type(exc).__name__, exc_info=True)
        return jsonify({"error": "Internal server error"}), 500


def _as_details(messages: Any) -> dict[str, Any]:
    if isinstance(messages, dict):
        return messages
    return {"_schema": messages if isinstance(messages, list) else [str(messages)]}
