"""/api/senders and /api/suppressions: who may send, and who will not be sent to."""

from __future__ import annotations

from flask import Blueprint

from smtp_service.api import answer, documented, json_body, services
from smtp_service.auth import current_caller
from smtp_service.schemas import (
    ErrorResponse,
    MessageResponse,
    Sender,
    SenderConfirmInput,
    SenderInput,
    SenderList,
    SuppressionList,
)

bp = Blueprint("senders", __name__, url_prefix="/api")

_SENDER_INPUT = SenderInput()
_CONFIRM_INPUT = SenderConfirmInput()
_SENDER = Sender()
_SENDERS = SenderList()
_SUPPRESSIONS = SuppressionList()
_MESSAGE = MessageResponse()


@bp.get("/senders")
@documented("The account's senders", responses={200: SenderList, 401: ErrorResponse})
def list_senders():
    """GET /api/senders."""
    caller = current_caller()
    return answer(_SENDERS, {"senders": services().senders.list(caller.account_id)})


@bp.post("/senders")
@documented(
    "Add a sender (pending, and a confirmation code sent to it, unless verification is manual)",
    body=SenderInput,
    responses={
        201: Sender,
        400: ErrorResponse,
        401: ErrorResponse,
        409: ErrorResponse,
        415: ErrorResponse,
        502: ErrorResponse,
    },
)
def add_sender():
    """POST /api/senders."""
    caller = current_caller()
    data = json_body(_SENDER_INPUT)
    sender = services().senders.add(caller.account_id, data["email"], data["name"])
    return answer(_SENDER, sender, 201)


@bp.post("/senders/<path:email>/confirm")
@documented(
    "Confirm a pending sender with the code sent to it",
    body=SenderConfirmInput,
    responses={200: Sender, 400: ErrorResponse, 401: ErrorResponse, 404: ErrorResponse},
)
def confirm_sender(email: str):
    """POST /api/senders/<email>/confirm."""
    caller = current_caller()
    data = json_body(_CONFIRM_INPUT)
    sender = services().senders.confirm(caller.account_id, email, data["code"])
    return answer(_SENDER, sender)


@bp.delete("/senders/<path:email>")
@documented(
    "Remove a verified sender",
    responses={200: MessageResponse, 401: ErrorResponse, 404: ErrorResponse},
)
def remove_sender(email: str):
    """DELETE /api/senders/<email>."""
    caller = current_caller()
    services().senders.remove(caller.account_id, email)
    return answer(_MESSAGE, {"message": f"Sender {email} removed"})


@bp.get("/suppressions")
@documented(
    "Addresses that hard-bounced and will not be sent to",
    responses={200: SuppressionList, 401: ErrorResponse},
)
def list_suppressions():
    """GET /api/suppressions."""
    caller = current_caller()
    suppressions = services().records.suppressions(caller.account_id)
    return answer(_SUPPRESSIONS, {"suppressions": suppressions})


@bp.delete("/suppressions/<path:email>")
@documented(
    "Allow sending to a suppressed address again",
    responses={200: MessageResponse, 401: ErrorResponse, 404: ErrorResponse},
)
def remove_suppression(email: str):
    """DELETE /api/suppressions/<email>."""
    caller = current_caller()
    services().records.unsuppress(caller.account_id, email)
    return answer(_MESSAGE, {"message": f"{email} removed from the suppression list"})
