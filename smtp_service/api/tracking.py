"""/t/open/<token>.gif: the open-tracking pixel; no auth, always a GIF."""

from __future__ import annotations

import base64

from flask import Blueprint, Response, request

from smtp_service.api import documented, services
from smtp_service.schemas import ErrorResponse

bp = Blueprint("tracking", __name__)

PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")


@bp.get("/t/open/<string:token>.gif")
@documented(
    "Open-tracking pixel (1x1 GIF); rate-limited per client address (TRACKING_RATE_LIMIT; "
    "429 with Retry-After past it)",
    responses={200: "image/gif", 429: ErrorResponse},
    auth=False,
)
def open_pixel(token: str):
    """Record an open for a valid token; answer the same GIF to everyone."""
    client = f"{request.remote_addr or ''} {request.user_agent.string}"
    services().mailer.record_open(token, client)
    return Response(
        PIXEL,
        mimetype="image/gif",
        headers={
            "Cache-Control": "no-store, no-cache, must-revalidate, max-age=0",
            "Pragma": "no-cache",
            "Expires": "0",
        },
    )

