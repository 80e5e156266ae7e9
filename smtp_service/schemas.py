"""Marshmallow schemas: request bodies, responses and the stored files, all in one place."""

from __future__ import annotations

import re
from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, pre_load, validate

_HOST_PATTERN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.:-]+)$")


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

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not text.strip():
            raise ValidationError("Must be a non-empty string.")
        if "\x00" in text:
            raise ValidationError("Must not contain NUL characters.")
        return text


def _check_host(value: str) -> None:
    if len(value) > 253 or not _HOST_PATTERN.fullmatch(value):
        raise ValidationError("Must be a host name or IP address.")


def _no_line_breaks(value: str) -> None:
    if "\r" in value or "\n" in value:
        raise ValidationError("Must not contain line breaks.")


class SmtpSettingsInput(Schema):
    """POST /api/smtp/settings and POST /api/smtp/test."""

    host = NonEmptyString(required=True, validate=_check_host)
    port = StrictInteger(required=True, validate=validate.Range(min=1, max=65535))
    secure = StrictBoolean(load_default=None)
    user = NonEmptyString(required=True, validate=[validate.Length(max=320), _no_line_breaks])
    # "pass" is a Python keyword: the attribute is `password`, the JSON key stays "pass".
    password = NonEmptyString(
        required=True, data_key="pass", validate=[validate.Length(max=1024), _no_line_breaks]
    )
    requireTls = StrictBoolean(load_default=True)

    @pre_load
    def _trim_host(self, data: Any, **_kwargs: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("host"), str):
            data = {**data, "host": data["host"].strip()}
        return data

    @post_load
    def _secure_default(self, data: dict[str, Any], **_kwargs: Any) -> dict[str, Any]:
        # The spec: secure is optional, and forced true for port 465 (implicit TLS).
        if data["port"] == 465:
            data["secure"] = True
        elif data["secure"] is None:
            data["secure"] = False
        return data


class StoredSmtpSettings(Schema):
    """data/shared-data/{accountId}/smtp-settings.json, as the old system wrote it and as we do."""

    host = NonEmptyString(required=True, validate=_check_host)
    port = StrictInteger(required=True, validate=validate.Range(min=1, max=65535))
    secure = StrictBoolean(load_default=False)
    user = NonEmptyString(required=True)
    password = NonEmptyString(required=True, data_key="pass")
    requireTls = StrictBoolean(load_default=True)
    updatedAt = fields.String(load_default=None)
    updatedBy = fields.String(load_default=None, allow_none=True)

    class Meta:
        unknown = "exclude"  # fields added by other tools must not make a file unreadable


class SmtpSettingsView(Schema):
    """GET /api/smtp/settings."""

    host = fields.String(allow_none=True)
    port = fields.Integer(allow_none=True)
    secure = fields.Boolean()
    user = fields.String(allow_none=True)
    hasPassword = fields.Boolean()
    isGlobal = fields.Boolean()
    requireTls = fields.Boolean()


class SavedSettings(Schema):
    """The settings echoed after a save: never the password."""

    host = fields.String()
    port = fields.Integer()
    secure = fields.Boolean()
    user = fields.String()
    requireTls = fields.Boolean()
    updatedAt = fields.String()
    updatedBy = fields.String(allow_none=True)


class SaveSettingsResponse(Schema):
    """POST /api/smtp/settings."""

    message = fields.String()
    settings = fields.Nested(SavedSettings)


class MessageResponse(Schema):
    """A plain confirmation."""

    message = fields.String()


class ConnectionTestResponse(Schema):
    """POST /api/smtp/test: success with a message, or failure with an error."""

    success = fields.Boolean(required=True)
    message = fields.String()
    error = fields.String()


class ErrorResponse(Schema):
    """Every error answer."""

    error = fields.String(required=True)
    details = fields.Dict(keys=fields.String())


class HealthResponse(Schema):
    """GET /healthz."""

    status = fields.String(required=True)
    error = fields.String()
