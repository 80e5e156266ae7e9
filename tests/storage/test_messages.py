"""The message database: round trips, account isolation, idempotency, concurrency, on SQLite and
PostgreSQL; the SQLite file's own guarantees (private files, WAL, the write gate, forks)."""

from __future__ import annotations

import multiprocessing
import os
import re
import stat
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from smtp_service.storage.database import Database
from smtp_service.storage.idempotency import IdempotencyStore
from smtp_service.storage.messages import MessageLog
from smtp_service.storage.migrate import head
from smtp_service.storage.suppressions import SuppressionList

T0 = 1762808400.0  # 2025-11-10T21:00:00.000Z
ISO_PATTERN = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Stores:
    """The three stores on one database, under the names these tests use."""

    def __init__(self, url: str, clock: Any = time.time, **suppression: Any) -> None:
        self.db = Database(url, clock=clock)
        self.messages = MessageLog(self.db)
        self.list = SuppressionList(self.db, **suppression)
        self.keys = IdempotencyStore(self.db)
        self.record, self.get = self.messages.record, self.messages.get
        self.record_open = self.messages.record_open
        self.suppress, self.suppressions = self.list.suppress, self.list.list
        self.suppressed, self.unsuppress = self.list.suppressed, self.list.unsuppress
        self.claim, self.complete, self.release = (
            self.keys.claim,
            self.keys.complete,
            self.keys.release,
        )

    def close(self) -> None:
        self.db.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "messages.sqlite3")


@pytest.fixture
def sqlite_url(db_path: str) -> str:
    return f"sqlite:///{db_path}"


@pytest.fixture
def log(database_url: str, clock: FakeClock) -> Iterator[Stores]:
    """The stores on each engine (SQLite, PostgreSQL)."""
    stores = Stores(database_url, clock=clock)
    yield stores
    stores.close()


@pytest.fixture
def sqlite_log(sqlite_url: str, clock: FakeClock) -> Iterator[Stores]:
    """The stores on an SQLite file, for what only SQLite has (files, WAL, the write gate)."""
    stores = Stores(sqlite_url, clock=clock)
    yield stores
    stores.close()


def record(log: Stores, account_id: str = "acct-a", message_id: str = "<m1@x>", **kw: Any):
    fields: dict[str, Any] = {
        "message_id": message_id,
        "account_id": account_id,
        "from_addr": "sender@example.com",
        "recipients": ["a@example.net", "b@example.net"],
        "subject": "Hello",
        "transport": "custom",
        "status": "sent",
        "accepted": ["a@example.net"],
        "rejected": [
            {
                "email": "b@example.net",
                "code": 550,
                "enhancedCode": "5.1.1",
                "reply": "no such user",
                "type": "hard",
            }
        ],
        "smtp_reply": "250 2.0.0 OK queued",
        "duration_ms": 12.5,
        "tracking": True,
    }
    fields.update(kw)
    log.record(**fields)


def raw(url: str, sql: str) -> list[tuple]:
    """Query the database directly, bypassing the stores."""
    if not url.startswith(("sqlite", "postgresql")):
        url = f"sqlite:///{url}"  # a path
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(sql)]
    finally:
        engine.dispose()


# -- messages -------------------------------------------------------------------------------


def test_record_and_get_round_trip(log: Stores) -> None:
    record(log)
    assert log.get("acct-a", "<m1@x>") == {
        "messageId": "<m1@x>",
        "status": "sent",
        "from": "sender@example.com",
        "recipients": ["a@example.net", "b@example.net"],
        "subject": "Hello",
        "transport": "custom",
        "accepted": ["a@example.net"],
        "rejected": [
            {
                "email": "b@example.net",
                "code": 550,
                "enhancedCode": "5.1.1",
                "reply": "no such user",
                "type": "hard",
            }
        ],
        "smtpReply": "250 2.0.0 OK queued",
        "durationMs": 12.5,
        "createdAt": "2025-11-10T21:00:00.000Z",
        "opens": 0,
        "firstOpenedAt": None,
        "events": [
            {
                "type": "sent",
                "at": "2025-11-10T21:00:00.000Z",
                "detail": {
                    "reply": "250 2.0.0 OK queued",
                    "accepted": ["a@example.net"],
                    "rejected": [
                        {
                            "email": "b@example.net",
                            "code": 550,
                            "enhancedCode": "5.1.1",
                            "reply": "no such user",
                            "type": "hard",
                        }
                    ],
                },
            }
        ],
    }


