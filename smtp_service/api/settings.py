"""/api/smtp: the account's SMTP settings and the connection test."""

from __future__ import annotations

from flask import Blueprint, jsonify
from flask.views import MethodView

from smtp_service.api import documented, json_body, services
from smtp_service.auth import current_caller
from smtp_service.schemas import (
    ConnectionTestResponse,
    ErrorResponse,
    MessageResponse,
    SaveSettingsResponse,
    SmtpSettingsInput,
    SmtpSettingsView,
)
from smtp_service.services.transport import TransportError

bp = Blueprint("settings", __name__, url_prefix="/api/smtp")

_AUTH_ERRORS = {401: ErrorResponse}


class SettingsResource(MethodView):
    """GET, POST and DELETE /api/smtp/settings."""

    @documented(
        "The account's SMTP settings, or the global server's",
        responses={200: SmtpSettingsView, **_AUTH_ERRORS},
    )
    def get(self):
        caller = current_caller()
        return jsonify(services().settings.view(caller.account_id))

    @documented(
        "Save the account's SMTP settings",
        body=SmtpSettingsInput,
        responses={
            200: SaveSettingsResponse,
            400: ErrorResponse,
            413: ErrorResponse,
            415: ErrorResponse,
            **_AUTH_ERRORS,
        },
    )
    def post(self):
        caller = current_caller()
        data = json_body(SmtpSettingsInput())
        saved = services().settings.save(caller.account_id, caller.user_id, data)
        return jsonify({"message": "SMTP settings saved successfully", "settings": saved})

    @documented(
        "Remove the account's SMTP settings (fall back to global)",
        responses={200: MessageResponse, **_AUTH_ERRORS},
    )
    def delete(self):
        caller = current_caller()
        services().settings.delete(caller.account_id)
        return jsonify({"message": "SMTP settings removed. System will use global SMTP settings."})


@bp.post("/test")
@documented(
    "Test a connection with the given settings (nothing is saved)",
    body=SmtpSettingsInput,
    responses={
        200: ConnectionTestResponse,
        400: (ConnectionTestResponse, ErrorResponse),  # the test failed, or the body did
        413: ErrorResponse,
        415: ErrorResponse,
        **_AUTH_ERRORS,
    },
)
def test_connection():
    """POST /api/smtp/test."""
    current_caller()
    data = json_body(SmtpSettingsInput())
    try:
        services().settings.test(data)
    except TransportError as exc:
        return jsonify({"success": False, "error": f"SMTP connection test failed: {exc.text}"}), 400
    return jsonify({"success": True, "message": "SMTP connection test successful"})


bp.add_url_rule("/settings", view_func=SettingsResource.as_view("settings"))
