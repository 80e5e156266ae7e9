"""Response schemas: the views dump every JSON answer through these, and the OpenAPI document
is generated from them, so what the document says is what the service sends.

Schemas that answer with a domain value (a SendResult, the active settings) say in a pre_dump
hook how that value reads in JSON; the others dump the plain dicts the services return.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from marshmallow import Schema, fields, post_dump, pre_dump

if TYPE_CHECKING:  # only named in hints: the services import the stored-file schema
    from smtp_service.services.domain import SendResult
    from smtp_service.services.settings import ActiveSettings


_MAX_CONNECTIONS = (
    "Present when the account set it: most connections open at once to its server, per worker."
)
_FAILOVER = (
    "Present when the account set it: whether a failure to connect to its server sends the "
    "message through the global server instead (unset: SMTP_FAILOVER; GET /api/smtp/health "
    "shows the value in force)."
)
_RATE_LIMIT = (
    "Present when the account set it: its send rate limit ('500/day', or 'unlimited'), in "
    "place of the service's SEND_RATE_LIMIT."
)


_OAUTH_FIELDS = {
    "auth": "Present for OAuth2 settings: oauth2 (the password form has no such field).",
    "provider": "OAuth2: microsoft or google.",
    "grant": "OAuth2: authorization_code (delegated sign-in) or client_credentials (app-only).",
    "hasRefreshToken": "OAuth2: whether a refresh token is stored (never shown).",
    "needsReauthorization": "OAuth2: the provider refused the sign-in (consent revoked, "
    "password changed); sends fail until the account signs in again.",
    "tenantId": "OAuth2 client credentials: the Microsoft tenant.",
    "clientId": "OAuth2 client credentials: the application (client) id.",
    "hasClientSecret": "OAuth2 client credentials: whether a client secret is stored.",
}


def _oauth_fields() -> dict[str, fields.Field]:
    strings = ("auth", "provider", "grant", "tenantId", "clientId")
    return {
        name: (fields.String if name in strings else fields.Boolean)(
            metadata={"description": text}
        )
        for name, text in _OAUTH_FIELDS.items()
    }


def _oauth_view(info: Any) -> dict[str, Any]:
    """The OAuth2 fields of a view: what the sign-in is, never a token or secret."""
    view = {
        "auth": "oauth2",
        "provider": info.provider,
        "grant": info.grant,
        "hasRefreshToken": info.has_refresh_token,
        "needsReauthorization": info.needs_reauthorization,
    }
    if info.grant == "client_credentials":
        view.update(tenantId=info.tenant_id, clientId=info.client_id, hasClientSecret=True)
    return view


class SmtpSettingsView(Schema.from_dict(_oauth_fields())):  # type: ignore[misc]
    """GET /api/smtp/settings."""

    host = fields.String(allow_none=True)
    port = fields.Integer(allow_none=True)
    secure = fields.Boolean()
    user = fields.String(allow_none=True)
    hasPassword = fields.Boolean()
    isGlobal = fields.Boolean()
    requireTls = fields.Boolean()
    maxConnections = fields.Integer(metadata={"description": _MAX_CONNECTIONS})
    failover = fields.Boolean(metadata={"description": _FAILOVER})
    rateLimit = fields.String(metadata={"description": _RATE_LIMIT})

    @pre_dump
    def _from_settings(self, active: ActiveSettings, **_kwargs: Any) -> dict[str, Any]:
        e = active.endpoint
        view = {
            "host": active.host_as_stored or (e.host if e else None),
            "port": e.port if e else None,
            "secure": e.secure if e else False,
            "user": e.user if e else None,
            "hasPassword": bool(e and e.password),
            "isGlobal": active.is_global,
            "requireTls": e.require_tls if e else True,
        }
        if e is not None and e.max_connections is not None:
            view["maxConnections"] = e.max_connections
        if e is not None and not active.is_global and e.failover is not None:
            view["failover"] = e.failover
        if e is not None and e.rate_limit is not None:
            view["rateLimit"] = e.rate_limit
        if active.oauth is not None:
            view.update(_oauth_view(active.oauth))
        return view


class SavedSettings(Schema.from_dict(_oauth_fields())):  # type: ignore[misc]
    """The settings echoed after a save (a StoredSettings): never the password or a token."""

    host = fields.String(attribute="endpoint.host")
    port = fields.Integer(attribute="endpoint.port")
    secure = fields.Boolean(attribute="endpoint.secure")
    user = fields.String(attribute="endpoint.user")
    requireTls = fields.Boolean(attribute="endpoint.require_tls")
    maxConnections = fields.Integer(
        attribute="endpoint.max_connections", metadata={"description": _MAX_CONNECTIONS}
    )
    failover = fields.Boolean(attribute="endpoint.failover", metadata={"description": _FAILOVER})
    rateLimit = fields.String(
        attribute="endpoint.rate_limit", metadata={"description": _RATE_LIMIT}
    )
    updatedAt = fields.String(attribute="updated_at")
    updatedBy = fields.String(attribute="updated_by", allow_none=True)

    @post_dump(pass_original=True)
    def _cap_only_when_set(
        self, data: dict[str, Any], original: Any, **_kwargs: Any
    ) -> dict[str, Any]:
        for name in ("maxConnections", "failover", "rateLimit"):
            if data.get(name) is None:
                data.pop(name, None)
        if getattr(original, "oauth", None) is not None:
            data.update(_oauth_view(original.oauth))
        return data


class SaveSettingsResponse(Schema):
    """POST /api/smtp/settings."""

    message = fields.String()
    settings = fields.Nested(SavedSettings)


class OAuthStartResponse(Schema):
    """POST /api/smtp/oauth/start."""

    authorizationUrl = fields.String(
        required=True,
        metadata={
            "description": "The provider's sign-in page: send the user there. It returns to "
            "PUBLIC_BASE_URL/api/smtp/oauth/callback, which saves the settings."
        },
    )
    expiresIn = fields.Integer(
        metadata={"description": "Seconds the link may be used in (once)."}
    )


class MessageResponse(Schema):
    """A plain confirmation."""

    message = fields.String()


class ConnectionTestResponse(Schema):
    """POST /api/smtp/test: success with a message, or failure with an error."""

    success = fields.Boolean(required=True)
    message = fields.String()
    error = fields.String()
    authenticated = fields.Boolean(
        metadata={
            "description": "Present (false) on success when the credentials were not used: "
            "the server offers no AUTH (a relay that trusts the client's address), and mail "
            "is sent without authentication."
        }
    )


class ErrorResponse(Schema):
    """Every error answer."""

    error = fields.String(required=True)
    details = fields.Dict(keys=fields.String())
    suppressed = fields.List(fields.String())  # 422 from send-email: the suppressed recipients


class HealthLatency(Schema):
    """Send latency of the window's sent messages, in milliseconds (null: none sent)."""

    p50 = fields.Float(allow_none=True)
    p95 = fields.Float(allow_none=True)


