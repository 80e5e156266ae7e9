"""For operators: /readyz, /metrics, and the API documentation page at /api/docs/.

- GET /readyz: 200 when the data folder is writable, the database answers SELECT 1 and the
  global SMTP server takes a connection (EHLO, QUIT; cached a few seconds), else 503 naming
  what is not. No auth.
- GET /metrics: the Prometheus text exposition, to loopback callers and the networks of
  METRICS_ALLOW_CIDRS; 404, as for a route that does not exist, to anyone else. The caller is
  REMOTE_ADDR: X-Forwarded-For is not read (behind a proxy, Werkzeug's ProxyFix decides).
- GET /api/docs/: Swagger UI (flask-swagger-ui, which ships its files: nothing is fetched from
  elsewhere) on /api/openapi.json.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from flask import Blueprint, Flask, Response, current_app, request
from flask_swagger_ui import get_swaggerui_blueprint
from werkzeug.exceptions import NotFound

from smtp_service import metrics
from smtp_service.api import answer, documented, services
from smtp_service.schemas import ReadyResponse

bp = Blueprint("operations", __name__)
_READY = ReadyResponse()

DOCS_URL = "/api/docs"
OPENAPI_URL = "/api/openapi.json"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@bp.get("/readyz")
@documented(
    "Readiness: data folder, database and global SMTP server",
    responses={200: ReadyResponse, 503: ReadyResponse},
    auth=False,
)
def readyz():
    """200 when every check passes, else 503 with the failing ones named."""
    report = services().readiness.report()
    failing = report.failing
    body = {"status": "ready" if not failing else "not ready", "checks": report.checks,
            "failing": failing}
    return answer(_READY, body, 200 if not failing else 503)


@bp.get("/metrics")
def metrics_endpoint():
    """The metrics of every worker, for allowed callers only (404 otherwise)."""
    if not metrics_allowed(request.remote_addr, current_app.extensions["metrics_networks"]):
        raise NotFound()
    return Response(metrics.render(), mimetype=None, content_type=metrics.CONTENT_TYPE_LATEST)


def allowed_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """METRICS_ALLOW_CIDRS (already validated by config) as networks."""
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def metrics_allowed(address: str | None, networks: Iterable[Network]) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1, and IPv4-mapped loopback) or one inside
    `networks`; False for anything else, including no address or one that does not parse."""
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return True
    return any(ip.version == net.version and ip in net for net in networks)


def register(app: Flask) -> None:
    """Mount /readyz, /metrics and the documentation page."""
    app.extensions["metrics_networks"] = allowed_networks(app.config["METRICS_ALLOW_CIDRS"])
    app.register_blueprint(bp)
    app.register_blueprint(
        get_swaggerui_blueprint(
            DOCS_URL,
            OPENAPI_URL,
            config={
                "app_name": "smtp-service API",
                # Swagger UI would otherwise send the document to validator.swagger.io
                "validatorUrl": None,
                "layout": "BaseLayout",
                "oauth2RedirectUrl": f"{DOCS_URL}/oauth2-redirect.html",
            },
            blueprint_name="api_docs",
        )
    )
