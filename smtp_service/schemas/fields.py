"""Field types shared by the request schemas and the stored-file schema."""

from __future__ import annotations

import re
from typing import Any

from marshmallow import ValidationError, fields

HOST_PATTERN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.:-]+)$")


class StrictInteger(fields.Integer):
    """An integer that refuses booleans, floats and numeric strings."""

    def _validated(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.make_error("invalid")
        return super()._validated(value)


class StrictBoolean(fields.Boolean):
    """true or false only: no 1, "yes" or "true" strings."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):  # 1 == True, so a set of truthy values cannot tell
            raise self.make_error("invalid", input=value)
        return value


class NonEmptyString(fields.String):
    """A string that is not empty after trimming and holds no NUL byte."""

    OPENAPI = {"minLength": 1, "pattern": r"\S"}  # what the OpenAPI document says of it

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not text.strip():
            raise ValidationError("Must be a non-empty string.")
        if "\x00" in text:
            raise ValidationError("Must not contain NUL characters.")
        return text


def check_host(value: str) -> None:
    """A host name or an IP address (IPv6 in brackets), at most 253 characters."""
    if len(value) > 253 or not HOST_PATTERN.fullmatch(value):
        raise ValidationError("Must be a host name or IP address.")
