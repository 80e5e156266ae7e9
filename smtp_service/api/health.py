"""/healthz: liveness and a writable data folder; no auth."""

from __future__ import annotations

from flask import Blueprint

from smtp_service.api import answer, documented, services
from smtp_service.schemas import HealthResponse

bp = Blueprint("health", __name__)
_HEALTH = HealthResponse()


@bp.get("/healthz")
@documented("Service health", responses={200: HealthResponse, 503: HealthResponse}, auth=False)
def healthz():
    """200 when the data folder is writable, else 503."""
    if services().data_dir_writable():
        return answer(_HEALTH, {"status": "ok"})
    return answer(_HEALTH, {"status": "error", "error": "data folder is not writable"}, 503)
