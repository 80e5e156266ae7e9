"""/api/smtp: the account's SMTP settings and the connection test."""

from __future__ import annotations

from flask import Blueprint
from flask.views import MethodView
from flask_limiter import RateLimitExceeded

from smtp_service.api import answer, documented, json_body, services
from smtp_service.api.request_limits import smtp_test_limit
from smtp_service.auth import current_caller
from smtp_service.schemas import (
    ConnectionTestInput,
    ConnectionTestResponse,
    ErrorResponse,
    MessageResponse,
    OAuthSettingsInput,
    SavedOAuthTestInput,
    SaveSettingsResponse,
    SettingsInput,
    SmtpHealthResponse,
    SmtpSettingsInput,
    SmtpSettingsView,
)
from smtp_service.services.transport import SmtpEndpoint, TransportError

bp = Blueprint("settings", __name__, url_prefix="/api/smtp")

_AUTH_ERRORS = {401: ErrorResponse}
_SETTINGS_INPUT = SettingsInput()  # the password form, or "auth": "oauth2" client credentials
_TEST_INPUT = ConnectionTestInput()
_VIEW = SmtpSettingsView()
_SAVED = SaveSettingsResponse()
_MESSAGE = MessageResponse()
_TESTED = ConnectionTestResponse()
_HEALTH = SmtpHealthResponse()


class SettingsResource(MethodView):
    """GET, POST and DELETE /api/smtp/settings."""

    @documented(
        "The account's SMTP settings, or the global server's",
        responses={200: SmtpSettingsView, **_AUTH_ERRORS},
    )
    def get(self):
        caller = current_caller()
        return answer(_VIEW, services().settings.active(caller.account_id))

    @documented(
        "Save the account's SMTP settings (a password, or Microsoft app-only OAuth2)",
        body=(SmtpSettingsInput, OAuthSettingsInput),
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
        given = json_body(_SETTINGS_INPUT)
        if isinstance(given, SmtpEndpoint):
            saved = services().settings.save(caller.account_id, caller.user_id, given)
        else:  # Microsoft client credentials (OAuthSettingsInput)
            saved = services().oauth.save_app_only(caller.account_id, caller.user_id, given)
        return answer(_SAVED, {"message": "SMTP settings saved successfully", "settings": saved})

    @documented(
        "Remove the account's SMTP settings (fall back to global)",
        responses={200: MessageResponse, **_AUTH_ERRORS},
    )
    def delete(self):
        caller = current_caller()
        services().settings.delete(caller.account_id)
        removed = "SMTP settings removed. System will use global SMTP settings."
        return answer(_MESSAGE, {"message": removed})


@bp.post("/test")
@documented(
    "Test a connection with the given settings (nothing is saved), or the saved OAuth2 "
    "sign-in ({\"auth\": \"oauth2\"})",
    body=(SmtpSettingsInput, OAuthSettingsInput, SavedOAuthTestInput),
    responses={
        200: ConnectionTestResponse,
        400: (ConnectionTestResponse, ErrorResponse),  # the test failed, or the body did
        413: ErrorResponse,
        415: ErrorResponse,
        429: ConnectionTestResponse,  # past SMTP_TEST_RATE_LIMIT for the account
        **_AUTH_ERRORS,
    },
)
def test_connection():
    """POST /api/smtp/test; at most SMTP_TEST_RATE_LIMIT per account (429, Retry-After)."""
    caller = current_caller()
    given = json_body(_TEST_INPUT)
    try:  # counted once the body is valid: a refused body never connects anywhere
        with smtp_test_limit():
            pass
    except RateLimitExceeded as exc:
        return exc.get_response()
    try:
        if isinstance(given, SmtpEndpoint):
            found = services().settings.test(given, caller.account_id)
        elif set(given) == {"auth"}:  # the saved OAuth2 sign-in
            found = services().settings.test_saved_oauth(caller.account_id)
        else:  # unsaved Microsoft client credentials
            found = services().oauth.test_app_only(caller.account_id, given)
    except TransportError as exc:
        failed = {"success": False, "error": f"SMTP connection test failed: {exc.text}"}
        return answer(_TESTED, failed, 400)
    passed = {"success": True, "message": "SMTP connection test successful"}  # the spec's
    if not found.authenticated:  # a relay that trusts the client's address: say so
        passed["message"] += " (the server offers no AUTH: the credentials were not used)"
        passed["authenticated"] = False
    return answer(_TESTED, passed)


@bp.get("/health")
@documented(
    "The health of the account's SMTP transports: circuit, failures, last success, latency",
    responses={200: SmtpHealthResponse, **_AUTH_ERRORS},
)
def smtp_health():
    """GET /api/smtp/health."""
    caller = current_caller()
    return answer(_HEALTH, services().mailer.health(caller.account_id))


bp.add_url_rule("/settings", view_func=SettingsResource.as_view("settings"))
