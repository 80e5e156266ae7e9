"""The schema of the files the service stores (and the old system wrote)."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from smtp_service.schemas.fields import NonEmptyString, StrictBoolean, StrictInteger, check_host

MAX_CONNECTIONS = 100  # an account's cap on connections to its server (maxConnections)


class StoredSmtpSettings(Schema):
    """data/shared-data/{accountId}/smtp-settings.json, as the old system wrote it and as we do."""

    host = NonEmptyString(required=True, validate=check_host)
    port = StrictInteger(required=True, validate=validate.Range(min=1, max=65535))
    secure = StrictBoolean(load_default=False)
    user = NonEmptyString(required=True)
    password = NonEmptyString(required=True, data_key="pass")
    requireTls = StrictBoolean(load_default=True)
    maxConnections = StrictInteger(
        load_default=None, allow_none=True, validate=validate.Range(min=1, max=MAX_CONNECTIONS)
    )
    updatedAt = fields.String(load_default=None)
    updatedBy = fields.String(load_default=None, allow_none=True)

    class Meta:
        unknown = "exclude"  # fields added by other tools must not make a file unreadable
