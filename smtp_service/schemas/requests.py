"""Request schemas: what each POST body may hold; loading one gives the service's input."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, pre_load, validate

from smtp_service.schemas.fields import (
    HOST_PATTERN,
    NonEmptyString,
    StrictBoolean,
    StrictInteger,
    check_host,
)
from smtp_service.schemas.stored import MAX_CONNECTIONS
from smtp_service.services import domain
from smtp_service.services.compose import MAX_MAILBOX_LENGTH
from smtp_service.services.errors import shown
from smtp_service.services.transport import Secret, SmtpEndpoint


def _no_line_breaks(value: str) -> None:
    if "\r" in value or "\n" in value:
        raise ValidationError("Must not contain line breaks.")


class SmtpSettingsInput(Schema):
    """POST /api/smtp/settings and POST /api/smtp/test."""

    host = NonEmptyString(
        required=True,
        validate=check_host,
        metadata={
            "pattern": HOST_PATTERN.pattern,
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
    maxConnections = StrictInteger(
        load_default=None,
        validate=validate.Range(min=1, max=MAX_CONNECTIONS),
        metadata={
            "example": 2,
            "description": "Optional: most connections open at once to this server, per "
            "worker (like Nodemailer's maxConnections), for servers that limit connections "
            "per client. Default: SMTP_POOL_SIZE.",
        },
    )

    @pre_load
    def _trim_host(self, data: Any, **_kwargs: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("host"), str):
            data = {**data, "host": data["host"].strip()}
        return data

    @post_load
    def _endpoint(self, data: dict[str, Any], **_kwargs: Any) -> SmtpEndpoint:
        # The spec: secure is optional, and forced true for port 465 (implicit TLS).
        secure = True if data["port"] == 465 else bool(data["secure"])
        return SmtpEndpoint(
            host=data["host"],
            port=data["port"],
            secure=secure,
            user=data["user"],
            password=Secret(data["password"]),
            require_tls=data["requireTls"],
            max_connections=data["maxConnections"],
        )


# -- sending -------------------------------------------------------------------------------------

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


class Base64Bytes(fields.String):
    """Bytes sent as standard base64 text (loaded as the decoded bytes)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bytes:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError("Must be base64.") from None


class Attachment(Schema):
    """One attachment: base64 content."""

    filename = NonEmptyString(
        required=True,
        validate=[validate.Length(max=255), _no_control_chars],
        metadata={"example": "hello.txt"},
    )
    content = Base64Bytes(required=True, metadata={"format": "byte", "example": "aGVsbG8="})
    # ASCII, and no "text/plain\n" through the regex's "$" (a blank line in the part's header)
    contentType = fields.String(
        load_default="application/octet-stream",
        validate=[_no_control_chars, validate.Regexp(r"^[\w.+-]+/[\w.+-]+$", flags=re.ASCII)],
        metadata={"example": "text/plain"},
    )

    @post_load
    def _attachment(self, data: dict[str, Any], **_kwargs: Any) -> domain.Attachment:
        return domain.Attachment(data["filename"], data["contentType"], data["content"])


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

    # what the OpenAPI document says of the whole body (see _request)
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
    def _request(self, data: dict[str, Any], **_kwargs: Any) -> domain.SendRequest:
        if data["text"] is None and data["html"] is None:
            raise ValidationError("At least one of text or html is required.", "text")
        if not data["to"]:
            raise ValidationError("At least one recipient is required.", "to")
        return domain.SendRequest(
            sender=data["from_"],
            to=data["to"],
            cc=data["cc"],
            bcc=data["bcc"],
            reply_to=data["replyTo"],
            subject=data["subject"],
            text=data["text"],
            html=data["html"],
            headers=data["headers"],
            attachments=data["attachments"],
            track_opens=data["trackOpens"],
        )


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