@pytest.mark.parametrize("status", ["failed", "bounced"])
def test_record_failure_statuses(log: Stores, status: str) -> None:
    record(log, status=status, accepted=[], smtp_reply=None)
    got = log.get("acct-a", "<m1@x>")
    assert got is not None
    assert got["status"] == status
    assert got["smtpReply"] is None
    assert [e["type"] for e in got["events"]] == [status]
    assert got["events"][0]["detail"]["reply"] is None


def test_record_rejects_unknown_status(log: Stores) -> None:
    with pytest.raises(ValueError):
        record(log, status="queued")
    assert log.get("acct-a", "<m1@x>") is None


def test_get_unknown_message(log: Stores) -> None:
    assert log.get("acct-a", "<nope@x>") is None


def test_record_open_counts_and_keeps_first(log: Stores, clock: FakeClock) -> None:
    record(log)
    clock.advance(60)
    assert log.record_open("acct-a", "<m1@x>") is True
    clock.advance(60)
    assert log.record_open("acct-a", "<m1@x>") is True
    got = log.get("acct-a", "<m1@x>")
    assert got["opens"] == 2
    assert got["firstOpenedAt"] == "2025-11-10T21:01:00.000Z"
    assert [(e["type"], e["at"], e["detail"]) for e in got["events"][1:]] == [
        ("open", "2025-11-10T21:01:00.000Z", None),
        ("open", "2025-11-10T21:02:00.000Z", None),
    ]


def test_record_open_unknown_message_writes_nothing(log: Stores, database_url: str) -> None:
    assert log.record_open("acct-a", "<nope@x>") is False
    assert raw(database_url, "SELECT count(*) FROM events") == [(0,)]


def test_a_send_writes_one_row(log: Stores, database_url: str) -> None:
    """The outcome event is read from the message row, not written twice."""
    record(log)
    assert raw(database_url, "SELECT count(*) FROM events") == [(0,)]
    assert [e["type"] for e in log.get("acct-a", "<m1@x>")["events"]] == ["sent"]


