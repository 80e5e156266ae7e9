"""/t/open/<token>.gif: the open-tracking pixel; no auth, always a GIF."""

from __future__ import annotations

import base64

from flask import Blueprint, Flask, Response, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from smtp_service.api import documented, services
from smtp_service.schemas import ErrorResponse

bp = Blueprint("tracking", __name__)

PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")


@bp.get("/t/open/<string:token>.gif")
@documented(
    "Open-tracking pixel (1x1 GIF); rate-limited per client address (TRACKING_RATE_LIMIT)",
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


def limit_opens(app: Flask) -> None:
    """Rate-limit the pixel per client address (flask-limiter, in-memory per worker): an
    unauthenticated route that writes must not let one client drive the database."""
    limiter = Limiter(get_remote_address, app=app, storage_uri="memory://")
    endpoint = f"{bp.name}.{open_pixel.__name__}"
    # the limit is checked by the wrapper the decorator returns: it replaces the view
    app.view_functions[endpoint] = limiter.limit(app.config["TRACKING_RATE_LIMIT"])(open_pixel)
    app.extensions["tracking_limiter"] = limiter
    # init_app also checks every request of the app before it runs, to apply default limits
    # (there are none): on the send path that cost about 0.3 ms a request. The pixel's limit is
    # checked by the wrapper above, so the app-wide check goes.
    app.before_request_funcs[None].remove(limiter._check_request_limit)
