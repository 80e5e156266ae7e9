"""What operators see of each request and each send: a log line and metrics.

- Every request gets a request id: the caller's `X-Request-ID` when it is 1-128 characters of
  [A-Za-z0-9._:/+=@-], else a new one (32 hex digits); it is answered in `X-Request-ID`.
- One log line per request (logger "smtp_service.requests", INFO): method, path (never the
  query string), status, duration_ms, account (when a token was verified), request_id, pid.
- One log line per send of POST /api/messages/send-email (logger "smtp_service.sends", INFO):
  account, message_id, transport, outcome, smtp_code, duration_ms (the SMTP part), category,
  request_id; `replayed: true` for an idempotent replay (nothing was sent).
- Metrics (smtp_service.metrics): every request by method, URL rule and status; 429s by URL
  rule; sends by transport and outcome, refused recipients by type and category, SMTP time.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable
from typing import Any

from flask import Flask, Response, current_app, g, request

from smtp_service import metrics

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")

request_log = logging.getLogger("smtp_service.requests")
send_log = logging.getLogger("smtp_service.sends")


def request_id_from(header: str | None) -> str:
    """The caller's request id when it is safe to log and echo, else a new random one."""
    if header is not None and _REQUEST_ID.fullmatch(header):
        return header
    return os.urandom(16).hex()


def current_request_id() -> str | None:
    """This request's id (None outside a request handled by an app with init_app)."""
    return g.get("request_id")


def init_app(app: Flask) -> None:
    """Give every request of `app` an id, a log line and its metrics."""
    app.before_request_funcs.setdefault(None, []).insert(0, _start)
    app.after_request(_finish)


def _start() -> None:
    g.request_started = time.perf_counter()
    g.request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))


def _finish(response: Response) -> Response:
    request_id = g.get("request_id") or request_id_from(None)
    response.headers[REQUEST_ID_HEADER] = request_id
    rule = request.url_rule
    route = rule.rule if rule is not None else None
    status = response.status_code
    metrics.count_request(request.method, route, status)
    if request_log.isEnabledFor(logging.INFO):
        started = g.get("request_started")
        duration = (time.perf_counter() - started) * 1000 if started is not None else 0.0
        path = _printable(request.path)
        request_log.info(
            "%s %s %s",
            request.method,
            path,
            status,
            extra={
                "method": request.method,
                "path": path,
                "route": route,
                "status": status,
                "duration_ms": round(duration, 2),
                "account": _account(),
                "request_id": request_id,
                "pid": os.getpid(),
            },
        )
    return response


def _account() -> str | None:
    """The account of the token verified during this request, if any (never the token)."""
    claims = g.get("_jwt_extended_jwt")  # where flask-jwt-extended keeps the verified claims
    if not isinstance(claims, dict):
        return None
    account = claims.get(current_app.config["JWT_ACCOUNT_CLAIM"])
    return account if isinstance(account, str) else None


def _printable(text: str) -> str:
    """`text` with control characters escaped, so that a path cannot forge a log line."""
    if text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")


def record_send(
    account_id: str, result: Any, attempts: Iterable[tuple[float, int | None]]
) -> None:
    """Log and count one send's SendResult. `attempts` are the SMTP sends it made, as
    (seconds, reply code or None) from metrics.noting_smtp(); none means an idempotent replay
    (counted nowhere, logged with replayed=true)."""
    attempts = list(attempts)
    seconds = sum(s for s, _code in attempts) if attempts else None
    if attempts:
        refusals = [(r.type, r.category) for r in result.rejected]
        metrics.count_send(result.transport, result.outcome, seconds, refusals)
    if not send_log.isEnabledFor(logging.INFO):
        return
    code = attempts[-1][1] if attempts else None
    if code is None and result.bounce is not None:
        code = result.bounce.code
    send_log.info(
        "send %s %s via %s",
        result.message_id,
        result.outcome,
        result.transport,
        extra={
            "account": account_id,
            "message_id": result.message_id,
            "transport": result.transport,
            "outcome": result.outcome,
            "smtp_code": code,
            "category": result.category,
            "uncertain": result.uncertain,
            "duration_ms": None if seconds is None else round(seconds * 1000, 2),
            "replayed": not attempts,
            "request_id": current_request_id(),
        },
    )
