"""The Postman collection, run by newman against real gunicorn and real SMTP servers."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO_ROOT, SMTP_PASSWORD, SMTP_USER, LiveService

pytestmark = pytest.mark.e2e

NEWMAN = REPO_ROOT / "node_modules" / ".bin" / "newman"
COLLECTION = REPO_ROOT / "postman" / "smtp-service.postman_collection.json"
ENVIRONMENT = REPO_ROOT / "postman" / "local.postman_environment.json"
NEWMAN_TIMEOUT = 120


def _require_newman() -> None:
    if NEWMAN.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{NEWMAN} is missing (run `npm install`); under CI this test must run")
    pytest.skip(f"newman is not installed ({NEWMAN} missing): run `npm install`")


def _collection_variable(name: str) -> str:
    collection = json.loads(COLLECTION.read_text(encoding="utf-8"))
    return next(v["value"] for v in collection["variable"] if v["key"] == name)


@contextmanager
def mailbox(server) -> Iterator[str]:  # noqa: ANN001 - tests.smtpd.SmtpServer
    """A mail catcher's HTTP view of what `server` received, for the collection to read the
    confirmation code from: GET /messages -> {"messages": [{"to", "from", "subject", "text"}]}.
    Yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            messages = []
            for received in list(server.messages):
                body = received.message.get_body(("plain",))
                messages.append(
                    {
                        "to": received.rcpt_tos,
                        "from": received.mail_from,
                        "subject": received.message["Subject"],
                        "text": body.get_content() if body is not None else "",
                    }
                )
            data = json.dumps({"messages": messages}).encode()
            self.send_response(200 if self.path.split("?")[0] == "/messages" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:  # quiet
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _count_requests(items: list[dict]) -> int:
    return sum(_count_requests(i["item"]) if "item" in i else 1 for i in items)


def test_postman_collection_passes(live_service: LiveService, tmp_path: Path) -> None:
    _require_newman()
    live = live_service
    wrong_password = _collection_variable("wrongSmtpPass")
    live.secrets.append(wrong_password)
    report_path = tmp_path / "report.json"
    env_vars = {
        "baseUrl": live.base_url,
        "jwtSecret": live.jwt_secret,
        "smtpHost": "localhost",
        "smtpPort": str(live.account_server.port),
        "smtpUser": SMTP_USER,
        "smtpPass": SMTP_PASSWORD,
        "globalFrom": "noreply@example.com",  # the service's SMTP_FROM (tests/e2e/conftest.py)
    }
    command = [
        str(NEWMAN),
        "run",
        str(COLLECTION),
        "--environment",
        str(ENVIRONMENT),
        "--reporters",
        "cli,json",
        "--reporter-json-export",
        str(report_path),
        "--color",
        "off",
        "--disable-unicode",
        "--timeout-request",
        "20000",
    ]
    for key, value in env_vars.items():
        command += ["--env-var", f"{key}={value}"]

    with mailbox(live.global_server) as mailbox_url:
        command += ["--env-var", f"mailboxUrl={mailbox_url}"]
        result = subprocess.run(
            command,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=NEWMAN_TIMEOUT,
            check=False,
        )
    output = result.stdout + result.stderr
    print(output)  # newman's summary table, shown by pytest on failure (or with -rP / -s)
    assert result.returncode == 0, f"newman failed ({result.returncode}):\n{output}"

    run = json.loads(report_path.read_text(encoding="utf-8"))["run"]
    stats = run["stats"]
    assert stats["assertions"]["total"] > 0, output
    assert stats["assertions"]["failed"] == 0, output
    assert stats["testScripts"]["failed"] == 0, output
    assert stats["prerequestScripts"]["failed"] == 0, output
    assert run["failures"] == [], output
    collection = json.loads(COLLECTION.read_text(encoding="utf-8"))
    expected_requests = _count_requests(collection["item"])
    assert stats["requests"]["total"] == expected_requests, output
    assert stats["requests"]["failed"] == 0, output
    # OAuth2 sign-in is configured here: the start request took its 200 branch, not the 503
    codes = {e["item"]["name"]: e["response"]["code"] for e in run["executions"]}
    assert codes["POST start a Microsoft sign-in"] == 200

    # The collection really talked to the SMTP servers: the test logins reached the account's
    # server (right, then wrong password); the sends landed where the collection says.
    assert (SMTP_USER, True) in live.account_server.auth_attempts
    assert (SMTP_USER, False) in live.account_server.auth_attempts
    subjects = [m.message["Subject"] for m in live.account_server.messages]
    # custom, verified sender, idempotent (once for two requests), partial rejection
    assert len(subjects) == 4, subjects
    assert [m.rcpt_tos for m in live.account_server.messages][-1] == ["rcpt@example.net"]
    # the global server got: a confirmation for each sender added (from SMTP_FROM), the send
    # from the sender confirmed with its code, and the send from SMTP_FROM
    confirmations = [
        m
        for m in live.global_server.messages
        if m.message["Subject"] == "Confirm your sender address"
    ]
    assert [m.rcpt_tos for m in confirmations] == [
        ["sender-acct-postman-a@example.com"],
        ["confirm-acct-postman-a@example.com"],
    ]
    assert all(m.mail_from == "noreply@example.com" for m in confirmations)
    sends = [m.mail_from for m in live.global_server.messages if m not in confirmations]
    assert sends == ["confirm-acct-postman-a@example.com", "noreply@example.com"]

    live.stop()
    live.assert_log_clean()
