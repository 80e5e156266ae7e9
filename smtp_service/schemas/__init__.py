"""Marshmallow schemas, grouped by role: requests (input validation), responses (what the views
answer, and the OpenAPI document), stored (the files on disk).

Every schema is re-exported here, so `from smtp_service.schemas import X` keeps working.
"""

from smtp_service.schemas.fields import NonEmptyString, StrictBoolean, StrictInteger
from smtp_service.schemas.requests import (
    MAX_ATTACHMENTS,
    MAX_HEADER_VALUE_LENGTH,
    MAX_HEADERS,
    MAX_MAILBOX_LENGTH,
    AddressList,
    Attachment,
    HeaderMap,
    SendEmailInput,
    SenderConfirmInput,
    SenderInput,
    SmtpSettingsInput,
)
from smtp_service.schemas.responses import (
    Bounce,
    ConnectionTestResponse,
    ErrorResponse,
    HealthResponse,
    MessageEvent,
    MessageRecord,
    MessageResponse,
    ReadyResponse,
    RejectedRecipient,
    SavedSettings,
    SaveSettingsResponse,
    SendEmailResponse,
    Sender,
    SenderList,
    SendFailedResponse,
    SmtpSettingsView,
    Suppression,
    SuppressionList,
)
from smtp_service.schemas.stored import StoredSmtpSettings

__all__ = [
    "MAX_ATTACHMENTS",
    "MAX_HEADERS",
    "MAX_HEADER_VALUE_LENGTH",
    "MAX_MAILBOX_LENGTH",
    "AddressList",
    "Attachment",
    "Bounce",
    "ConnectionTestResponse",
    "ErrorResponse",
    "HeaderMap",
    "HealthResponse",
    "ReadyResponse",
    "MessageEvent",
    "MessageRecord",
    "MessageResponse",
    "NonEmptyString",
    "RejectedRecipient",
    "SaveSettingsResponse",
    "SavedSettings",
    "SendEmailInput",
    "SendEmailResponse",
    "SendFailedResponse",
    "Sender",
    "SenderConfirmInput",
    "SenderInput",
    "SenderList",
    "SmtpSettingsInput",
    "SmtpSettingsView",
    "StoredSmtpSettings",
    "StrictBoolean",
    "StrictInteger",
    "Suppression",
    "SuppressionList",
]
