"""Domain errors and the one handler that turns every exception into a JSON answer."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


def shown(text: str, limit: int) -> str:
    """A client's value as an error message may quote it: at most `limit` characters."""
    return text if len(text) <= limit else text[:limit] + "..."


class ApiError(Exception):
    """An error raised on purpose: it carries its HTTP status and a message safe to show."""

    status = 400

    def __init__(self, message: str, status: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The JSON body of the answer."""
        return {"error": self.message, **self.extra}


class ValidationFailed(ApiError):
    """Input did not pass its schema; details map each field to its messages."""

    def __init__(self, details: dict[str, Any]) -> None:
        super().__init__("Validation failed", 400, details=details)


class Unauthorized(ApiError):
    """No usable credentials."""

    status = 401


class NotFound(ApiError):
    """The thing asked for does not exist for this account."""

    status = 404


_HTTP_MESSAGES = {
    400: "Bad request",
    404: "Not found",
    405: "Method not allowed",
    413: "Request body too large",
    415: "Unsupported media type",
}


def register_error_handlers(app: Flask) -> None:
    """Install the handlers so that every error leaves the app as JSON."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return jsonify(exc.body()), exc.status

    @app.errorhandler(ValidationError)
    def _validation_error(exc: ValidationError):
        return _api_error(ValidationFailed(_as_details(exc.messages)))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
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
