"""/api/smtp/oauth: OAuth2 (XOAUTH2) sign-in of an account's mailbox with its provider."""

from __future__ import annotations

from flask import Blueprint, request

from smtp_service.api import answer, documented, json_body, services
from smtp_service.auth import current_caller
from smtp_service.schemas import (
    ErrorResponse,
    OAuthStartInput,
    OAuthStartResponse,
    SaveSettingsResponse,
)
from smtp_service.services.errors import InvalidInput
from smtp_service.services.oauth import SignInRequest

bp = Blueprint("oauth", __name__, url_prefix="/api/smtp/oauth")

_START = OAuthStartInput()
_STARTED = OAuthStartResponse()
_SAVED = SaveSettingsResponse()
_MAX_PARAMETER = 4096  # characters of code or state taken from the query


@bp.post("/start")
@documented(
    "Begin an OAuth2 sign-in (authorization code with PKCE): the provider's URL to send the "
    "user to",
    body=OAuthStartInput,
    responses={200: OAuthStartResponse, 400: ErrorResponse, 503: ErrorResponse},
)
def start():
    """POST /api/smtp/oauth/start."""
    caller = current_caller()
    fields = json_body(_START)
    url = services().oauth.start(
        caller.account_id,
        caller.user_id,
        SignInRequest(
            provider=fields["provider"],
            user=fields["user"],
            host=fields["host"],
            port=fields["port"],
            secure=fields["secure"],
            require_tls=fields["requireTls"],
        ),
    )
    return answer(
        _STARTED, {"authorizationUrl": url, "expiresIn": services().oauth.state_seconds}
    )


@bp.get("/callback")
@documented(
    "Where the provider returns the user (no bearer token: the signed state names the "
    "account): exchanges the code and saves the settings",
    responses={200: SaveSettingsResponse, 400: ErrorResponse, 502: ErrorResponse},
    auth=False,
)
def callback():
    """GET /api/smtp/oauth/callback?code=&state= (or ?error=&state= when the user declined)."""
    state = request.args.get("state", "")
    code = request.args.get("code") or None
    error = request.args.get("error") or None
    if not state or len(state) > _MAX_PARAMETER:
        raise InvalidInput.field("state", "The provider's redirect carries no valid state.")
    if code is not None and len(code) > _MAX_PARAMETER:
        raise InvalidInput.field("code", "Too long.")
    _account, saved = services().oauth.callback(state, code, error)
    return answer(
        _SAVED, {"message": "OAuth2 sign-in complete: SMTP settings saved", "settings": saved}
    )
