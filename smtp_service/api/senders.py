"""/api/senders and /api/suppressions: who may send, and who will not be sent to."""

from __future__ import annotations

from flask import Blueprint, jsonify

from smtp_service.api import documented, json_body, services
from smtp_service.auth import current_caller
from smtp_service.errors import NotFound, shown
from smtp_service.schemas import (
    MAX_MAILBOX_LENGTH,
    ErrorResponse,
    MessageResponse,
    Sender,
    SenderInput,
    SenderList,
    SuppressionList,
)

bp = Blueprint("senders", __name__, url_prefix="/api")


@bp.get("/senders")
@documented("The account's verified senders", responses={200: SenderList, 401: ErrorResponse})
def list_senders():
    """GET /api/senders."""
    caller = current_caller()
    return jsonify({"senders": services().senders.list(caller.account_id)})


@bp.post("/senders")
@documented(
    "Add a verified sender",
    body=SenderInput,
    responses={
        201: Sender,
        400: ErrorResponse,
        401: ErrorResponse,
        409: ErrorResponse,
        415: ErrorResponse,
    },
)
def add_sender():
    """POST /api/senders."""
    caller = current_caller()
    data = json_body(SenderInput())
    return jsonify(services().senders.add(caller.account_id, data["email"], data["name"])), 201


@bp.delete("/senders/<path:email>")
@documented(
    "Remove a verified sender",
    responses={200: MessageResponse, 401: ErrorResponse, 404: ErrorResponse},
)
def remove_sender(email: str):
    """DELETE /api/senders/<email>."""
    caller = current_caller()
    if len(email) > MAX_MAILBOX_LENGTH:  # never added (POST refuses it), and not echoed back
        raise NotFound(f"Sender {shown(email, 100)} not found")
    services().senders.remove(caller.account_id, email)
    return jsonify({"message": f"Sender {email} removed"})


@bp.get("/suppressions")
@documented(
    "Addresses that hard-bounced and will not be sent to",
    responses={200: SuppressionList, 401: ErrorResponse},
)
def list_suppressions():
    """GET /api/suppressions."""
    caller = current_caller()
    return jsonify({"suppressions": services().suppressions.list(caller.account_id)})


@bp.delete("/suppressions/<path:email>")
@documented(
    "Allow sending to a suppressed address again",
    responses={200: MessageResponse, 401: ErrorResponse, 404: ErrorResponse},
)
def remove_suppression(email: str):
    """DELETE /api/suppressions/<email>."""
    caller = current_caller()
    if len(email) > MAX_MAILBOX_LENGTH or not services().suppressions.unsuppress(
        caller.account_id, email
    ):
        raise NotFound(f"{shown(email, 100)} is not suppressed")
    return jsonify({"message": f"{email} removed from the suppression list"})

