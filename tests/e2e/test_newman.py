"""The Postman collection, run by newman against real gunicorn started as `make run` starts it:
no SMTP_HOST, so gunicorn.conf.py starts the development mail catcher (global server, the
account's own server, the mailbox simulator; README "Mailbox simulator"). The collection and
the environment are used as shipped, with only `baseUrl` and `jwtSecret` given.
tests/e2e/test_shipped.py runs the same files against `make run` itself."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smtp_service.services.devmailbox import SIMULATOR_DOMAIN, read_mailbox
from tests.e2e.conftest import (
    REPO_ROOT,
    LiveService,
    free_port,
    service_environment,
    start_live,
)
from tests.smtpd import SmtpServer

pytestmark = pytest.mark.e2e

NEWMAN = REPO_ROOT / "node_modules" / ".bin" / "newman"
COLLECTION = REPO_ROOT / "postman" / "smtp-service.postman_collection.json"
ENVIRONMENT = REPO_ROOT / "postman" / "local.postman_environment.json"
NEWMAN_TIMEOUT = 180


def require_newman() -> None:
    """Skip (fail under CI) when newman is not installed."""
    if NEWMAN.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{NEWMAN} is missing (run `npm install`); under CI this test must run")
    pytest.skip(f"newman is not installed ({NEWMAN} missing): run `npm install`")


def collection_variable(name: str) -> str:
    collection = json.loads(COLLECTION.read_text(encoding="utf-8"))
    return next(v["value"] for v in collection["variable"] if v["key"] == name)


def environment_value(name: str) -> str:
    environment = json.loads(ENVIRONMENT.read_text(encoding="utf-8"))
    return next(v["value"] for v in environment["values"] if v["key"] == name)


def count_requests(items: list[dict]) -> int:
    return sum(count_requests(i["item"]) if "item" in i else 1 for i in items)


def run_newman(
    env_vars: dict[str, str], report_path: Path, *, cwd: Path = REPO_ROOT
) -> tuple[dict[str, Any], str]:
    """newman over the shipped collection and environment with `env_vars` (--env-var each);
    returns the JSON report's run and newman's output."""
    command = [
        str(NEWMAN),
        "run",
        str(cwd / "postman" / COLLECTION.name),
        "--environment",
        str(cwd / "postman" / ENVIRONMENT.name),
        "--reporters",
        "cli,json",
        "--reporter-json-export",
        str(report_path),
        "--color",
        "off",
        "--disable-unicode",
        "--timeout-request",
        "30000",
    ]
    for key, value in env_vars.items():
        command += ["--env-var", f"{key}={value}"]
    result = subprocess.run(
        command,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=NEWMAN_TIMEOUT,
        check=False,
    )
    output = result.stdout + result.stderr
    print(output)  # newman's summary table, shown by pytest on failure (or with -rP / -s)
    assert result.returncode == 0, f"newman failed ({result.returncode}):\n{output}"
    return json.loads(report_path.read_text(encoding="utf-8"))["run"], output


def assert_run_green(run: dict[str, Any], output: str) -> None:
    """Every request ran, every assertion and script passed."""
    stats = run["stats"]
    assert stats["assertions"]["total"] > 0, output
    assert stats["assertions"]["failed"] == 0, output
    assert stats["testScripts"]["failed"] == 0, output
    assert stats["prerequestScripts"]["failed"] == 0, output
    assert run["failures"] == [], output
    collection = json.loads(COLLECTION.read_text(encoding="utf-8"))
    assert stats["requests"]["total"] == count_requests(collection["item"]), output
    assert stats["requests"]["failed"] == 0, output


@pytest.fixture
def catcher_service(
    tmp_path: Path, trust_test_ca: str, global_server: SmtpServer
) -> Iterator[LiveService]:
    """gunicorn (2 workers) configured as `make run` leaves it: no SMTP_HOST (the development
    mail catcher on a free port, started by gunicorn.conf.py), no SMTP_HOST_ALLOWLIST, no
    SMTP_FROM. global_server is configured nowhere: it must receive nothing."""
    port = free_port()
    data_dir = tmp_path / "data"
    env = service_environment(
        port=port,
        data_dir=data_dir,
        ca_file=trust_test_ca,
        global_server=global_server,
        SMTP_HOST="",
        SMTP_PORT="",
        SMTP_USER="",
        SMTP_PASS="",
        SMTP_FROM="",
        SMTP_HOST_ALLOWLIST="",
        DEV_SMTP_PORT=str(free_port()),
    )
    live = start_live(
        port=port,
        data_dir=data_dir,
        log_path=tmp_path / "gunicorn.log",
        env=env,
        global_server=global_server,
        account_server=global_server,
    )
    try:
        yield live
    finally:
        live.stop()


def test_postman_collection_passes(catcher_service: LiveService, tmp_path: Path) -> None:
    require_newman()
    live = catcher_service
    smtp_user = environment_value("smtpUser")
    live.secrets += [collection_variable("wrongSmtpPass"), environment_value("smtpPass")]
    env_vars = {"baseUrl": live.base_url, "jwtSecret": live.jwt_secret}
    run, output = run_newman(env_vars, tmp_path / "report.json")
    assert_run_green(run, output)
    # OAuth2 sign-in is configured here (not under make run): the start request took its 200
    # branch, not the 503
    codes = {e["item"]["name"]: e["response"]["code"] for e in run["executions"]}
    assert codes["POST start a Microsoft sign-in"] == 200

    # What the catcher kept: every accepted message, nothing for a refused recipient.
    caught = read_mailbox(str(live.data_dir / "outbox"), limit=500)
    envelopes = [(m.mail_from, m.rcpt_tos) for m in caught]
    refused = {f"{name}@{SIMULATOR_DOMAIN}" for name in ("soft-bounce", "blocked")}
    assert not [m for m in caught for rcpt in m.rcpt_tos if rcpt in refused], envelopes
    assert not [
        m
        for m in caught
        for rcpt in m.rcpt_tos
        if rcpt.startswith(("bounce+", "mailbox-full+")) and rcpt.endswith(SIMULATOR_DOMAIN)
    ], envelopes
    # custom route: the first send, the idempotent one (once for two requests), the partial
    # rejection's accepted half, the one send within the Rate limits folder's 1/day (the next
    # is 429, not sent); the verified sender's; the simulator's slow and success.
    assert envelopes.count((smtp_user, ("rcpt@example.net",))) == 4, envelopes
    account = "acct-postman-a"
    assert (f"sender-{account}@example.com", ("rcpt@example.net", "cc@example.net")) in envelopes
    assert (smtp_user, (f"slow@{SIMULATOR_DOMAIN}",)) in envelopes
    assert (smtp_user, (f"success@{SIMULATOR_DOMAIN}",)) in envelopes
    # global route (the same catcher): a confirmation for each sender added, from SMTP_FROM
    # (make run's dev@example.com), the send from the confirmed sender, the send from SMTP_FROM.
    confirmations = [m for m in caught if m.subject == "Confirm your sender address"]
    assert [m.rcpt_tos for m in confirmations] == [
        (f"sender-{account}@example.com",),
        (f"confirm-{account}@example.com",),
    ]
    assert all(m.mail_from == "dev@example.com" for m in confirmations)
    assert (f"confirm-{account}@example.com", ("rcpt@example.net",)) in envelopes
    assert ("dev@example.com", ("rcpt@example.net",)) in envelopes
    assert len(caught) == 11, envelopes
    assert global_server_untouched(live)

    live.stop()
    log = live.log_text()
    # the connection tests reached the catcher: the user logged in, the simulator's user refused
    assert f"devmail: AUTH PLAIN {smtp_user}: accepted" in log
    assert f"devmail: AUTH PLAIN auth-failure@{SIMULATOR_DOMAIN}: refused" in log
    live.assert_log_clean()


def global_server_untouched(live: LiveService) -> bool:
    return live.global_server.messages == [] and live.global_server.auth_attempts == []