def test_timestamps_are_utc_iso_with_milliseconds(log: Stores, clock: FakeClock) -> None:
    clock.now = 1.0 + 0.0429  # milliseconds are truncated, not rounded, and zero-padded
    record(log)
    assert log.get("acct-a", "<m1@x>")["createdAt"] == "1970-01-01T00:00:01.042Z"
    real = Stores(log.db.url.render_as_string(hide_password=False))  # the wall clock
    try:
        before = time.time()
        record(real, message_id="<m2@x>")
        created = real.get("acct-a", "<m2@x>")["createdAt"]
    finally:
        real.close()
    assert re.fullmatch(ISO_PATTERN, created)
    parsed = datetime.strptime(created, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(parsed.timestamp() - before) < 5


# -- suppressions ---------------------------------------------------------------------------


def test_suppress_round_trip_newest_first(log: Stores, clock: FakeClock) -> None:
    log.suppress(
        "acct-a",
        "Bad@Example.NET",
        reason="hard bounce",
        code=550,
        enhanced_code="5.1.1",
        message_id="<m1@x>",
    )
    clock.advance(1)
    log.suppress(
        "acct-a",
        "other@example.net",
        reason="manual",
        code=None,
        enhanced_code=None,
        message_id=None,
    )
    assert log.suppressions("acct-a") == [
        {
            "email": "other@example.net",
            "reason": "manual",
            "code": None,
            "enhancedCode": None,
            "reply": None,
            "messageId": None,
            "createdAt": "2025-11-10T21:00:01.000Z",
            "expiresAt": None,
        },
        {
            "email": "bad@example.net",
            "reason": "hard bounce",
            "code": 550,
            "enhancedCode": "5.1.1",
            "reply": None,
            "messageId": "<m1@x>",
            "createdAt": "2025-11-10T21:00:00.000Z",
            "expiresAt": None,
        },
    ]


def test_suppress_is_an_upsert(log: Stores, clock: FakeClock) -> None:
    log.suppress(
        "acct-a",
        "bad@example.net",
        reason="hard bounce",
        code=550,
        enhanced_code="5.1.1",
        message_id="<m1@x>",
    )
    clock.advance(5)
    log.suppress(
        "acct-a",
        "BAD@example.net",
        reason="hard bounce",
        code=551,
        enhanced_code="5.1.6",
        message_id="<m2@x>",
    )
    assert log.suppressions("acct-a") == [
        {
            "email": "bad@example.net",
            "reason": "hard bounce",
            "code": 551,
            "enhancedCode": "5.1.6",
            "reply": None,
            "messageId": "<m2@x>",
            "createdAt": "2025-11-10T21:00:05.000Z",
            "expiresAt": None,
        }
    ]


def test_suppressed_is_case_insensitive_and_answers_as_given(log: Stores) -> None:
    log.suppress(
        "acct-a",
        "bad@example.net",
        reason="hard bounce",
        code=550,
        enhanced_code=None,
        message_id=None,
    )
    asked = ["ok@example.net", "Bad@Example.net", "other@example.net"]
    assert log.suppressed("acct-a", asked) == ["Bad@Example.net"]
    assert log.suppressed("acct-a", []) == []


def test_suppressed_handles_many_addresses(log: Stores) -> None:
    log.suppress(
        "acct-a", "u1999@example.net", reason="r", code=None, enhanced_code=None, message_id=None
    )
    asked = [f"u{i}@example.net" for i in range(2000)]  # more than one IN (...) chunk
    assert log.suppressed("acct-a", asked) == ["u1999@example.net"]


def test_unsuppress(log: Stores) -> None:
    log.suppress(
        "acct-a", "bad@example.net", reason="r", code=None, enhanced_code=None, message_id=None
    )
    assert log.unsuppress("acct-a", "BAD@example.net") is True
    assert log.unsuppress("acct-a", "bad@example.net") is False
    assert log.suppressions("acct-a") == []
    assert log.suppressed("acct-a", ["bad@example.net"]) == []


# -- idempotency ----------------------------------------------------------------------------


def test_claim_new_then_pending_then_replay(log: Stores) -> None:
    assert log.claim("acct-a", "k1", "h1") == ("new", None)
    assert log.claim("acct-a", "k1", "h1") == ("pending", None)
    log.complete("acct-a", "k1", {"outcome": "sent", "messageId": "<m1@x>"})
    assert log.claim("acct-a", "k1", "h1") == (
        "replay",
        {"outcome": "sent", "messageId": "<m1@x>"},
    )
    assert log.claim("acct-a", "k1", "h1")[0] == "replay"  # replays do not use the key up


def test_claim_conflict_pending_and_completed(log: Stores) -> None:
    assert log.claim("acct-a", "k1", "h1")[0] == "new"
    assert log.claim("acct-a", "k1", "h2") == ("conflict", None)
    log.complete("acct-a", "k1", {"ok": 1})
    assert log.claim("acct-a", "k1", "h2") == ("conflict", None)


def test_release_frees_a_pending_claim_only(log: Stores) -> None:
    assert log.claim("acct-a", "k1", "h1")[0] == "new"
    log.release("acct-a", "k1")
    assert log.claim("acct-a", "k1", "h2")[0] == "new"  # gone: even another body may use it
    log.complete("acct-a", "k1", {"ok": 1})
    log.release("acct-a", "k1")  # a completed key is kept for replays
    assert log.claim("acct-a", "k1", "h2") == ("replay", {"ok": 1})


def test_claim_expires_after_ttl(log: Stores, clock: FakeClock, database_url: str) -> None:
    assert log.claim("acct-a", "k1", "h1")[0] == "new"
    log.complete("acct-a", "k1", {"ok": 1})
    assert log.claim("acct-a", "k2", "h1")[0] == "new"  # left pending
    clock.advance(86400)
    assert log.claim("acct-a", "k1", "h1")[0] == "replay"  # exactly 24 h old: still kept
    clock.advance(0.001)
    assert log.claim("acct-a", "k1", "h2") == ("new", None)
    # every expired row of the account went, the stale pending k2 too
    assert raw(database_url, "SELECT key FROM idempotency") == [("k1",)]
    clock.advance(2)
    assert log.claim("acct-a", "k1", "h2", ttl_seconds=1) == ("new", None)


def test_abandoned_pending_claim_is_taken_over(log: Stores, clock: FakeClock) -> None:
    assert log.claim("acct-a", "k1", "h1")[0] == "new"  # its worker dies: never completed
    clock.advance(299)
    assert log.claim("acct-a", "k1", "h1")[0] == "pending"  # may still be running
    assert log.claim("acct-a", "k1", "h2")[0] == "conflict"  # another body never takes it
    clock.advance(2)
    assert log.claim("acct-a", "k1", "h1") == ("new", None)  # abandoned: retry proceeds
    assert log.claim("acct-a", "k1", "h1")[0] == "pending"  # and the takeover is a claim
    log.complete("acct-a", "k1", {"ok": 1})
    clock.advance(1000)
    assert log.claim("acct-a", "k1", "h1") == ("replay", {"ok": 1})  # completed: kept


def test_claim_expiry_with_the_wall_clock(database_url: str) -> None:
    real = Stores(database_url)
    try:
        assert real.claim("acct-a", "k1", "h1", ttl_seconds=1)[0] == "new"
        assert real.claim("acct-a", "k1", "h1", ttl_seconds=1)[0] == "pending"
        time.sleep(1.1)
        assert real.claim("acct-a", "k1", "h1", ttl_seconds=1)[0] == "new"
    finally:
        real.close()


# -- account isolation ----------------------------------------------------------------------


def test_accounts_cannot_see_or_change_each_others_rows(log: Stores, clock: FakeClock) -> None:
    record(log, account_id="acct-a")
    log.suppress(
        "acct-a", "bad@example.net", reason="r", code=550, enhanced_code=None, message_id=None
    )
    assert log.claim("acct-a", "k1", "h1")[0] == "new"
    log.complete("acct-a", "k1", {"secret": "a"})
    assert log.claim("acct-a", "k2", "h1")[0] == "new"  # pending

    assert log.get("acct-b", "<m1@x>") is None
    assert log.record_open("acct-b", "<m1@x>") is False
    assert log.suppressions("acct-b") == []
    assert log.suppressed("acct-b", ["bad@example.net"]) == []
    assert log.unsuppress("acct-b", "bad@example.net") is False
    # B's keys are B's own: A's completed response is never replayed to B
    assert log.claim("acct-b", "k1", "h1") == ("new", None)
    log.complete("acct-b", "k2", {"secret": "b"})  # must not complete A's pending k2
    log.release("acct-b", "k2")  # nor release it
    clock.advance(10)
    assert log.claim("acct-b", "k3", "h1", ttl_seconds=1)[0] == "new"  # expires B's rows only

    a = log.get("acct-a", "<m1@x>")
    assert a["opens"] == 0 and [e["type"] for e in a["events"]] == ["sent"]
    assert [s["email"] for s in log.suppressions("acct-a")] == ["bad@example.net"]
    assert log.claim("acct-a", "k1", "h1") == ("replay", {"secret": "a"})
    assert log.claim("acct-a", "k2", "h1") == ("pending", None)


def test_same_message_id_in_two_accounts_stays_apart(log: Stores) -> None:
    record(log, account_id="acct-a", subject="for a")
    record(log, account_id="acct-b", subject="for b")
    assert log.record_open("acct-b", "<m1@x>") is True
    a, b = log.get("acct-a", "<m1@x>"), log.get("acct-b", "<m1@x>")
    assert (a["subject"], a["opens"], len(a["events"])) == ("for a", 0, 1)
    assert (b["subject"], b["opens"], len(b["events"])) == ("for b", 1, 2)


# -- the file and the connection ------------------------------------------------------------


def test_files_are_private_and_wal_is_on(db_path: str, sqlite_log: Stores) -> None:
    old = os.umask(0)  # even a permissive umask must not widen the files
    try:
        record(sqlite_log)
    finally:
        os.umask(old)
    for suffix in ("", "-wal", "-shm", ".lock"):
        assert stat.S_IMODE(os.stat(db_path + suffix).st_mode) == 0o600, suffix
    assert raw(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert raw(db_path, "SELECT version_num FROM alembic_version") == [(head(),)]
    with sqlite_log.db.engine.connect() as conn:
        pragma = conn.exec_driver_sql
        assert pragma("PRAGMA synchronous").one() == (1,)  # NORMAL
        assert pragma("PRAGMA busy_timeout").one() == (5000,)
        assert pragma("PRAGMA foreign_keys").one() == (1,)


def test_nothing_is_opened_until_first_use(db_path: str) -> None:
    Stores(f"sqlite:///{db_path}")
    assert not os.path.exists(db_path)


def test_reopening_keeps_data_and_schema(database_url: str, clock: FakeClock) -> None:
    first = Stores(database_url, clock=clock)
    record(first)
    first.close()
    first.close()  # closing twice is harmless
    second = Stores(database_url, clock=clock)
    try:
        assert second.get("acct-a", "<m1@x>")["subject"] == "Hello"
        assert first.get("acct-a", "<m1@x>")["subject"] == "Hello"  # reopened lazily
    finally:
        first.close()
        second.close()
    assert raw(database_url, "SELECT version_num FROM alembic_version") == [(head(),)]


def test_migrating_at_once_from_many_processes(database_url: str) -> None:
    """Workers and instances that start together each migrate; one does, the rest find it done."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(4)
    results = ctx.Queue()
    procs = [ctx.Process(target=_migrate, args=(database_url, start, results)) for _ in range(4)]
    for p in procs:
        p.start()
    try:
        reports = [results.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
    assert reports == ["ok"] * 4
    assert raw(database_url, "SELECT version_num FROM alembic_version") == [(head(),)]


def _migrate(url: str, start: Any, results: Any) -> None:
    stores = Stores(url)
    try:
        start.wait()
        stores.db.migrate()
        stores.suppressed("acct-a", ["x@example.net"])
        results.put("ok")
    except BaseException:  # noqa: BLE001 - sent back to the test
        results.put(traceback.format_exc())
    finally:
        stores.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_connection_from_before_a_fork_is_not_used_in_the_child(log: Stores) -> None:
    record(log)
    with log.db.engine.connect() as conn:
        inherited = conn.connection.dbapi_connection
    with warnings.catch_warnings():  # Python 3.12+ warns about forking with threads running
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        code = 1
        try:
            record(log, message_id="<child@x>")
            with log.db.engine.connect() as conn:
                ok = conn.connection.dbapi_connection is not inherited
            ok = ok and log.get("acct-a", "<m1@x>") is not None
            log.close()
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with log.db.engine.connect() as conn:  # the parent's connection is untouched, still works
        assert conn.connection.dbapi_connection is inherited
    assert log.get("acct-a", "<child@x>")["status"] == "sent"


def test_claim_race_between_threads(database_url: str) -> None:
    log = Stores(database_url)
    barrier = threading.Barrier(8)
    results: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait()
            results.append(log.claim("acct-a", "race", "h")[0])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert errors == []
    assert sorted(results) == ["new"] + ["pending"] * 7


# -- many processes, many threads -----------------------------------------------------------

PROCESSES = 4
THREADS = 4
MESSAGES = 100


def _process(url: str, index: int, start: Any, results: Any) -> None:
    """One worker process: THREADS threads each record MESSAGES messages and open each one."""
    log = Stores(url)
    barrier = threading.Barrier(THREADS)
    errors: list[str] = []
    claims: list[str] = []

    def work(thread: int) -> None:
        try:
            barrier.wait()
            claims.append(log.claim("acct-shared", "race", "h")[0])
            account = f"acct-{thread % 2}"
            for i in range(MESSAGES):
                message_id = f"<p{index}-t{thread}-{i}@test>"
                record(log, account_id=account, message_id=message_id)
                if not log.record_open(account, message_id):
                    errors.append(f"open of {message_id} not found")
                log.suppress(
                    account,
                    f"u{i}@example.net",
                    reason="r",
                    code=550,
                    enhanced_code=None,
                    message_id=message_id,
                )
        except BaseException:  # noqa: BLE001 - sent back to the test
            errors.append(traceback.format_exc())

    start.wait()  # every process starts writing at once
    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    results.put((index, errors, claims))


def test_many_processes_and_threads_write_at_once(database_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_process, args=(database_url, p, start, results))
        for p in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    try:
        reports = [results.get(timeout=90) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
        results.close()
        results.join_thread()
    assert [p.exitcode for p in procs] == [0] * PROCESSES

    errors = [e for _, errs, _ in reports for e in errs]
    assert errors == []  # no "database is locked", no deadlock, nothing missing
    claims = sorted(c for _, _, cs in reports for c in cs)
    assert claims == ["new"] + ["pending"] * (PROCESSES * THREADS - 1)

    total = PROCESSES * THREADS * MESSAGES
    assert raw(database_url, "SELECT count(*), sum(opens) FROM messages") == [(total, total)]
    assert raw(database_url, "SELECT type, count(*) FROM events GROUP BY type") == [
        ("open", total)
    ]
    assert raw(
        database_url,
        "SELECT account_id, count(*) FROM suppressions GROUP BY 1 ORDER BY 1",
    ) == [("acct-0", MESSAGES), ("acct-1", MESSAGES)]
    log = Stores(database_url)
    try:
        got = log.get("acct-1", f"<p{PROCESSES - 1}-t{THREADS - 1}-{MESSAGES - 1}@test>")
        assert got["opens"] == 1 and [e["type"] for e in got["events"]] == ["sent", "open"]
        assert log.get("acct-0", "<p0-t1-0@test>") is None  # thread 1 wrote to acct-1
    finally:
        log.close()


def test_first_open_by_many_at_once(tmp_path) -> None:
    # Turning a new file to WAL fails at once, without waiting, while another connection opens
    # it; the race is narrow, so it is run many times (about 1 s).
    errors: list[BaseException] = []
    for run in range(100):
        log = Stores(f"sqlite:///{tmp_path / f'fresh-{run}.sqlite3'}")
        barrier = threading.Barrier(8)

        def work(log: Stores = log, barrier: threading.Barrier = barrier) -> None:
            try:
                barrier.wait()
                log.suppressed("acct-a", ["x@example.net"])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        log.close()
    assert errors == []


def test_writers_queue_on_the_gate_across_processes(sqlite_log: Stores, db_path: str) -> None:
    """A writer waits for the write gate (a flock another process holds) instead of meeting
    SQLite's sleeping busy handler; it goes on, and succeeds, as soon as the gate is free."""
    import subprocess
    import sys

    log = sqlite_log
    record(log, message_id="<first@x>")  # the database and its lock file exist
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
            db_path + ".lock",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        done = threading.Event()
        errors: list[BaseException] = []

        def write() -> None:
            try:
                record(log, message_id="<second@x>")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            done.set()

        threading.Thread(target=write, daemon=True).start()
        assert not done.wait(0.5)  # waiting on the gate, not failing, not writing past it
        assert log.get("acct-a", "<second@x>") is None
    finally:
        holder.communicate("")  # the holder exits: its flock is released
    assert done.wait(5) and errors == []
    assert log.get("acct-a", "<second@x>") is not None
    assert stat.S_IMODE(os.stat(db_path + ".lock").st_mode) == 0o600


def test_the_gate_is_per_process_after_a_fork(sqlite_log: Stores) -> None:
    """A forked child writes through its own gate, even if the parent holds its own meanwhile
    in another thread (a copied, locked thread lock would hang the child forever)."""
    log = sqlite_log
    record(log, message_id="<before@x>")
    ctx = multiprocessing.get_context("fork")
    hold = threading.Event()
    release = threading.Event()

    def holder() -> None:
        assert log.db._gate is not None
        with log.db._gate._lock:  # the parent's thread lock, held across the fork
            hold.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    hold.wait(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
        child = ctx.Process(target=_child_write, args=(log,))
        child.start()
    child.join(10)
    release.set()
    thread.join()
    assert child.exitcode == 0
    assert log.get("acct-a", "<from-child@x>") is not None


def _child_write(log: Stores) -> None:
    record(log, message_id="<from-child@x>")


def test_keys_no_database_can_hold_find_nothing(log: Stores) -> None:
    """PostgreSQL refuses NUL in text: a look-up by such a key answers "none", never an error."""
    record(log)
    assert log.get("acct-a", "<m1@x>\x00") is None
    assert log.unsuppress("acct-a", "bad@example.net\x00") is False
    assert log.suppressed("acct-a", ["\x00", "ok@example.net"]) == []


def test_suppressions_expire_after_their_days(database_url: str, clock: FakeClock) -> None:
    log = Stores(database_url, clock=clock, days=30)
    try:
        log.suppress(
            "acct-a", "bad@example.net", reason="r", code=550, enhanced_code=None, message_id=None
        )
        assert log.suppressions("acct-a")[0]["expiresAt"] == "2025-12-10T21:00:00.000Z"
        clock.advance(30 * 86400)
        assert log.suppressed("acct-a", ["bad@example.net"]) == ["bad@example.net"]
        clock.advance(0.001)
        assert log.suppressed("acct-a", ["bad@example.net"]) == []
        assert log.suppressions("acct-a") == []
        assert log.unsuppress("acct-a", "bad@example.net") is False
    finally:
        log.close()


def test_soft_bounces_count_within_their_window(database_url: str, clock: FakeClock) -> None:
    log = Stores(database_url, clock=clock, soft_limit=2, soft_days=7)
    details = {"code": 552, "enhanced_code": "5.2.2", "message_id": "<m@x>", "reply": "full"}
    try:
        assert log.list.soft_bounce("acct-a", "Carol@example.net", **details) is False
        clock.advance(7 * 86400 + 0.001)  # the first one has left the window
        assert log.list.soft_bounce("acct-a", "carol@example.net", **details) is False
        assert not log.list.soft_bounce("acct-b", "carol@example.net", **details)  # per account
        assert log.suppressed("acct-a", ["carol@example.net"]) == []
        assert log.list.soft_bounce("acct-a", "carol@example.net", **details) is True
        assert log.suppressed("acct-a", ["carol@example.net"]) == ["carol@example.net"]
        assert log.suppressions("acct-a")[0]["reason"] == "soft bounces"
        assert log.suppressed("acct-b", ["carol@example.net"]) == []
    finally:
        log.close()
