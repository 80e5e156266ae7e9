"""The schema of the files the service stores (and the old system wrote).

Files are read as the old Node service read them, which is more loosely than the API takes
input: that service stored what its clients sent (a port of "587", a secure of "false") and
Nodemailer coerced it when connecting. The API itself stays strict (schemas/requests.py).
"""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, validate

from smtp_service.schemas.fields import (
    HostName,
    NonEmptyString,
    RateLimitText,
    StrictBoolean,
    StrictInteger,
)

IMPLICIT_TLS_PORT = 465


class LegacyPort(fields.Integer):
    """A port as a JSON integer or, as the old service stored it, a string of digits ("587").

    Nodemailer read the port with Number(); a string that is not all digits (after trimming),
    a float, a boolean or null cannot be a port and makes the file unusable.
    """

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, str):
            text = value.strip()
            if not (text.isascii() and text.isdigit()):
                raise self.make_error("invalid")
            value = int(text)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class LegacyBoolean(fields.Boolean):
    """true/false, the strings "true"/"false" (any case, trimmed) the old service stored as it
    got them, or null (the field's default). Anything else makes the file unusable.

    The strings are read for what they say: Nodemailer's `!!"false"` would have meant true, an
    implicit TLS connection to a STARTTLS port that never worked.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_none=True, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise self.make_error("invalid", input=value)


MAX_CONNECTIONS = 100  # an account's cap on connections to its server (maxConnections)


class StoredSmtpSettings(Schema):
    """data/shared-data/{accountId}/smtp-settings.json, as the old system wrote it and as we do.

    Loads to {host, port: int, secure: bool, user, password, requireTls: bool, updatedAt,
    updatedBy}. Port 465 is implicit TLS whatever `secure` says (the spec's rule, which the old
    service and this one both apply on save; Nodemailer also chose TLS for 465 without secure).
    """

    host = HostName(required=True)  # normalised, as from the API; the text stays in the file
    port = LegacyPort(required=True, validate=validate.Range(min=1, max=65535))
    secure = LegacyBoolean(load_default=None)
    user = NonEmptyString(required=True)
    password = NonEmptyString(required=True, data_key="pass")
    requireTls = LegacyBoolean(load_default=None)
    maxConnections = StrictInteger(
        load_default=None, allow_none=True, validate=validate.Range(min=1, max=MAX_CONNECTIONS)
    )
    failover = StrictBoolean(load_default=None, allow_none=True)  # None: SMTP_FAILOVER
    rateLimit = RateLimitText(load_default=None, allow_none=True)
    updatedAt = fields.String(load_default=None)
    updatedBy = fields.String(load_default=None, allow_none=True)

    class Meta:
        unknown = "exclude"  # fields added by other tools must not make a file unreadable

    @post_load
    def _defaults(self, data: dict[str, Any], **_kwargs: Any) -> dict[str, Any]:
        secure = bool(data["secure"]) or data["port"] == IMPLICIT_TLS_PORT
        require_tls = True if data["requireTls"] is None else data["requireTls"]
        return {**data, "secure": secure, "requireTls": require_tls}


OAUTH_PROVIDERS = ("microsoft", "google")
OAUTH_GRANTS = ("authorization_code", "client_credentials")


class StoredOAuthSettings(Schema):
    """smtp-settings.json of an account that signs in with OAuth2 (`"auth": "oauth2"`).

    Loads to {auth, provider, grant, grantId, host, port, secure, user, requireTls,
    maxConnections, refreshToken (ciphertext, delegated sign-in), tenantId, clientId,
    clientSecret (ciphertext, client credentials), needsReauthorization, updatedAt, updatedBy}.
    `grantId` names one sign-in: a new sign-in gets a new one, a rotated refresh token keeps it.
    """

    auth = fields.String(required=True, validate=validate.Equal("oauth2"))
    provider = fields.String(required=True, validate=validate.OneOf(OAUTH_PROVIDERS))
    grant = fields.String(required=True, validate=validate.OneOf(OAUTH_GRANTS))
    grantId = NonEmptyString(required=True)
    host = HostName(required=True)
    port = LegacyPort(required=True, validate=validate.Range(min=1, max=65535))
    secure = LegacyBoolean(load_default=None)
    user = NonEmptyString(required=True)
    requireTls = LegacyBoolean(load_default=None)
    maxConnections = StrictInteger(
        load_default=None, allow_none=True, validate=validate.Range(min=1, max=MAX_CONNECTIONS)
    )
    refreshToken = NonEmptyString(load_default=None, allow_none=True)
    tenantId = NonEmptyString(load_default=None, allow_none=True)
    clientId = NonEmptyString(load_default=None, allow_none=True)
    clientSecret = NonEmptyString(load_default=None, allow_none=True)
    needsReauthorization = fields.Boolean(load_default=False)
    updatedAt = fields.String(load_default=None)
    updatedBy = fields.String(load_default=None, allow_none=True)

    class Meta:
        unknown = "exclude"

    @post_load
    def _defaults(self, data: dict[str, Any], **_kwargs: Any) -> dict[str, Any]:
        if data["grant"] == "client_credentials" and not (
            data["tenantId"] and data["clientId"] and data["clientSecret"]
        ):
            raise ValidationError("client credentials need tenantId, clientId, clientSecret")
        secure = bool(data["secure"]) or data["port"] == IMPLICIT_TLS_PORT
        require_tls = True if data["requireTls"] is None else data["requireTls"]
        return {**data, "secure": secure, "requireTls": require_tls}
