"""Request schemas: what each POST body may hold; loading one gives the service's input."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, pre_load, validate

from smtp_service.schemas.fields import (
    HOST_PATTERN,
    HostName,
    NonEmptyString,
    RateLimitText,
    StrictBoolean,
    StrictInteger,
)
from smtp_service.schemas.stored import MAX_CONNECTIONS, OAUTH_PROVIDERS
from smtp_service.services import domain
from smtp_service.services.addresses import MAX_ADDRESS_LIST_LENGTH, MAX_MAILBOX_LENGTH
from smtp_service.services.compose import attachment_type_problem
from smtp_service.services.errors import InvalidInput, shown
from smtp_service.services.headers import caller_headers
from smtp_service.services.transport import Secret, SmtpEndpoint


def _no_line_breaks(value: str) -> None:
    if "\r" in value or "\n" in value:
        raise ValidationError("Must not contain line breaks.")


class SmtpSettingsInput(Schema):
    """POST /api/smtp/settings and POST /api/smtp/test."""

    host = HostName(
        required=True,
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

    failover = StrictBoolean(
        load_default=None,
        metadata={
            "example": True,
            "description": "Optional: when this server fails to connect (refused, timeout, "
            "TLS, authentication, 421), send through the global server instead. Default: "
            "SMTP_FAILOVER (false).",
        },
    )
    rateLimit = RateLimitText(
        load_default=None,
        allow_none=True,
        metadata={
            "example": "500/day",
            "maxLength": 200,
            "description": "Optional: the account's send rate limit, in place of the "
            "service's SEND_RATE_LIMIT: one or more rates in flask-limiter's syntax "
            "('500/day', '100/minute;2000/hour', '10 per 5 seconds'), counted in fixed "
            "windows aligned on UTC; 'unlimited' for no limit; absent or null: the default. "
            "Past it, send-email answers 429 with Retry-After.",
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
            failover=data["failover"],
            rate_limit=data["rateLimit"],
        )


# -- OAuth2 ------------------------------------------------------------------------------------

# A Microsoft tenant: its GUID or one of its domains (contoso.onmicrosoft.com); it becomes part
# of the token URL's path, so nothing else (no "/", "?", "%") gets through.
_TENANT = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?$")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _server_fields() -> dict[str, fields.Field]:
    """host, port, secure, requireTls: optional, the provider's submission server by default."""
    return {
        "host": HostName(
            load_default=None,
            metadata={"example": "smtp.office365.com", "description": "Default: the provider's "
                      "submission server (smtp.office365.com, smtp.gmail.com)."},
        ),
        "port": StrictInteger(
            load_default=None, validate=validate.Range(min=1, max=65535),
            metadata={"example": 587, "description": "Default: 587."},
        ),
        "secure": StrictBoolean(load_default=None, metadata={"example": False}),
        "requireTls": StrictBoolean(load_default=True, metadata={"example": True}),
    }


class OAuthStartInput(Schema.from_dict(_server_fields())):  # type: ignore[misc]
    """POST /api/smtp/oauth/start: which provider and mailbox to sign in."""

    provider = fields.String(
        required=True,
        validate=validate.OneOf(OAUTH_PROVIDERS),
        metadata={"example": "microsoft"},
    )
    user = NonEmptyString(
        required=True,
        validate=[validate.Length(max=320), _no_line_breaks],
        metadata={"example": "mailbox@contoso.com", "description": "The mailbox to send as."},
    )

    @pre_load
    def _trim_host(self, data: Any, **_kwargs: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("host"), str):
            data = {**data, "host": data["host"].strip()}
        return data


_APP_ONLY = (
    "App-only sign-in (client credentials) is Microsoft's; a Google Workspace mailbox signs "
    "in with POST /api/smtp/oauth/start"
)


class OAuthSettingsInput(Schema.from_dict(_server_fields())):  # type: ignore[misc]
    """POST /api/smtp/settings and POST /api/smtp/test with "auth": "oauth2": Microsoft
    app-only sign-in (client credentials). Loads to a dict of the fields."""

    auth = fields.String(required=True, validate=validate.Equal("oauth2"))
    provider = fields.String(required=True, validate=validate.Equal("microsoft", error=_APP_ONLY))
    user = NonEmptyString(
        required=True,
        validate=[validate.Length(max=320), _no_line_breaks],
        metadata={"example": "mailbox@contoso.com"},
    )
    tenantId = fields.String(
        required=True,
        validate=validate.Regexp(_TENANT, error="Must be a tenant id (GUID) or domain."),
        metadata={"example": "contoso.onmicrosoft.com"},
    )
    clientId = fields.String(
        required=True,
        validate=validate.Regexp(_CLIENT_ID, error="Must be an application (client) id."),
        metadata={"example": "00000000-0000-0000-0000-000000000000"},
    )
    clientSecret = NonEmptyString(
        required=True,
        validate=[validate.Length(max=1024), _no_line_breaks],
        metadata={"example": "client-secret", "description": "Stored encrypted; never shown."},
    )
    maxConnections = StrictInteger(
        load_default=None, validate=validate.Range(min=1, max=MAX_CONNECTIONS)
    )

    @pre_load
    def _trim_host(self, data: Any, **_kwargs: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("host"), str):
            data = {**data, "host": data["host"].strip()}
        return data