class TransportHealth(Schema):
    """One transport's health (a services.health.TransportReport)."""

    server = fields.String(allow_none=True, metadata={"description": "host:port"})
    circuit = fields.String(
        metadata={
            "description": "closed (used), open (skipped until openUntil), half_open (one "
            "request is trying it); the global server has no breaker"
        }
    )
    consecutiveFailures = fields.Integer()
    openUntil = fields.String(allow_none=True)
    lastSuccessAt = fields.String(allow_none=True)
    lastFailureAt = fields.String(allow_none=True)
    lastFailureKind = fields.String(allow_none=True)
    lastFailureReason = fields.String(allow_none=True)
    latencyMs = fields.Nested(HealthLatency)

    @pre_dump
    def _from_report(self, report: Any, **_kwargs: Any) -> dict[str, Any]:
        return {
            "server": report.server,
            "circuit": report.circuit,
            "consecutiveFailures": report.consecutive_failures,
            "openUntil": report.open_until,
            "lastSuccessAt": report.last_success_at,
            "lastFailureAt": report.last_failure_at,
            "lastFailureKind": report.last_failure_kind,
            "lastFailureReason": report.last_failure_reason,
            "latencyMs": {"p50": report.p50_ms, "p95": report.p95_ms},
        }


class SmtpHealthResponse(Schema):
    """GET /api/smtp/health (a services.health.AccountHealth)."""

    transport = fields.String(
        metadata={"description": "the transport the account's mail goes through now"}
    )
    failover = fields.Boolean(
        metadata={"description": "whether a failure of the account's own server fails over"}
    )
    windowSeconds = fields.Integer(attribute="window_seconds")
    needsReauthorization = fields.Boolean(
        attribute="needs_reauthorization",
        metadata={
            "description": "the account's OAuth2 grant was refused (consent revoked, password "
            "changed): it must sign in again (POST /api/smtp/oauth/start)"
        },
    )
    custom = fields.Nested(
        TransportHealth,
        attribute="transports.custom",
        metadata={"description": "the account's own server"},
    )
    global_ = fields.Nested(
        TransportHealth,
        attribute="transports.global",
        data_key="global",
        metadata={"description": "the global server"},
    )


class HealthResponse(Schema):
    """GET /healthz."""

    status = fields.String(required=True)
    error = fields.String()


