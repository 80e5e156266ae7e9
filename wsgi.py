"""WSGI entry point for gunicorn: `gunicorn wsgi:app`."""

from smtp_service import create_app

app = create_app()
