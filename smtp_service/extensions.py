"""Flask extensions, created unbound; the app factory binds them (init_app)."""

from __future__ import annotations

from smtp_service.tokens import CachingJWTManager

jwt = CachingJWTManager()