class ReadyResponse(Schema):
    """GET /readyz: each check "ok" (or "not configured" for the global server) or why not."""

    status = fields.String(
        required=True, metadata={"description": '"ready", or "not ready" (then 503)'}
    )
    checks = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        required=True,
        metadata={"description": "dataDir, database, smtp: ok, not configured, or why not"},
    )
    failing = fields.List(
        fields.String(), required=True, metadata={"description": "the checks that failed"}
    )


# -- sending ------------------------------------------------------------------------------------


_CATEGORY = (
    "Whose fault a refusal was: mailbox (the address does not exist), mailbox-full, transient "
    "(the server cannot take it now), policy (the sender or the message was refused), "
    "protocol; for a message not sent at all, the connection failure: dns, blocked, refused, "
    "timeout, tls, auth, protocol or closed. The README has the table."
)
_TEMPORARY = "True when the same request can succeed later (retry after a while)."
_FAILED_OVER = (
    "Present (true) when the account's own server failed to connect, or its circuit was open, "
    "and the message went through the global server instead (`transport` is then global)."
)


class Refusal(Schema):
    """How a recipient's refusal reads to a caller that acts on it."""

    email = fields.String()
    code = fields.Integer(allow_none=True)
    enhancedCode = fields.String(attribute="enhanced_code", allow_none=True)
    temporary = fields.Boolean(metadata={"description": _TEMPORARY})
    category = fields.String(metadata={"description": _CATEGORY})


class RejectedRecipient(Schema):
    """A recipient the server refused."""

    email = fields.String()
    code = fields.Integer(allow_none=True)
    enhancedCode = fields.String(allow_none=True)
    reply = fields.String(allow_none=True)
    type = fields.String()
    category = fields.String(metadata={"description": _CATEGORY})
    temporary = fields.Boolean(metadata={"description": _TEMPORARY})


class SendEmailResponse(Schema):
    """A message the server accepted (a SendResult with outcome "sent")."""

    success = fields.Boolean(required=True)
    messageId = fields.String()
    transport = fields.String()
    accepted = fields.List(fields.String())
    rejected = fields.List(fields.String())
    refusals = fields.List(
        fields.Nested(Refusal),
        metadata={"description": "Present when `rejected` is not empty: each refusal's class."},
    )
    failover = fields.Boolean(metadata={"description": _FAILED_OVER})

    @pre_dump
    def _from_result(self, result: SendResult, **_kwargs: Any) -> dict[str, Any]:
        answer = {
            "success": True,
            "messageId": result.message_id,
            "transport": result.transport,
            "accepted": result.accepted,
            "rejected": [r.email for r in result.rejected],
        }
        if result.rejected and all(r.category for r in result.rejected):
            answer["refusals"] = result.rejected  # (not for a result kept from before classes)
        if result.failover:
            answer["failover"] = True
        return answer


class Bounce(Schema):
    """The classification of a refusal."""

    type = fields.String()
    code = fields.Integer(allow_none=True)
    enhancedCode = fields.String(attribute="enhanced_code", allow_none=True)
    recipients = fields.List(fields.String())


class SendFailedResponse(Schema):
    """502: the server did not take the message (a SendResult "failed" or "bounced")."""

    success = fields.Boolean(required=True)
    error = fields.String(required=True)
    messageId = fields.String()
    transport = fields.String()
    bounce = fields.Nested(Bounce, allow_none=True)
    temporary = fields.Boolean(metadata={"description": _TEMPORARY})
    category = fields.String(metadata={"description": _CATEGORY})
    uncertain = fields.Boolean(
        metadata={
            "description": "Present (true) when the connection failed after the content was "
            "sent: the server may have the message, so it is not retried."
        }
    )
    failover = fields.Boolean(metadata={"description": _FAILED_OVER})

    @pre_dump
    def _from_result(self, result: SendResult, **_kwargs: Any) -> dict[str, Any]:
        answer = {
            "success": False,
            "messageId": result.message_id,
            "transport": result.transport,
            "error": result.error,
            "bounce": result.bounce,
        }
        if result.temporary is not None:  # None: a result kept from before they were told
            answer["temporary"] = result.temporary
            answer["category"] = result.category
        if result.uncertain:
            answer["uncertain"] = True
        if result.failover:
            answer["failover"] = True
        return answer


class MessageEvent(Schema):
    """One event of a message."""

    type = fields.String()
    at = fields.String()
    detail = fields.Dict(allow_none=True)


class MessageSummary(Schema):
    """A message in the listing: its record without the events."""

    messageId = fields.String()
    status = fields.String()
    from_ = fields.String(data_key="from", attribute="from")
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


class MessageRecord(MessageSummary):
    """GET /api/messages/<messageId>."""

    events = fields.List(fields.Nested(MessageEvent))


