"""/api/openapi.json: the OpenAPI 3 document, generated from the views' schemas."""

from __future__ import annotations

import re
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Flask, current_app, jsonify

from smtp_service.api import documented

bp = Blueprint("openapi", __name__)

_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    413: "Too large",
    415: "Unsupported media type",
    422: "Unprocessable",
    502: "Bad gateway",
    503: "Unavailable",
}


def build_spec(app: Flask) -> dict[str, Any]:
    """Walk the app's routes and describe every documented view."""
    spec = APISpec(
        title="smtp-service",
        version="1.0.0",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
    )
    spec.components.security_scheme(
        "bearer", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    )
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions[rule.endpoint]
        view_class = getattr(view, "view_class", None)
        operations: dict[str, Any] = {}
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            handler = getattr(view_class, method.lower(), None) if view_class else view
            doc = getattr(handler, "__openapi__", None)
            if doc is not None:
                operations[method.lower()] = _operation(doc, rule.arguments)
        if operations:
            path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
            spec.path(path=path, operations=operations)
    return spec.to_dict()


def _operation(doc: dict[str, Any], arguments: set[str]) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": doc["summary"], "responses": {}}
    for status, schema in sorted(doc["responses"].items()):
        entry: dict[str, Any] = {"description": _STATUS_TEXT.get(status, str(status))}
        if schema is not None:
            entry["content"] = {"application/json": {"schema": schema}}
        operation["responses"][str(status)] = entry
    if doc["body"] is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": doc["body"]}},
        }
    if arguments:
        operation["parameters"] = [
            {"name": a, "in": "path", "required": True, "schema": {"type": "string"}}
            for a in sorted(arguments)
        ]
    if doc["auth"]:
        operation["security"] = [{"bearer": []}]
    return operation


@bp.get("/api/openapi.json")
@documented("This document", responses={200: None}, auth=False)
def openapi_document():
    """The OpenAPI document (built once per worker)."""
    cached = current_app.extensions.get("openapi_document")
    if cached is None:
        cached = current_app.extensions["openapi_document"] = build_spec(current_app)
    return jsonify(cached)
