"""Request limits on the routes a caller can abuse, with flask-limiter: the open pixel per client
address (TRACKING_RATE_LIMIT) and the connection test per account (SMTP_TEST_RATE_LIMIT).

Counts live in RATELIMIT_STORAGE_URI: memory:// (the default) counts per worker; redis://
counts once for every worker and instance. Past a limit the answer is 429 with Retry-After.
(Sending is limited per account by the service layer in the message database, exactly:
services/send_rate.py.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from flask_jwt_extended import get_jwt
from flask_limiter import Limiter, RequestLimit
from flask_limiter.util import get_remote_address

_LIMITER = "request_limiter"
_TEST_LIMIT = "smtp_test_limit"


def init_request_limits(app: Flask) -> None:
    """One flask-limiter for the app on RATELIMIT_STORAGE_URI (keys under
    RATELIMIT_KEY_PREFIX), the pixel's limit on its view and the connection test's ready for
    `smtp_test_limit()`.

    Storage errors (Redis unreachable) are logged and the request goes through unlimited:
    a limit must not take the routes down with it.
    """
    from smtp_service.api.tracking import bp as tracking_bp
    from smtp_service.api.tracking import open_pixel

    limiter = Limiter(
        get_remote_address,
        app=app,
        storage_uri=app.config["RATELIMIT_STORAGE_URI"],
        key_prefix=app.config["RATELIMIT_KEY_PREFIX"],
        swallow_errors=True,
    )
    # init_app also checks every request of the app before it runs, to apply default limits
    # (there are none): on the send path that cost about 0.3 ms a request. Each limit below is
    # checked by its own route, so the app-wide check goes.
    app.before_request_funcs[None].remove(limiter._check_request_limit)
    app.extensions[_LIMITER] = limiter

    # The pixel: per client address; the wrapper the decorator returns replaces the view.
    endpoint = f"{tracking_bp.name}.{open_pixel.__name__}"
    pixel_limit = limiter.limit(app.config["TRACKING_RATE_LIMIT"], on_breach=_too_many)
    app.view_functions[endpoint] = pixel_limit(open_pixel)

    # The connection test: per account, checked by the view once the token and the body are
    # valid (a 401, 400 or 415 opens no connection and counts nothing).
    app.extensions[_TEST_LIMIT] = limiter.limit(
        app.config["SMTP_TEST_RATE_LIMIT"], key_func=_account, on_breach=_test_refused
    )

    # init_app also adds an after-request hook (headers, conditional deductions) and a teardown
    # that resets the limiter's per-request context: about 75 us a request on the send path.
    # Only the two limited routes need them.
    _only_for_limited(app, limiter, {endpoint, "settings.test_connection"})


def _only_for_limited(app: Flask, limiter: Limiter, endpoints: set[str]) -> None:
    """Run the limiter's after-request and teardown hooks for `endpoints` only."""

    def owned(func: Any) -> bool:
        if isinstance(func, partial):
            return bool(func.args) and func.args[0] is limiter
        return getattr(func, "__self__", None) is limiter

    def after(func: Callable[[Response], Response]) -> Callable[[Response], Response]:
        def hook(response: Response) -> Response:
            return func(response) if request.endpoint in endpoints else response

        return hook

    def teardown(func: Callable[[BaseException | None], None]) -> Callable[..., None]:
        def hook(exc: BaseException | None = None) -> None:
            if request.endpoint in endpoints:
                func(exc)

        return hook

    for registry, wrap in (
        (app.after_request_funcs[None], after),
        (app.teardown_request_funcs[None], teardown),
    ):
        registry[:] = [wrap(f) if owned(f) else f for f in registry]


def smtp_test_limit():
    """The connection test's limit, as a context manager: counts one test of the caller's
    account and raises flask-limiter's RateLimitExceeded past SMTP_TEST_RATE_LIMIT, its
    `get_response()` the endpoint's own 429 ({"success": false, "error"}, Retry-After)."""
    return current_app.extensions[_TEST_LIMIT]


def _account() -> str:
    # Called only after current_caller() verified the token.
    return get_jwt()[current_app.config["JWT_ACCOUNT_CLAIM"]]


def _retry_after(limit: RequestLimit) -> str:
    """Whole seconds until the window frees (at least 1), RFC 9110 10.2.3. (RequestLimit's
    reset_at adds a second to the window's end; its window is the end itself.)"""
    return str(max(1, math.ceil(limit.window.reset_time - time.time())))


def _too_many(limit: RequestLimit) -> Response:
    response = jsonify({"error": "Too many requests"})
    response.status_code = 429
    response.headers["Retry-After"] = _retry_after(limit)
    return response


def _test_refused(limit: RequestLimit) -> Response:
    retry_after = _retry_after(limit)
    response = jsonify(
        {
            "success": False,
            "error": f"Too many connection tests: at most {limit.limit} for this account; "
            f"retry after {retry_after} s",
        }
    )
    response.status_code = 429
    response.headers["Retry-After"] = retry_after
    return response
