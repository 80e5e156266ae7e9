"""Field types shared by the request schemas and the stored-file schema."""

from __future__ import annotations

import re
from typing import Any

from marshmallow import ValidationError, fields

from smtp_service.services.hostnames import InvalidHost, normalise_host
from smtp_service.services.send_rate import InvalidRate, parse_rates

# What the OpenAPI document says a host looks like: one word without the characters of a URL.
# A superset of what normalise_host accepts (an IDN, a trailing dot, IPv6 in brackets or not),
# so that nothing the document calls invalid is taken; the field checks the rest.
HOST_PATTERN = re.compile(r"^\s*[^\s/@?#]+\s*$")


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


class HostName(NonEmptyString):
    """A host name or IP address, loaded as its one normalised form (services/hostnames.py):
    "SMTP.Example.com." -> "smtp.example.com", "[::1]" -> "::1", "bücher.example" ->
    "xn--bcher-kva.example". What is not a host ("smtp.example.com:587", a URL, spaces, empty
    labels) fails with a text that says why."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            return normalise_host(text)
        except InvalidHost as exc:
            raise ValidationError(str(exc)) from None


class RateLimitText(NonEmptyString):
    """An account's send rate limit (settings' rateLimit): rates in flask-limiter's syntax
    ("500/day", "100/minute;2000/hour") or "unlimited" (no limit, whatever SEND_RATE_LIMIT
    says); loaded as the trimmed text, checked by services.send_rate.parse_rates."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs).strip()
        try:
            parse_rates(text)
        except InvalidRate as exc:
            raise ValidationError(str(exc)) from None
        return text