class SavedOAuthTestInput(Schema):
    """POST /api/smtp/test {"auth": "oauth2"}: test the account's saved OAuth2 sign-in."""

    auth = fields.String(required=True, validate=validate.Equal("oauth2"))


_PASSWORD_SETTINGS = SmtpSettingsInput()
_OAUTH_SETTINGS = OAuthSettingsInput()
_SAVED_OAUTH_TEST = SavedOAuthTestInput()


class SettingsInput(SmtpSettingsInput):
    """POST /api/smtp/settings: the password form (an SmtpEndpoint, the spec's contract) or,
    with "auth": "oauth2", Microsoft client credentials (a dict, OAuthSettingsInput)."""

    def load(self, data: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """OAuthSettingsInput's load for "auth": "oauth2", else SmtpSettingsInput's."""
        if isinstance(data, dict) and data.get("auth") == "oauth2":
            return _OAUTH_SETTINGS.load(data, **kwargs)
        return _PASSWORD_SETTINGS.load(data, **kwargs)


class ConnectionTestInput(SettingsInput):
    """POST /api/smtp/test: as SettingsInput, and {"auth": "oauth2"} alone tests the saved
    OAuth2 sign-in (a dict {"auth": "oauth2"})."""

    def load(self, data: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """SavedOAuthTestInput's load for {"auth": "oauth2"} alone, else SettingsInput's."""
        if isinstance(data, dict) and data.get("auth") == "oauth2" and set(data) == {"auth"}:
            return _SAVED_OAUTH_TEST.load(data, **kwargs)
        return super().load(data, **kwargs)


# -- sending -------------------------------------------------------------------------------------

_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 field name: printable, no colon


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
        "description": "One mailbox: a@b.example, <a@b.example>, Jane Doe <a@b.example> or "
        '"Doe, Jane" <a@b.example> (RFC 5322 3.4). Special-use and internal domains '
        "(corp.local, .internal, .test) are accepted; internationalised addresses too.",
    }


ADDRESS_LIST_DESCRIPTION = (
    "An RFC 5322 address list, as Nodemailer accepts it: a@b.example; Jane Doe <a@b.example>; "
    '"Doe, Jane" <a@b.example> (a quoted name may hold commas); several separated by commas '
    "(a@b.example, Jane <j@b.example>); groups, Team: a@b.example, b@b.example; (also empty: "
    "undisclosed-recipients:;), whose members are recipients; comments, a@b.example (Jane), "
    "are dropped; RFC 2047 encoded-words in names are decoded. Special-use and internal domains "
    "(corp.local, .internal, .test, single labels) are accepted: the SMTP server decides. "
    "Refused: quoted local parts and domain literals (a@[10.0.0.1])."
)


def _address_string_schema() -> dict[str, Any]:
    """One string of an address field, for the OpenAPI document."""
    return {
        "type": "string",
        "format": "address-list",
        "maxLength": MAX_ADDRESS_LIST_LENGTH,
        "pattern": _HEADER_SAFE,
        "description": ADDRESS_LIST_DESCRIPTION,
    }


def _address_list_schema(min_items: int = 0) -> dict[str, Any]:
    many: dict[str, Any] = {"type": "array", "items": _address_string_schema()}
    if min_items:
        many["minItems"] = min_items
    return {"anyOf": [_address_string_schema(), many], "description": ADDRESS_LIST_DESCRIPTION}


class AddressList(fields.Field):
    """One address string or a list of them; each a single line of at most
    MAX_ADDRESS_LIST_LENGTH that may hold an RFC 5322 address list (services.addresses)."""

    OPENAPI = _address_list_schema()

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValidationError("Must be an address or a list of addresses.")
        for item in items:
            _no_control_chars(item)
            if len(item) > MAX_ADDRESS_LIST_LENGTH:
                raise ValidationError(
                    f"Each address string must be at most {MAX_ADDRESS_LIST_LENGTH} characters."
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


_CID = re.compile(r"^[!-;=?-~]{1,250}$")  # printable ASCII without space, "<" and ">"


def _attachable(content_type: str) -> None:
    problem = attachment_type_problem(content_type)
    if problem is not None:
        raise ValidationError(problem)


def _strip_cid_scheme(value: Any) -> Any:
    """ "cid:logo" (Postmark's ContentID) and "logo" (Nodemailer's cid) name the same part."""
    if isinstance(value, str) and value[:4].lower() == "cid:":
        return value[4:]
    return value


class Attachment(Schema):
    """One attachment: base64 content. A message/rfc822 attachment is sent as a message part
    (7bit or 8bit, RFC 2046 5.2.1); multipart/* and other message/* types are refused. With a
    `cid`, the attachment is an inline part of the html (multipart/related), referenced there as
    `<img src="cid:...">` (RFC 2392), as Nodemailer's cid and Postmark's ContentID."""

    filename = NonEmptyString(
        required=True,
        validate=[validate.Length(max=255), _no_control_chars],
        metadata={"example": "hello.txt"},
    )
    content = Base64Bytes(required=True, metadata={"format": "byte", "example": "aGVsbG8="})
    # ASCII, and no "text/plain\n" through the regex's "$" (a blank line in the part's header)
    contentType = fields.String(
        load_default="application/octet-stream",
        validate=[
            _no_control_chars,
            validate.Regexp(r"^[\w.+-]+/[\w.+-]+$", flags=re.ASCII),
            _attachable,
        ],
        metadata={
            "example": "text/plain",
            "description": "The MIME type. message/rfc822 (and message/global) attach a whole "
            "message, sent as a message (not base64); multipart/* and other message/* types "
            "are refused.",
        },
    )
    cid = fields.String(
        load_default=None,
        validate=validate.Regexp(
            _CID.pattern, error="Must be 1-250 printable ASCII characters without spaces, < or >."
        ),
        metadata={
            "pattern": _CID.pattern,
            "example": "logo@example.com",
            "description": "Content-ID of an inline part: the html refers to it as "
            "cid:<this value>. A leading cid: is dropped.",
        },
    )

    @pre_load
    def _cid_without_scheme(self, data: Any, **_kwargs: Any) -> Any:
        if isinstance(data, dict) and "cid" in data:
            data = {**data, "cid": _strip_cid_scheme(data["cid"])}
        return data

    @post_load
    def _attachment(self, data: dict[str, Any], **_kwargs: Any) -> domain.Attachment:
        return domain.Attachment(
            data["filename"], data["contentType"], data["content"], data["cid"]
        )


class HeaderMap(fields.Dict):
    """Extra headers: safe names, single-line values, the rules of services.headers (which
    fields a caller may set, each checked against its grammar; no name twice)."""

    OPENAPI = {
        "description": "Extra header fields. Refused: the fields the service sets (From, To, "
        "Cc, Bcc, Reply-To, Sender, Subject, Date, Message-ID, MIME-Version, Content-Type, "
        "Content-Transfer-Encoding), trace and resent fields (Return-Path, Received, Resent-*), "
        "MIME part fields but Content-Language, DKIM-Signature, ARC-*, Authentication-Results, "
        "and a name given twice in any case. Checked and sent verbatim: In-Reply-To and "
        "References (message ids), List-* (<URI> lists, RFC 2369), List-Unsubscribe-Post "
        "(List-Unsubscribe=One-Click, RFC 8058), List-Id, Content-Language, Auto-Submitted, "
        "Disposition-Notification-To. Any other field is text: ASCII verbatim, other text "
        "RFC 2047-encoded. Values are folded only at white space.",
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
        try:
            caller_headers(headers.items())
        except InvalidInput as exc:
            raise ValidationError(exc.fields["headers"]) from None
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
        cids = [a.cid for a in data["attachments"] if a.cid]
        if len(cids) != len(set(cids)):
            raise ValidationError("Each cid must name one attachment.", "attachments")
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


class SenderConfirmInput(Schema):
    """POST /api/senders/<email>/confirm."""

    code = fields.String(
        required=True,
        validate=[validate.Length(min=1, max=64), _no_control_chars],
        metadata={
            "example": "ABCD-EFGH-IJKL-MNOP",
            "description": "The code of the confirmation message sent to the address.",
        },
    )


class MailboxQuery(Schema):
    """GET /api/dev/mailbox?to=&limit= (only while `make run`'s mail catcher runs)."""

    to = fields.String(
        load_default=None,
        validate=[_no_control_chars, validate.Length(min=1, max=MAX_MAILBOX_LENGTH)],
        metadata={"description": "Only messages with this envelope recipient."},
    )
    limit = fields.Integer(
        load_default=50,
        validate=validate.Range(min=1, max=500),
        metadata={"description": "The newest this many messages (1-500, default 50)."},
    )
