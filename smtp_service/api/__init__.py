"""HTTP blueprints: thin views that parse, call a service and shape the answer."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Response, current_app, jsonify, request
from marshmallow import Schema

from smtp_service.errors import ApiError
from smtp_service.services.errors import InvalidInput

F = TypeVar("F", bound=Callable[..., Any])


def services() -> Any:
    """The service container the factory built for this app."""
    return current_app.extensions["smtp_service"]


def answer(schema: Schema, value: Any, status: int = 200) -> tuple[Response, int]:
    """`value` dumped through its response schema, as a JSON answer with `status`."""
    return jsonify(schema.dump(value)), status


def json_body(schema: Schema) -> Any:
    """The request's JSON object loaded through `schema` (what its post_load makes of it).

    ApiError 415/413/400 for a body that is not JSON, too large or malformed; InvalidInput
    (400) for one that is not an object or holds NUL or an unpaired surrogate; marshmallow's
    ValidationError (400) for one the schema refuses.
    """
    if not request.is_json:
        raise ApiError("Content-Type must be application/json", 415)
    # A body over MAX_CONTENT_LENGTH with a Content-Length is refused (413) as it is read; a
    # streamed one (chunked, no Content-Length) is cut at the limit instead, and would then
    # fail as malformed JSON: refuse it as too large.
    raw = request.get_data(cache=True)
    limit = request.max_content_length
    if limit is not None and request.content_length is None and len(raw) >= limit:
        raise ApiError("Request body too large", 413)
    try:
        data = request.get_json(silent=True)
    except RecursionError:
        data = None
    if data is None:
        raise ApiError("Malformed JSON body", 400)
    if not isinstance(data, dict):
        raise InvalidInput({"_schema": ["Expected a JSON object."]})
    _refuse_unusable_strings(data)
    return schema.load(data)


def query_args(schema: Schema) -> Any:
    """The request's query string loaded through `schema` (what it makes of it).

    InvalidInput (400) for a parameter given more than once; marshmallow's ValidationError
    (400) for a value the schema refuses or a parameter it does not know.
    """
    repeated = sorted(k for k in request.args if len(request.args.getlist(k)) > 1)
    if repeated:
        raise InvalidInput({k: ["Give this parameter once."] for k in repeated})
    return schema.load(request.args.to_dict())


# JSON may carry NUL (\u0000) and unpaired surrogates (\ud800); neither belongs in any field,
# and a surrogate cannot even be encoded for a message, a file or the database.
_UNUSABLE = re.compile("[\x00\ud800-\udfff]")


def _refuse_unusable_strings(data: dict[str, Any]) -> None:
    """400 naming the field of the first string (or key) with a NUL or an unpaired surrogate."""
    stack: list[tuple[tuple[str, ...], Any]] = [((), data)]
    while stack:  # iterative: the parser already allows nesting deeper than a recursive walk
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if _UNUSABLE.search(key):
                    _refuse(path, key)
                stack.append(((*path, key), item))
        elif isinstance(value, list):
            stack.extend(((*path, str(i)), item) for i, item in enumerate(value))
        elif isinstance(value, str) and _UNUSABLE.search(value):
            _refuse(path, value)


def _refuse(path: tuple[str, ...], text: str) -> None:
    message: Any = [
        "Must not contain NUL characters."
        if "\x00" in text
        else "Must not contain unpaired surrogates (invalid Unicode)."
    ]
    for key in reversed(path):  # nested like marshmallow's: {"attachments": {"0": {...}}}
        message = {key: message}
    raise InvalidInput(message if path else {"_schema": message})


# What a documented status answers: a schema (JSON), several schemas (JSON, any of them), a
# media type (a binary body of that type), or None (a body left undescribed).
ResponseDoc = type[Schema] | tuple[type[Schema], ...] | str | None


def documented(
    summary: str,
    *,
    body: type[Schema] | tuple[type[Schema], ...] | None = None,
    query: type[Schema] | None = None,
    responses: dict[int, ResponseDoc],
    auth: bool = True,
    headers: dict[str, dict[str, Any]] | None = None,
) -> Callable[[F], F]:
    """Attach the OpenAPI description of a view, built from its schemas.

    The generator adds the answers every such view can give on its own: 401 when `auth`,
    400/413/415 when it takes a `body`, 400 when it takes a `query` (a schema of the query
    string's parameters), 404 when its path has parameters. `headers` maps an optional
    request header to its JSON Schema.
    """

    def _mark(view: F) -> F:
        view.__openapi__ = {  # type: ignore[attr-defined]
            "summary": summary,
            "body": body,
            "query": query,
            "responses": responses,
            "auth": auth,
            "headers": headers or {},
        }
        return view

    return _mark
