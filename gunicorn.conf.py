"""gunicorn settings for smtp-service (`gunicorn -c gunicorn.conf.py wsgi:app`)."""

import glob
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
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


def _metrics_folder() -> tuple[str, bool]:
    """A fresh folder for prometheus-client's multiprocess files (every worker writes its
    values there; a scrape adds them up), set in PROMETHEUS_MULTIPROC_DIR before any worker
    starts. Returns it and whether it is ours to remove at exit. An operator's folder is
    emptied of the last run's files instead."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    if folder and folder == os.environ.get("SMTP_SERVICE_METRICS_DIR"):
        return folder, True  # this file read again (a reload): the workers' files stay
    if folder:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        for stale in glob.glob(os.path.join(folder, "*.db")):
            os.remove(stale)
        return folder, False
    folder = tempfile.mkdtemp(prefix="smtp-service-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ["SMTP_SERVICE_METRICS_DIR"] = folder
    return folder, True


# Before anything imports prometheus-client (the configuration check imports the package): it
# chooses its multiprocess value store at import, and the workers inherit that choice.
_metrics_dir, _own_metrics_dir = _metrics_folder()
try:
    _check_configuration()
except SystemExit:  # no worker will start, and on_exit will not run: the folder goes now
    if _own_metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
    raise

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
# The service logs one line per request itself (smtp_service.telemetry: method, path, status,
# duration, account, request id, pid, as JSON or text per LOG_FORMAT), so gunicorn's access log
# is off: it would write every request twice. GUNICORN_ACCESS_LOG=- turns it back on.
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "").strip() or None
# If it is on, it must never hold a token: the request line without the query string.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(L)ss pid=%(p)s'

_catcher = None


def _gunicorn_logs_like_the_service(server) -> None:
    """gunicorn's own messages (worker starts, timeouts) in the service's format (LOG_FORMAT)
    and through the same filter that redacts secrets. Its access log, when GUNICORN_ACCESS_LOG
    turns it on, keeps its own format (access_log_format, which holds no header and no query
    string): a JSON formatter and the filter on it cost about 0.1 ms a request."""
    from smtp_service.logs import RedactSecrets, chosen_format, json_formatter

    log_format = chosen_format(os.environ.get("LOG_FORMAT", "").strip().lower() or "auto")
    for handler in logging.getLogger("gunicorn.error").handlers:
        if log_format == "json":
            handler.setFormatter(json_formatter())
        handler.addFilter(RedactSecrets())


def on_starting(server):
    """gunicorn's own log lines like the service's. With no SMTP_HOST, start the development mail
    catcher, point the global server at it and name it in DEV_MAIL_CATCHER, which the workers
    inherit: while it is set, accounts may use the catcher as their own server (its address and
    port only) and /api/dev/mailbox lists what it received (README, "Mailbox simulator")."""
    global _catcher
    _gunicorn_logs_like_the_service(server)
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
    """Stop the development mail catcher with the arbiter; remove the metrics folder we made."""
    if _catcher is not None:
        _catcher.terminate()
        _catcher.wait(timeout=10)
    if _own_metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)


def child_exit(server, worker):
    """A worker is gone: its gauges stop counting (prometheus-client's live* modes); its
    counters stay in the folder, so totals do not drop when a worker is replaced."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker):
    """Close the worker's pooled SMTP connections with QUIT before it goes."""
    services = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("smtp_service")
    pool = getattr(services, "pool", None)
    if pool is not None:
        pool.close_all()