class MessageList(Schema):
    """GET /api/messages: a page of messages, newest first (a MessagePage)."""

    messages = fields.List(fields.Nested(MessageSummary))
    nextCursor = fields.String(
        attribute="next_cursor",
        allow_none=True,
        metadata={"description": "Pass as `cursor` for the next page; null on the last page."},
    )


class LatencyPercentiles(Schema):
    """Nearest-rank percentiles of the sent messages' send duration, in milliseconds."""

    p50 = fields.Float(allow_none=True)
    p95 = fields.Float(allow_none=True)
    p99 = fields.Float(allow_none=True)


class StatsPeriod(Schema):
    """The counts of one interval, or of the whole range (a Period). README: Analytics."""

    start = fields.String()
    end = fields.String(metadata={"description": "Exclusive."})
    messages = fields.Integer(metadata={"description": "Send attempts recorded (any status)."})
    sent = fields.Integer(metadata={"description": "Messages the server took."})
    failed = fields.Integer(
        metadata={"description": "Messages not sent: connection, TLS, authentication."}
    )
    bounced = fields.Integer(metadata={"description": "Messages the server refused."})
    hardBounces = fields.Integer(
        attribute="hard_bounces",
        metadata={"description": "Recipients refused with a permanent reply (per recipient)."},
    )
    softBounces = fields.Integer(
        attribute="soft_bounces",
        metadata={"description": "Recipients refused with a temporary reply (per recipient)."},
    )
    tracked = fields.Integer(metadata={"description": "Sent messages with the open pixel."})
    opened = fields.Integer(metadata={"description": "Messages opened at least once."})
    opens = fields.Integer(metadata={"description": "Opens counted (not unique)."})
    openRate = fields.Float(
        attribute="open_rate",
        allow_none=True,
        metadata={"description": "Tracked sent messages opened / tracked; null: none tracked."},
    )
    latencyMs = fields.Nested(LatencyPercentiles, attribute="latency_ms")


class MessageStatsResponse(Schema):
    """GET /api/messages/stats (a MessageStats)."""

    from_ = fields.String(data_key="from", attribute="start")
    to = fields.String(attribute="end", metadata={"description": "Exclusive."})
    interval = fields.String()
    total = fields.Nested(StatsPeriod)
    intervals = fields.List(fields.Nested(StatsPeriod))


# -- senders and suppressions -------------------------------------------------------------------


class Sender(Schema):
    """A sender of the account, and how far it is verified."""

    email = fields.String()
    name = fields.String(allow_none=True)
    createdAt = fields.String(attribute="created_at")
    status = fields.String(
        metadata={
            "enum": ["pending", "confirmed", "legacy"],
            "description": "pending: a confirmation code was sent to the address; it may send "
            "through the account's own server, not through the global one until confirmed. "
            "confirmed: may send through either. legacy: stored before verification existed; "
            "works as before (both routes) until an operator confirms or revokes it.",
        }
    )


class SenderList(Schema):
    """GET /api/senders."""

    senders = fields.List(fields.Nested(Sender))


class Suppression(Schema):
    """An address the account will not send to."""

    email = fields.String()
    reason = fields.String()
    code = fields.Integer(allow_none=True)
    enhancedCode = fields.String(allow_none=True)
    reply = fields.String(allow_none=True)
    messageId = fields.String(allow_none=True)
    createdAt = fields.String()
    expiresAt = fields.String(
        allow_none=True, metadata={"description": "null: kept until removed (SUPPRESSION_DAYS=0)"}
    )


class SuppressionList(Schema):
    """GET /api/suppressions."""

    suppressions = fields.List(fields.Nested(Suppression))


# -- the development mail catcher (only while `make run` runs it) --------------------------------


class CatcherEndpoint(Schema):
    """Where the catcher takes SMTP: accounts may save it as their own server."""

    host = fields.String(required=True)
    port = fields.Integer(required=True)


class CaughtMessage(Schema):
    """A message the catcher kept in DATA_DIR/outbox (a services.devmailbox.CaughtMessage)."""

    from_ = fields.String(data_key="from", attribute="mail_from", required=True)
    to = fields.List(fields.String(), attribute="rcpt_tos", required=True)
    subject = fields.String(required=True)
    messageId = fields.String(attribute="message_id", required=True)
    text = fields.String(required=True)
    file = fields.String(required=True)


class DevMailbox(Schema):
    """GET /api/dev/mailbox: the catcher's address, the simulator's domain and its messages,
    oldest first."""

    smtp = fields.Nested(CatcherEndpoint, required=True)
    simulatorDomain = fields.String(required=True)
    messages = fields.List(fields.Nested(CaughtMessage), required=True)
