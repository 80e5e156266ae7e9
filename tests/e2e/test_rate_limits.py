"""Rate limits across real gunicorn workers and instances: send limits counted by the message
database (SQLite: one instance, 2 workers; PostgreSQL: two instances of 2 workers), exact under
concurrent load against a real SMTP server; the connection test's limit shared through Redis."""

from __future__ import annotations

import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from smtp_service.services.crypto import new_key
from tests.conftest import SMTP_PASSWORD, SMTP_USER
from tests.databases import PG_SKIP, empty_tables
from tests.e2e.conftest import LiveService, Response, free_port, service_environment, start_live
from tests.redis_store import REDIS_SKIP, delete_keys, redis_url
from tests.smtpd import SmtpServer

DAY = 86400
LIMIT = 10
SENDS = 30


@pytest.fixture(autouse=True)
def _not_at_the_end_of_a_day():
    """Windows are aligned on UTC days: a test never straddles midnight (it waits it out)."""
    left = DAY - time.time() % DAY
    if left < 60:
        time.sleep(left + 0.5)


def _start(
    tmp_path: Path,
    ca: str,
    global_server: SmtpServer,
    account_server: SmtpServer,
    names: tuple[str, ...],
    **overrides: str,
) -> list[LiveService]:
    """Instances on one data folder and encryption key, each 2 workers x 16 threads."""
    data_dir = tmp_path / "data"
    key = new_key()
    started: list[LiveService] = []
    try:
        for name in names:
            port = free_port()
            env = service_environment(
                port=port,
                data_dir=data_dir,
                ca_file=ca,
                global_server=global_server,
                SMTP_ENCRYPTION_KEYS=key,
                GUNICORN_THREADS="16",
                **overrides,
            )
            started.append(
                start_live(
                    port=port,
                    data_dir=data_dir,
                    log_path=tmp_path / f"gunicorn-{name}.log",
                    env=env,
                    global_server=global_server,
                    account_server=account_server,
                )
            )
    except BaseException:
        for live in started:
            live.stop()
        raise
    return started


@pytest.fixture(params=["sqlite", "postgresql"])
def deployment(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    trust_test_ca: str,
    global_server: SmtpServer,
    smtp_factory: Any,
    pg_schema_url: str | None,
) -> Iterator[list[LiveService]]:
    """SQLite: one instance (2 workers). PostgreSQL: two instances (2 workers each) on one
    database. SEND_RATE_LIMIT is LIMIT a day."""
    overrides = {"SEND_RATE_LIMIT": f"{LIMIT}/day"}
    names: tuple[str, ...] = ("only",)
    if request.param == "postgresql":
        if pg_schema_url is None:
            pytest.skip(PG_SKIP)
        empty_tables(pg_schema_url)
        overrides["DATABASE_URL"] = pg_schema_url
        names = ("a", "b")
    started = _start(
        tmp_path, trust_test_ca, global_server, smtp_factory("starttls"), names, **overrides
    )
    try:
        yield started
    finally:
        for live in started:
            live.stop()
    for live in started:
        live.assert_log_clean()


def _send(live: LiveService, token: str, sender: str, subject: str) -> Response:
    body = {"from": sender, "to": "rcpt@example.net", "subject": subject, "text": "x"}
    return live.request("POST", "/api/messages/send-email", body, token=token, timeout=30)


