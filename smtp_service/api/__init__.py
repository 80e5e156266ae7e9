"""HTTP blueprints: thin views that parse, call a service and shape the answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from flask import current_app, request
from marshmallow import Schema

from smtp_service.errors import ApiError, ValidationFailed

F = TypeVar("F", bound=Callable[..., Any])


def services() -> Any:
    """The service container the factory built for this app."""
    return current_app.extensions["smtp_service"]


def json_body(schema: Schema) -> dict[str, Any]:
    """The request's JSON object, loaded through `schema`; a JSON error for anything else."""
    if not request.is_json:
        raise ApiError("Content-Type must be application/json", 415)
    try:
        data = request.get_json(silent=True)
    except RecursionError:
        data = None
    if data is None:
        raise ApiError("Malformed JSON body", 400)
    if not isinstance(data, dict):
        raise ValidationFailed({"_schema": ["Expected a JSON object."]})
    return schema.load(data)


def documented(
    summary: str,
    *,
    body: type[Schema] | None = None,
    responses: dict[int, type[Schema] | None],
    auth: bool = True,
) -> Callable[[F], F]:
    """Attach the OpenAPI description of a view, built from its schemas."""

    def _mark(view: F) -> F:
        view.__openapi__ = {  # type: ignore[attr-defined]
            "summary": summary,
            "body": body,
            "responses": responses,
            "auth": auth,
        }
        return view

    return _mark
