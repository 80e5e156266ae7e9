"""/api/messages: send an email, read a message's record, list messages, their stats."""

from __future__ import annotations

from flask import Blueprint, request

from smtp_service.api import answer, documented, json_body, query_args, services
from smtp_service.auth import current_caller
from smtp_service.errors import ApiError
from smtp_service.metrics import noting_smtp
from smtp_service.schemas import (
    ErrorResponse,
    MessageList,
    MessageListQuery,
    MessageRecord,
    MessageStatsQuery,
    MessageStatsResponse,
    SendEmailInput,
    SendEmailResponse,
    SendFailedResponse,
)
from smtp_service.telemetry import record_send

bp = Blueprint("messages", __name__, url_prefix="/api/messages")

_MAX_KEY_LENGTH = 255
_SEND_INPUT = SendEmailInput()  # schemas hold no per-load state; building one costs ~0.5 ms
_SENT = SendEmailResponse()
_NOT_SENT = SendFailedResponse()
_RECORD = MessageRecord()
_LIST_QUERY = MessageListQuery()
_LIST = MessageList()
_STATS_QUERY = MessageStatsQuery()
_STATS = MessageStatsResponse()


@bp.post("/send-email")
@documented(
    "Send an email through the account's SMTP server (or the global one)",
    body=SendEmailInput,
    responses={
        200: SendEmailResponse,
        400: ErrorResponse,
        401: ErrorResponse,
        403: ErrorResponse,
        409: ErrorResponse,
        413: ErrorResponse,
        415: ErrorResponse,
        422: ErrorResponse,
        429: ErrorResponse,
        502: SendFailedResponse,
        503: ErrorResponse,
    },
    headers={"Idempotency-Key": {"type": "string", "minLength": 1, "maxLength": _MAX_KEY_LENGTH}},
)
def send_email():
    """POST /api/messages/send-email; honours an Idempotency-Key header."""
    caller = current_caller()
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= _MAX_KEY_LENGTH and key.isprintable()):
        raise ApiError("Idempotency-Key must be 1-255 printable characters", 400)
    send_request = json_body(_SEND_INPUT)
    with noting_smtp() as attempts:
        result = services().mailer.send(caller.account_id, send_request, key)
    record_send(caller.account_id, result, attempts)
    if result.sent:
        return answer(_SENT, result)
    return answer(_NOT_SENT, result, 502)


@bp.get("")
@documented(
    "The account's messages, newest first, a page at a time (pass nextCursor as cursor)",
    query=MessageListQuery,
    responses={200: MessageList, 400: ErrorResponse, 401: ErrorResponse},
)
def list_messages():
    """GET /api/messages?status=&to=&from=&limit=&cursor= (the account's own messages)."""
    caller = current_caller()
    return answer(_LIST, services().analytics.page(caller.account_id, **query_args(_LIST_QUERY)))


@bp.get("/stats")
@documented(
    "Counts, open rate and send latency of the account's messages, per interval and in total",
    query=MessageStatsQuery,
    responses={200: MessageStatsResponse, 400: ErrorResponse, 401: ErrorResponse},
)
def message_stats():
    """GET /api/messages/stats?from=&to=&interval=hour|day (the account's own messages)."""
    caller = current_caller()
    return answer(_STATS, services().analytics.stats(caller.account_id, **query_args(_STATS_QUERY)))


@bp.get("/<path:message_id>")
@documented(
    "A sent message's record: status, recipients, opens, events",
    responses={200: MessageRecord, 401: ErrorResponse, 404: ErrorResponse},
)
def get_message(message_id: str):
    """GET /api/messages/<messageId> (the account's own messages only)."""
    caller = current_caller()
    return answer(_RECORD, services().records.get(caller.account_id, message_id))
