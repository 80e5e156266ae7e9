"""Marshmallow schemas: request bodies, responses and the stored files, all in one place."""

from __future__ import annotations

import re
from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, pre_load, validate

from smtp_service.errors import shown

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

    OPENAPI = {"minLength": 1, "pattern": r"\S"}  # what the OpenAPI document says of it

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

    host = NonEmptyString(
        required=True,
        validate=_check_host,
        metadata={
            "pattern": _HOST_PATTERN.pattern,
            "maxLength": 253,
            "example": "smtp.example.com",
        },
    )
    port = StrictInteger(
        required=True, validate=validate.Range(min=1, max=65535), metadata={"example": 587}
    )
    secure = StrictBoolean(load_default=None, metadata={"example": False})
    user = NonEmptyString(
        required=True,
        validate=[validate.Length(max=320), _no_line_breaks],
        metadata={"example": "user@example.com"},
    )
    # "pass" is a Python keyword: the attribute is `password`, the JSON key stays "pass".
    password = NonEmptyString(
        required=True,
        data_key="pass",
        validate=[validate.Length(max=1024), _no_line_breaks],
        metadata={"example": "password"},
    )
    requireTls = StrictBoolean(load_default=True, metadata={"example": True})

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
    suppressed = fields.List(fields.String())  # 422 from send-email: the suppressed recipients


class HealthResponse(Schema):
    """GET /healthz."""

    status = fields.String(required=True)
    error = fields.String()


# -- sending ------------------------------------------------------------------------------------

_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 field name: printable, no colon
_RESERVED_HEADERS = {
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "message-id",
    "date",
    "reply-to",
    "sender",
    "content-type",
    "content-transfer-encoding",
    "mime-version",
}


# What a header-bound value may not hold: NUL and the other C0 controls but TAB, DEL (the email
# package sends them raw, RFC 5322 allows none), and every character str.splitlines() ends a
# line at (the email package folds headers with it: a new header line, or a failure).
_HEADER_UNSAFE = "\u0000-\u0008\u000a-\u001f\u007f\u0085\u2028\u2029"
_HEADER_UNSAFE_CHAR = re.compile(f"[{_HEADER_UNSAFE}]")
_HEADER_SAFE = f"^[^{_HEADER_UNSAFE}]*$"  # the same rule, as the OpenAPI document's pattern
MAX_MAILBOX_LENGTH = 320  # one address with its display name: well inside a 998-byte line
MAX_HEADERS = 100
MAX_HEADER_VALUE_LENGTH = 998
MAX_ATTACHMENTS = 100


def _no_control_chars(value: str) -> None:
    if _HEADER_UNSAFE_CHAR.search(value):
        raise ValidationError("Must not contain line breaks or control characters.")


def _mailbox_schema() -> dict[str, Any]:
    """An RFC 5322 mailbox, "a@b.example" or "Name <a@b.example>", for the OpenAPI document."""
    return {
        "type": "string",
        "format": "mailbox",
        "maxLength": MAX_MAILBOX_LENGTH,
        "pattern": _HEADER_SAFE,
    }


def _address_list_schema(min_items: int = 0) -> dict[str, Any]:
    many: dict[str, Any] = {"type": "array", "items": _mailbox_schema()}
    if min_items:
        many["minItems"] = min_items
    return {"anyOf": [_mailbox_schema(), many]}


class AddressList(fields.Field):
    """One address or a list of them; each a single line of at most MAX_MAILBOX_LENGTH."""

    OPENAPI = _address_list_schema()

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValidationError("Must be an address or a list of addresses.")
        for item in items:
            _no_control_chars(item)
            if len(item) > MAX_MAILBOX_LENGTH:
                raise ValidationError(
                    f"Each address must be at most {MAX_MAILBOX_LENGTH} characters."
                )
        return [i.strip() for i in items if i.strip()]


class Attachment(Schema):
    """One attachment: base64 content."""

    filename = NonEmptyString(
        required=True,
        validate=[validate.Length(max=255), _no_control_chars],
        metadata={"example": "hello.txt"},
    )
    content = fields.String(required=True, metadata={"format": "byte", "example": "aGVsbG8="})
    # ASCII, and no "text/plain\n" through the regex's "$" (a blank line in the part's header)
    contentType = fields.String(
        load_default="application/octet-stream",
        validate=[_no_control_chars, validate.Regexp(r"^[\w.+-]+/[\w.+-]+$", flags=re.ASCII)],
        metadata={"example": "text/plain"},
    )


