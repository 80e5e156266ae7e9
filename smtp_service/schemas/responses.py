"""Response schemas: what each route answers, for the OpenAPI document."""

from __future__ import annotations

from marshmallow import Schema, fields


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


# -- senders and suppressions -------------------------------------------------------------------


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
