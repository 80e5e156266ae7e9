"""The Postman collection, run by newman against real gunicorn and real SMTP servers."""

from __future__ import annotations

import json
import os
import subprocess
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

    # The collection really talked to the SMTP servers: the test logins reached the account's
    # server (right, then wrong password); the sends landed where the collection says.
    assert (SMTP_USER, True) in live.account_server.auth_attempts
    assert (SMTP_USER, False) in live.account_server.auth_attempts
    subjects = [m.message["Subject"] for m in live.account_server.messages]
    # custom, verified sender, idempotent (once for two requests), partial rejection
    assert len(subjects) == 4, subjects
    assert [m.rcpt_tos for m in live.account_server.messages][-1] == ["rcpt@example.net"]
    assert [m.mail_from for m in live.global_server.messages] == ["noreply@example.com"]

    live.stop()
    live.assert_log_clean()