def _at_once(count: int, one) -> list[Any]:
    """`count` calls of one(i), started together."""
    barrier = threading.Barrier(count)

    def run(i: int) -> Any:
        barrier.wait()
        return one(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def _seconds_to_midnight() -> float:
    return DAY - time.time() % DAY


def test_concurrent_sends_deliver_exactly_the_limit(deployment: list[LiveService]) -> None:
    lives = deployment
    token = lives[0].token("acct-burst")
    server = lives[0].global_server
    answers = _at_once(
        SENDS,
        lambda i: _send(lives[i % len(lives)], token, "noreply@example.com", f"burst-{i}"),
    )
    statuses = [a.status for a in answers]
    assert statuses.count(200) == LIMIT and statuses.count(429) == SENDS - LIMIT, statuses
    assert len(server.messages) == LIMIT  # exactly as many delivered as answered 200
    sent = {a.json["messageId"] for a in answers if a.status == 200}
    assert {m.message["Message-ID"].strip("<>") for m in server.messages} == sent
    expected = _seconds_to_midnight()
    for refused in (a for a in answers if a.status == 429):
        retry_after = int(refused.headers["Retry-After"])
        assert math.ceil(expected) - 30 <= retry_after <= math.ceil(expected) + 1
        assert refused.json == {
            "error": f"Send rate limit reached for this account ({LIMIT} per day); nothing "
            f"was sent. Retry after {retry_after} s"
        }
    # another account has its own count, on every instance
    other = lives[-1].token("acct-other")
    assert _send(lives[-1], other, "noreply@example.com", "other").status == 200


def test_an_accounts_own_limit_replaces_the_default(deployment: list[LiveService]) -> None:
    lives = deployment
    first = lives[0]
    token = first.token("acct-own")
    server = first.account_server
    settings = {
        "host": "localhost",
        "port": server.port,
        "user": SMTP_USER,
        "pass": SMTP_PASSWORD,
        "rateLimit": "4/day",
    }
    saved = first.request("POST", "/api/smtp/settings", settings, token=token)
    assert saved.status == 200 and saved.json["settings"]["rateLimit"] == "4/day"
    shown = lives[-1].request("GET", "/api/smtp/settings", token=token)
    assert shown.json["rateLimit"] == "4/day"
    answers = _at_once(12, lambda i: _send(lives[i % len(lives)], token, SMTP_USER, f"own-{i}"))
    statuses = [a.status for a in answers]
    assert statuses.count(200) == 4 and statuses.count(429) == 8, statuses
    assert len(server.messages) == 4
    assert all("(4 per day)" in a.json["error"] for a in answers if a.status == 429)
    # a send the server refused counts; one refused before SMTP (sender not verified) does not
    unlimited = {**settings, "rateLimit": "2/day"}
    token2 = first.token("acct-own-2")
    assert first.request("POST", "/api/smtp/settings", unlimited, token=token2).status == 200
    body = {"from": "stranger@example.com", "to": "rcpt@example.net", "subject": "s", "text": "x"}
    for live in lives:
        refused = live.request("POST", "/api/messages/send-email", body, token=token2)
        assert refused.status == 403
    bounced = lives[-1].request(
        "POST",
        "/api/messages/send-email",
        {**body, "from": SMTP_USER, "to": "bad-user@example.net"},
        token=token2,
    )
    assert bounced.status == 502 and bounced.json["bounce"]["type"] == "hard"
    assert _send(first, token2, SMTP_USER, "counted").status == 200
    assert _send(lives[-1], token2, SMTP_USER, "over").status == 429


@pytest.fixture
def redis_deployment(
    tmp_path: Path, trust_test_ca: str, global_server: SmtpServer, smtp_factory: Any
) -> Iterator[list[LiveService]]:
    """Two instances (2 workers each) whose request limits count in one Redis."""
    url = redis_url()
    if url is None:
        pytest.skip(REDIS_SKIP)
    prefix = f"smtp-service-e2e-{new_key()[:12]}"
    started = _start(
        tmp_path,
        trust_test_ca,
        global_server,
        smtp_factory("starttls"),
        ("a", "b"),
        RATELIMIT_STORAGE_URI=url,
        RATELIMIT_KEY_PREFIX=prefix,
        SMTP_TEST_RATE_LIMIT="5/minute",
        TRACKING_RATE_LIMIT="6/minute",
    )
    try:
        yield started
    finally:
        for live in started:
            live.stop()
        delete_keys(url, prefix)
    for live in started:
        live.assert_log_clean()


def test_request_limits_are_shared_through_redis(redis_deployment: list[LiveService]) -> None:
    a, b = redis_deployment
    token = a.token("acct-tests")
    settings = {"host": "localhost", "port": a.account_server.port, "user": SMTP_USER,
                "pass": SMTP_PASSWORD}
    lives = [a, b]
    answers = _at_once(
        12, lambda i: lives[i % 2].request("POST", "/api/smtp/test", settings, token=token)
    )
    statuses = [r.status for r in answers]
    assert statuses.count(200) == 5 and statuses.count(429) == 7, statuses
    for refused in (r for r in answers if r.status == 429):
        assert refused.json["success"] is False
        assert refused.json["error"].startswith(
            "Too many connection tests: at most 5 per 1 minute for this account; retry after "
        )
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
    codes = _at_once(10, lambda i: _pixel_status(lives[i % 2]))
    assert codes.count(200) == 6 and codes.count(429) == 4, codes


def _pixel_status(live: LiveService) -> int:
    """The status of one fetch of the pixel (a GIF is no text for LiveService.request)."""
    try:
        with urllib.request.urlopen(live.base_url + "/t/open/forged.gif", timeout=15) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code