class HeaderMap(fields.Dict):
    """Extra headers: safe names, single-line values, none of the ones the service sets."""

    OPENAPI = {
        "maxProperties": MAX_HEADERS,
        "additionalProperties": {
            "type": "string",
            "maxLength": MAX_HEADER_VALUE_LENGTH,
            "pattern": _HEADER_SAFE,
        },
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(keys=fields.String(), values=fields.String(), **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> dict:
        headers = super()._deserialize(value, attr, data, **kwargs)
        if len(headers) > MAX_HEADERS:
            raise ValidationError(f"At most {MAX_HEADERS} headers.")
        problems = []
        for name, text in headers.items():
            if not _HEADER_NAME.fullmatch(name):  # never echo a huge name whole
                problems.append(f"Invalid header name {shown(name, 40)!r}.")
                continue
            if name.lower() in _RESERVED_HEADERS:
                problems.append(f"Header {name} cannot be set here.")
            if _HEADER_UNSAFE_CHAR.search(text):
                problems.append(
                    f"Header {name} must not contain line breaks or control characters."
                )
            elif len(text) > MAX_HEADER_VALUE_LENGTH:
                problems.append(
                    f"Header {name} must be at most {MAX_HEADER_VALUE_LENGTH} characters."
                )
        if problems:
            raise ValidationError(problems)
        return headers


class SendEmailInput(Schema):
    """POST /api/messages/send-email."""

    # what the OpenAPI document says of the whole body (see _needs_a_body)
    OPENAPI = {
        "anyOf": [
            {"required": ["text"], "properties": {"text": {"type": "string"}}},
            {"required": ["html"], "properties": {"html": {"type": "string"}}},
        ]
    }

    from_ = fields.String(
        required=True,
        data_key="from",
        validate=[_no_control_chars, validate.Length(max=MAX_MAILBOX_LENGTH)],
        metadata={**_mailbox_schema(), "example": "Sender <sender@example.com>"},
    )
    to = AddressList(
        required=True,
        metadata={**_address_list_schema(min_items=1), "example": ["rcpt@example.net"]},
    )
    cc = AddressList(load_default=list, metadata={"example": []})
    bcc = AddressList(load_default=list, metadata={"example": []})
    replyTo = AddressList(load_default=list, metadata={"example": "replies@example.com"})
    subject = fields.String(
        required=True,
        validate=[validate.Length(max=998), _no_control_chars],
        metadata={"pattern": _HEADER_SAFE, "example": "Hello"},
    )
    text = fields.String(load_default=None, metadata={"example": "Hi there"})
    html = fields.String(load_default=None, metadata={"example": "<p>Hi there</p>"})
    headers = HeaderMap(load_default=dict, metadata={"example": {"X-Campaign": "welcome"}})
    attachments = fields.List(
        fields.Nested(Attachment),
        load_default=list,
        validate=validate.Length(max=MAX_ATTACHMENTS, error="At most {max} attachments."),
    )
    trackOpens = StrictBoolean(load_default=True, metadata={"example": True})

    @post_load
    def _needs_a_body(self, data: dict[str, Any], **_kwargs: Any) -> dict[str, Any]:
        if data["text"] is None and data["html"] is None:
            raise ValidationError("At least one of text or html is required.", "text")
        if not data["to"]:
            raise ValidationError("At least one recipient is required.", "to")
        return data


class RejectedRecipient(Schema):
    """A recipient the server refused."""

    email = fields.String()
    code = fields.Integer(allow_none=True)
    enhancedCode = fields.String(allow_none=True)
    reply = fields.String(allow_none=True)
    type = fields.String()


class SendEmailResponse(Schema):
    """A message the server accepted."""

    success = fields.Boolean(required=True)
    messageId = fields.String()
    transport = fields.String()
    accepted = fields.List(fields.String())
    rejected = fields.List(fields.String())


class Bounce(Schema):
    """The classification of a refusal."""

    type = fields.String()
    code = fields.Integer(allow_none=True)
    enhancedCode = fields.String(allow_none=True)
    recipients = fields.List(fields.String())


class SendFailedResponse(Schema):
    """502: the server did not take the message."""

    success = fields.Boolean(required=True)
    error = fields.String(required=True)
    messageId = fields.String()
    transport = fields.String()
    bounce = fields.Nested(Bounce, allow_none=True)
    uncertain = fields.Boolean(
        metadata={
            "description": "Present (true) when the connection failed after the content was "
            "sent: the server may have the message, so it is not retried."
        }
    )


class MessageEvent(Schema):
    """One event of a message."""

    type = fields.String()
    at = fields.String()
    detail = fields.Dict(allow_none=True)


class MessageRecord(Schema):
    """GET /api/messages/<messageId>."""

    messageId = fields.String()
    status = fields.String()
    from_ = fields.String(data_key="from")
    recipients = fields.List(fields.String())
    subject = fields.String()
    transport = fields.String()
    accepted = fields.List(fields.String())
    rejected = fields.List(fields.Nested(RejectedRecipient))
    smtpReply = fields.String(allow_none=True)
    durationMs = fields.Float()
    createdAt = fields.String()
    opens = fields.Integer()
    firstOpenedAt = fields.String(allow_none=True)
    events = fields.List(fields.Nested(MessageEvent))


class SenderInput(Schema):
    """POST /api/senders."""

    email = fields.String(
        required=True,
        validate=[_no_control_chars, validate.Length(max=MAX_MAILBOX_LENGTH)],
        metadata={**_mailbox_schema(), "example": "sender@example.com"},
    )
    name = fields.String(
        load_default=None,
        validate=[validate.Length(max=200), _no_control_chars],
        metadata={"example": "Sender"},
    )


class Sender(Schema):
    """A verified sender of the account."""

    email = fields.String()
    name = fields.String(allow_none=True)
    createdAt = fields.String()


class SenderList(Schema):
    """GET /api/senders."""

    senders = fields.List(fields.Nested(Sender))


class Suppression(Schema):
    """An address the account will not send to."""

    email = fields.String()
    reason = fields.String()
    code = fields.Integer(allow_none=True)
    enhancedCode = fields.String(allow_none=True)
    messageId = fields.String(allow_none=True)
    createdAt = fields.String()


class SuppressionList(Schema):
    """GET /api/suppressions."""

    suppressions = fields.List(fields.Nested(Suppression))
