"""WSGI entry point for gunicorn: `gunicorn wsgi:app`."""

from smtp_service import ConfigError, create_app

try:
    app = create_app()
except ConfigError as exc:  # one line, no traceback: what to fix is all the reader needs
    raise SystemExit(f"smtp-service: configuration error: {exc}") from None
