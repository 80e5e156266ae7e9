"""gunicorn settings for smtp-service (`gunicorn -c gunicorn.conf.py wsgi:app`)."""

import os
import socket
import subprocess
import sys
import time

from dotenv import load_dotenv

load_dotenv()


def _check_configuration() -> None:
    """Refuse to start, with a one-line reason, before any worker is forked."""
    from smtp_service.config import ConfigError, load_config

    try:
        load_config()
    except ConfigError as exc:
        sys.exit(f"smtp-service: configuration error: {exc}")


_check_configuration()

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
timeout = 60
graceful_timeout = 15
# gunicorn's control socket defaults to one fixed path in the home folder
# ($HOME/.gunicorn/gunicorn.ctl): a second instance on the same host takes it over and removes it
# when it exits. The service does not use it, so it is off unless GUNICORN_CONTROL_SOCKET names a
# path of this instance's own.
control_socket = os.environ.get("GUNICORN_CONTROL_SOCKET", "").strip() or None
control_socket_disable = control_socket is None
if control_socket is None:
    del control_socket
accesslog = "-"
# The access log must never hold a token: log the request line without the query string.
# pid=%(p)s names the worker that answered (tests use it to prove every worker was exercised).
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(L)ss pid=%(p)s'

_catcher = None


def on_starting(server):
    """With no SMTP_HOST, start the development mail catcher, point the global server at it and
    name it in DEV_MAIL_CATCHER, which the workers inherit: while it is set, accounts may use the
    catcher as their own server (its address and port only) and /api/dev/mailbox lists what it
    received (README, "Mailbox simulator")."""
    global _catcher
    if os.environ.get("SMTP_HOST"):
        return
    port = os.environ.get("DEV_SMTP_PORT", "").strip() or "1025"
    _catcher = subprocess.Popen(
        [sys.executable, "-m", "smtp_service.devmail", "--port", port],
    )
    _wait_for_port(int(port), _catcher)
    os.environ.update(
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=port,
        SMTP_SECURE="false",
        SMTP_REQUIRE_TLS="false",
        SMTP_USER="",
        SMTP_PASS="",
        DEV_MAIL_CATCHER=f"127.0.0.1:{port}",
    )
    if not os.environ.get("SMTP_FROM"):  # .env.example leaves it empty
        os.environ["SMTP_FROM"] = "dev@example.com"
    server.log.info("SMTP_HOST not set: development mail catcher on 127.0.0.1:%s", port)


def _wait_for_port(port: int, process: subprocess.Popen, seconds: float = 15.0) -> None:
    """Until the catcher accepts connections (a loaded machine can take seconds to start it),
    so that the first send does not find the port closed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    sys.exit(f"smtp-service: the development mail catcher did not start on port {port}")


def on_exit(server):
    """Stop the development mail catcher with the arbiter."""
    if _catcher is not None:
        _catcher.terminate()
        _catcher.wait(timeout=10)


def worker_exit(server, worker):
    """Close the worker's pooled SMTP connections with QUIT before it goes."""
    services = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("smtp_service")
    pool = getattr(services, "pool", None)
    if pool is not None:
        pool.close_all()
