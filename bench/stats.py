"""How long the analytics queries take on a full message log (issue 12, item 4).

Fills a fresh database with N messages of one account spread over 30 days (plus a tenth as many
of another account): statuses, refused recipients, open tracking and opens mixed as a busy
account's would be, inserted in bulk through SQLAlchemy. Then times, through the service layer
(the same calls the routes make), each query several times and prints the median and the
slowest: the stats of 7 days per day, of 30 days per day, of 7 days per hour (168 buckets), the
latency percentiles alone, the first page of the listing, a page deep in it (after a cursor),
and a recipient filter. On SQLite (a file in a temporary folder) and, when TEST_DATABASE_URL
names a PostgreSQL server, there too (in a schema of its own, dropped at the end).

    .venv/bin/python bench/stats.py [--messages 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sqlalchemy as sa  # noqa: E402

from smtp_service.services.analytics import MessageAnalytics  # noqa: E402
from smtp_service.storage import stats  # noqa: E402
from smtp_service.storage.database import Database  # noqa: E402
from smtp_service.storage.tables import messages  # noqa: E402

DAY = 86_400_000
ACCOUNT = "bench-acct"


def rows(account: str, count: int, now_ms: int, seed: int) -> Any:
    """`count` message rows of `account` created over the 30 days before now_ms."""
    rng = random.Random(seed)
    for i in range(count):
        roll = rng.random()
        status = "sent" if roll < 0.9 else "bounced" if roll < 0.97 else "failed"
        rejected = []
        if status == "bounced" or rng.random() < 0.03:
            kind = "hard" if rng.random() < 0.7 else "soft"
            rejected = [
                {
                    "email": f"r{i}@example.net",
                    "code": 550,
                    "enhancedCode": "5.1.1",
                    "reply": "User unknown",
                    "type": kind,
                    "category": "mailbox",
                    "temporary": kind == "soft",
                }
            ]
        tracking = status == "sent" and rng.random() < 0.6
        opens = rng.choice([0, 0, 1, 1, 2, 5]) if tracking else 0
        created = now_ms - rng.randrange(30 * DAY)
        yield {
            "account_id": account,
            "message_id": f"{i:08d}{rng.getrandbits(64):016x}@example.com",
            "status": status,
            "from_addr": "news@example.com",
            "recipients": json.dumps([f"r{i}@example.net", f"c{i % 1000}@example.org"]),
            "subject": "Statement",
            "transport": "custom" if rng.random() < 0.8 else "global",
            "accepted": json.dumps([] if status != "sent" else [f"r{i}@example.net"]),
            "rejected": json.dumps(rejected),
            "smtp_reply": "250 OK",
            "duration_ms": round(rng.lognormvariate(2.5, 0.6), 3),
            "tracking": int(tracking),
            "created_at": created,
            "opens": opens,
            "first_opened_at": created + 60_000 if opens else None,
        }


def fill(db: Database, count: int, now_ms: int) -> float:
    """Insert the account's and the other account's rows; the seconds it took."""
    started = time.perf_counter()
    with db.engine.begin() as conn:
        # in the order of their time, as a log is written (rows close in time sit together)
        made = [
            row
            for account, n, seed in ((ACCOUNT, count, 1), ("other-acct", count // 10, 2))
            for row in rows(account, n, now_ms, seed)
        ]
        made.sort(key=lambda row: row["created_at"])
        for _ in (1,):
            batch = []
            for row in made:
                batch.append(row)
                if len(batch) == 5000:
                    conn.execute(messages.insert(), batch)
                    batch = []
            if batch:
                conn.execute(messages.insert(), batch)
    if db.dialect == "postgresql":
        with db.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE messages")
    return time.perf_counter() - started


def timed(call: Callable[[], Any], rounds: int) -> tuple[float, float]:
    """(median, slowest) milliseconds of `call` over `rounds` runs, after one warm-up."""
    call()
    spent = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        spent.append((time.perf_counter() - started) * 1000)
    return statistics.median(spent), max(spent)


def run(url: str, label: str, count: int, rounds: int) -> None:
    now_ms = int(time.time() * 1000)
    db = Database(url)
    db.migrate()
    seconds = fill(db, count, now_ms)
    print(
        f"\n{label}: {count:,} messages of one account (+{count // 10:,} of another) "
        f"inserted in {seconds:.1f} s"
    )
    analytics = MessageAnalytics(db, b"bench-cursor-key" * 2)
    now = datetime.fromtimestamp(now_ms / 1000, UTC)
    week_ago = datetime.fromtimestamp((now_ms - 7 * DAY) / 1000, UTC)
    month_ago = datetime.fromtimestamp((now_ms - 30 * DAY) / 1000, UTC)
    deep = analytics.page(ACCOUNT, limit=200)
    for _ in range(49):  # 10,000 messages in
        deep = analytics.page(ACCOUNT, limit=200, cursor=deep.next_cursor)
    total = analytics.stats(ACCOUNT, start=month_ago, end=now, interval="day").total
    print(
        f"  (30 days: {total.messages:,} messages, {total.sent:,} sent, "
        f"{total.hard_bounces:,} hard and {total.soft_bounces:,} soft bounces, "
        f"open rate {total.open_rate:.3f}, p50/p95/p99 {total.latency_ms})"
    )
    cases: list[tuple[str, Callable[[], Any]]] = [
        (
            "stats, 7 days per day (8 buckets)",
            lambda: analytics.stats(ACCOUNT, start=week_ago, end=now, interval="day"),
        ),
        (
            "stats, 30 days per day (31 buckets)",
            lambda: analytics.stats(ACCOUNT, start=month_ago, end=now, interval="day"),
        ),
        (
            "stats, 7 days per hour (169 buckets)",
            lambda: analytics.stats(ACCOUNT, start=week_ago, end=now, interval="hour"),
        ),
        (
            "latency_percentiles, last 15 minutes",
            lambda: stats.latency_percentiles(db, ACCOUNT, since_ms=now_ms - 900_000),
        ),
        (
            "latency_percentiles, 30 days",
            lambda: stats.latency_percentiles(db, ACCOUNT, since_ms=now_ms - 30 * DAY),
        ),
        ("list, first page of 50", lambda: analytics.page(ACCOUNT)),
        (
            "list, page of 200 after 10,000",
            lambda: analytics.page(ACCOUNT, limit=200, cursor=deep.next_cursor),
        ),
        ("list, status=bounced, first page", lambda: analytics.page(ACCOUNT, status="bounced")),
        (
            "list, to=c7@example.org (1 in 1,000), first page",
            lambda: analytics.page(ACCOUNT, to="c7@example.org"),
        ),
    ]
    print(f"  {'query':<50} {'median ms':>10} {'slowest ms':>11}")
    for name, call in cases:
        median, slowest = timed(call, rounds)
        print(f"  {name:<50} {median:>10.1f} {slowest:>11.1f}")
    db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-stats-") as folder:
        run(f"sqlite:///{folder}/messages.sqlite3", "SQLite", args.messages, args.rounds)
    pg = os.environ.get("TEST_DATABASE_URL", "").strip()
    if not pg:
        print("\nTEST_DATABASE_URL is not set: PostgreSQL not measured")
        return
    url = sa.engine.make_url(pg)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    schema = f"bench_stats_{secrets.token_hex(3)}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        in_schema = url.update_query_dict({"options": f"-csearch_path={schema}"})
        run(
            in_schema.render_as_string(hide_password=False),
            "PostgreSQL",
            args.messages,
            args.rounds,
        )
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


if __name__ == "__main__":
    main()
