"""/api/openapi.json: the OpenAPI 3 document, generated from the views' schemas."""

from __future__ import annotations

import copy
import re
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Flask, current_app, jsonify

from smtp_service.api import documented
from smtp_service.schemas import ErrorResponse

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
    429: "Too many requests",
    502: "Bad gateway",
    503: "Unavailable",
}

# What Werkzeug's URL converters match, as JSON Schema: a value outside it never reaches the view
# (the router answers 404). `path` takes slashes but no empty segment (Werkzeug would redirect
# "a//b" to "a/b"), `string` takes none.
_CONVERTER_SCHEMAS: dict[str, dict[str, Any]] = {
    "default": {"type": "string", "minLength": 1, "pattern": "^[^/]+$"},
    "string": {"type": "string", "minLength": 1, "pattern": "^[^/]+$"},
    "path": {"type": "string", "minLength": 1, "pattern": "^[^/]+(/[^/]+)*/?$"},
    "int": {"type": "integer", "minimum": 0},
}
_RULE_ARGUMENT = re.compile(r"<(?:([^:<>]+):)?([^<>]+)>")


def build_spec(app: Flask) -> dict[str, Any]:
    """Walk the app's routes and describe every documented view."""
    marshmallow = MarshmallowPlugin()
    spec = APISpec(
        title="smtp-service",
        version="1.0.0",
        openapi_version="3.0.3",
        plugins=[marshmallow],
    )
    assert marshmallow.converter is not None  # set by APISpec(plugins=...)
    marshmallow.converter.add_attribute_function(_field_openapi)
    spec.components.security_scheme(
        "bearer", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    )
    documented_rules = []
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions[rule.endpoint]
        view_class = getattr(view, "view_class", None)
        docs = {}
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            handler = getattr(view_class, method.lower(), None) if view_class else view
            doc = getattr(handler, "__openapi__", None)
            if doc is not None:
                docs[method.lower()] = doc
        if docs:
            documented_rules.append((rule.rule, docs))
    # A request schema's rules across fields (its class attribute OPENAPI, e.g. "text or html")
    # go into its component, registered before any path refers to it.
    registered = set()
    for _rule, docs in documented_rules:
        for doc in docs.values():
            for body in _bodies(doc["body"]):
                if hasattr(body, "OPENAPI") and body not in registered:
                    registered.add(body)
                    name = marshmallow.schema_name_resolver(body)
                    spec.components.schema(name, copy.deepcopy(body.OPENAPI), schema=body)
    for rule, docs in documented_rules:
        arguments = _path_arguments(rule)
        operations = {method: _operation(doc, arguments) for method, doc in docs.items()}
        spec.path(path=_RULE_ARGUMENT.sub(r"{\2}", rule), operations=operations)
    return spec.to_dict()


def _bodies(body: Any) -> tuple[Any, ...]:
    """The request schemas a view takes: none, one, or several (any of them)."""
    if body is None:
        return ()
    return body if isinstance(body, tuple) else (body,)


def _field_openapi(_converter: Any, field: Any, **_kwargs: Any) -> dict[str, Any]:
    """A custom field's own JSON Schema words (its class attribute OPENAPI) over apispec's;
    what the field's metadata says wins over both."""
    own = getattr(field, "OPENAPI", {})
    return {k: copy.deepcopy(v) for k, v in own.items() if k not in field.metadata}


def _path_arguments(rule: str) -> dict[str, dict[str, Any]]:
    """Each argument of a URL rule with the schema of the values its converter matches."""
    return {
        name: dict(_CONVERTER_SCHEMAS.get(converter or "default", {"type": "string"}))
        for converter, name in _RULE_ARGUMENT.findall(rule)
    }


def _implied_responses(doc: dict[str, Any], has_path_arguments: bool) -> dict[int, Any]:
    """The answers a view gives without saying so: auth, body parsing and routing errors."""
    implied: dict[int, Any] = {}
    if doc["auth"]:
        implied[401] = ErrorResponse
    if doc["body"] is not None:
        implied.update({400: ErrorResponse, 413: ErrorResponse, 415: ErrorResponse})
    if doc.get("query") is not None:
        implied[400] = ErrorResponse
    if has_path_arguments:
        implied[404] = ErrorResponse
    return implied


def _content(answer: Any) -> dict[str, Any] | None:
    if answer is None:
        return None
    if isinstance(answer, str):  # a media type with a binary body
        return {answer: {"schema": {"type": "string", "format": "binary"}}}
    if isinstance(answer, tuple):
        return {"application/json": {"schema": {"anyOf": list(answer)}}}
    return {"application/json": {"schema": answer}}


def _content_schema(schemas: Any) -> Any:
    """One schema, or several as anyOf (a body of either form)."""
    return {"anyOf": list(schemas)} if isinstance(schemas, tuple) else schemas


def _operation(doc: dict[str, Any], arguments: dict[str, dict[str, Any]]) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": doc["summary"], "responses": {}}
    answers = {**_implied_responses(doc, bool(arguments)), **doc["responses"]}
    for status, answer in sorted(answers.items()):
        entry: dict[str, Any] = {"description": _STATUS_TEXT.get(status, str(status))}
        content = _content(answer)
        if content is not None:
            entry["content"] = content
        operation["responses"][str(status)] = entry
    if doc["body"] is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _content_schema(doc["body"])}},
        }
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": schema}
        for name, schema in sorted(arguments.items())
    ]
    parameters += [
        {"name": name, "in": "header", "required": False, "schema": schema}
        for name, schema in sorted(doc["headers"].items())
    ]
    if doc.get("query") is not None:  # apispec makes each field of the schema a parameter
        parameters.append({"in": "query", "schema": doc["query"]})
    if parameters:
        operation["parameters"] = parameters
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
