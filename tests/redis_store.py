"""flask-limiter's storage under test: memory, and Redis when TEST_REDIS_URL names a server.

Each test gets a key prefix of its own (RATELIMIT_KEY_PREFIX) and only the keys under it are
deleted at the end, so a shared Redis keeps everything else. Where TEST_REDIS_URL is unset the
Redis cases are skipped with one reason, which the summary prints as one line.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

REDIS_ENV = "TEST_REDIS_URL"
REDIS_SKIP = f"{REDIS_ENV} is not set: the Redis cases are skipped (.ci/run sets it)"
STORAGES = ["memory", "redis"]


def redis_url() -> str | None:
    """TEST_REDIS_URL, or None."""
    return os.environ.get(REDIS_ENV, "").strip() or None


def delete_keys(url: str, prefix: str) -> int:
    """Delete the keys whose name holds `prefix` (flask-limiter puts it in every key it makes);
    how many went."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        names = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        return client.delete(*names) if names else 0
    finally:
        client.close()


def count_keys(url: str, prefix: str) -> int:
    """How many keys hold `prefix`."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        return sum(1 for _ in client.scan_iter(match=f"*{prefix}*", count=1000))
    finally:
        client.close()


@pytest.fixture(params=STORAGES)
def limiter_storage(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """RATELIMIT_STORAGE_URI and a fresh RATELIMIT_KEY_PREFIX for one storage (a config
    fragment); the prefix's keys are deleted from Redis at the end."""
    prefix = f"smtp-service-test-{secrets.token_hex(6)}"
    if request.param == "memory":
        yield {"RATELIMIT_STORAGE_URI": "memory://", "RATELIMIT_KEY_PREFIX": prefix}
        return
    url = redis_url()
    if url is None:
        pytest.skip(REDIS_SKIP)
    try:
        yield {"RATELIMIT_STORAGE_URI": url, "RATELIMIT_KEY_PREFIX": prefix}
    finally:
        delete_keys(url, prefix)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line for every Redis case skipped for want of a server."""
    skipped = [
        r
        for r in terminalreporter.stats.get("skipped", [])
        if isinstance(r.longrepr, tuple) and REDIS_SKIP in str(r.longrepr[2])
    ]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} Redis cases skipped: {REDIS_SKIP}")
