"""The circuit breaker across real gunicorn: two instances of 2 workers each on one data folder
and one database (SQLite, and PostgreSQL where TEST_DATABASE_URL names one), against an account
server that takes TCP connections and never greets. Its connection count proves which requests
reached it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.databases import PG_SKIP, empty_tables
from tests.e2e.conftest import LiveService, start_instances
from tests.smtpd import SmtpServer

pytestmark = pytest.mark.e2e

ACCOUNT = "acct-circuit"
FAILURES = 3
OPEN_SECONDS = 3.0


@pytest.fixture(params=["sqlite", "postgresql"])
def instances(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    trust_test_ca: str,
    global_server: SmtpServer,
    servers: Any,
    pg_schema_url: str | None,
) -> Iterator[tuple[LiveService, LiveService, Any]]:
    """Two instances sharing DATA_DIR, the database and the key; and the silent server."""
    if request.param == "postgresql":
        if pg_schema_url is None:
            pytest.skip(PG_SKIP)
        empty_tables(pg_schema_url)
        database_url = pg_schema_url
    else:
        database_url = ""  # the SQLite file in the shared DATA_DIR
    silent = servers().fault("connect", "stall", seconds=30)
    started = start_instances(
        tmp_path,
        ca_file=trust_test_ca,
        global_server=global_server,
        account_server=silent,
        database_url=database_url,
        SMTP_TIMEOUT="0.5",
        SMTP_CIRCUIT_FAILURES=str(FAILURES),
        SMTP_CIRCUIT_SECONDS=str(OPEN_SECONDS),
    )
    try:
        yield started[0], started[1], silent
    finally:
        for live in started:
            live.stop()
    for live in started:
        live.assert_log_clean()


def _send(live: LiveService, token: str):
    body = {"from": SMTP_USER, "to": "rcpt@example.net", "subject": "circuit", "text": "x"}
    return live.request("POST", "/api/messages/send-email", body, token=token)


def _all_at_once(targets: list[LiveService], token: str) -> list[int]:
    with ThreadPoolExecutor(len(targets)) as pool:
        return sorted(r.status for r in pool.map(lambda live: _send(live, token), targets))


def test_one_circuit_for_every_worker_and_instance(instances) -> None:
    a, b, silent = instances
    token = a.token(ACCOUNT)
    body = {"host": "localhost", "port": silent.port, "user": SMTP_USER, "pass": SMTP_PASSWORD}
    assert a.request("POST", "/api/smtp/settings", body, token=token).status == 200
    for n, live in enumerate([a, b, a][:FAILURES]):  # failures through both instances
        r = _send(live, token)
        assert r.status == 502 and r.json["category"] == "timeout", r.text
        assert silent.wait_until(lambda n=n: silent.connections == n + 1)
    time.sleep(1.1)  # past any worker's memory of a closed circuit
    statuses = _all_at_once([a, b] * 4, token)  # 8 requests, both instances, all 4 workers
    assert statuses == [503] * 8
    health = b.request("GET", "/api/smtp/health", token=token).json["custom"]
    assert health["circuit"] == "open" and health["consecutiveFailures"] == FAILURES
    time.sleep(OPEN_SECONDS + 0.2)  # due: one request of all of them probes
    statuses = _all_at_once([a, b] * 4, token)
    assert statuses == [502] + [503] * 7  # the probe (timed out again) and the rest at once
    time.sleep(0.5)
    assert silent.connections == FAILURES + 1
    assert silent.max_active >= 1
