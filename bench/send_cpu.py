"""CPU per send, in process and by stage: where the time of one send-email request goes.

Runs the app in this process (Flask's test client, no gunicorn, one thread) against the benchmark
SMTP server (bench/smtp_sink.py: STARTTLS + AUTH, its own process, so its CPU is not counted),
sends N messages through POST /api/messages/send-email with one pooled connection, and prints
the process CPU per request and the part of it spent in each stage.

    .venv/bin/python bench/send_cpu.py [--requests 3000]
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from send_throughput import PASSWORD, SECRET, USER, start_sink, token  # noqa: E402

from smtp_service.services.crypto import new_key  # noqa: E402

spent: collections.Counter[str] = collections.Counter()


def timed(owner: Any, name: str, label: str) -> None:
    """Count the CPU time of owner.name under label."""
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] += time.process_time() - started

    setattr(owner, name, wrapper)


def main() -> None:
    """Start the sink, run the requests, print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        sink, port, ca_file = start_sink("aiosmtpd", workdir)
        try:
            run(args.requests, port, ca_file, workdir)
        finally:
            sink.terminate()
            sink.communicate(timeout=30)


def run(requests: int, port: int, ca_file: str, workdir: str) -> None:
    """The measured part."""
    os.environ["SSL_CERT_FILE"] = ca_file
    from smtp_service import auth, create_app
    from smtp_service.api import messages as messages_view
    from smtp_service.services import mailer, pool
    from smtp_service.storage import messages as message_log
    from smtp_service.storage import suppressions as suppression_list

    app = create_app(
        {
            "JWT_SECRET_KEY": SECRET,
            "DATA_DIR": os.path.join(workdir, "data"),
            "SMTP_ENCRYPTION_KEYS": new_key(),
            "SMTP_HOST_ALLOWLIST": "127.0.0.1/32,localhost",
            "LOG_LEVEL": "WARNING",
        }
    )
    client = app.test_client()
    headers = {"Authorization": f"Bearer {token('bench-account')}"}
    settings = {"host": "localhost", "port": port, "user": USER, "pass": PASSWORD}
    assert client.post("/api/smtp/settings", json=settings, headers=headers).status_code == 200
    body = {"from": USER, "to": "rcpt@example.net", "subject": "bench", "text": "hello"}
    for _ in range(100):  # warm-up: imports, the pooled connection, caches
        assert (
            client.post("/api/messages/send-email", json=body, headers=headers).status_code == 200
        )
    for owner, name, label in [
        (auth, "verify_jwt_in_request", "JWT verification"),
        (messages_view, "json_body", "JSON + marshmallow"),
        (mailer, "parse_mailbox", "address checks"),
        (mailer, "parse_address_list", "address checks"),
        (mailer.Mailer, "route", "settings + route"),
        (mailer, "build_message", "MIME build"),
        (pool.TransportPool, "send", "SMTP (smtplib, TLS)"),
        (message_log.MessageLog, "record", "database: log + suppressions"),
        (suppression_list.SuppressionList, "suppressed", "database: log + suppressions"),
    ]:
        timed(owner, name, label)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(requests):
        client.post("/api/messages/send-email", json=body, headers=headers)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    app.extensions["smtp_service"].pool.close_all()
    print(f"{requests} sends, one thread, in process (test client, no gunicorn)")
    print(f"{'CPU per request':<28}{cpu / requests * 1000:>8.3f} ms")
    print(f"{'wall per request':<28}{wall / requests * 1000:>8.3f} ms")
    for label, seconds in spent.most_common():
        print(f"  {label:<26}{seconds / requests * 1000:>8.3f} ms")
    rest = cpu - sum(spent.values())
    print(f"  {'Flask, werkzeug, the rest':<26}{rest / requests * 1000:>8.3f} ms")


if __name__ == "__main__":
    main()
