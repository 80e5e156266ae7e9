"""The message log database: round trips, account isolation, idempotency, files, concurrency."""

from __future__ import annotations

import multiprocessing
import os
import re
import sqlite3
import stat
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from smtp_service.storage.messages import SCHEMA_VERSION, MessageLog, UnknownMessage

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


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path) -> str:
    return str(tmp_path / "messages.sqlite3")


@pytest.fixture
def log(db_path: str, clock: FakeClock) -> Iterator[MessageLog]:
    messages = MessageLog(db_path, clock=clock)
    yield messages
    messages.close()


def record(log: MessageLog, account_id: str = "acct-a", message_id: str = "<m1@x>", **kw: Any):
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


def raw(path: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Query the file directly, bypassing MessageLog."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# -- messages -------------------------------------------------------------------------------


def test_record_and_get_round_trip(log: MessageLog) -> None:
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
def test_record_failure_statuses(log: MessageLog, status: str) -> None:
    record(log, status=status, accepted=[], smtp_reply=None)
    got = log.get("acct-a", "<m1@x>")
    assert got is not None
    assert got["status"] == status
    assert got["smtpReply"] is None
    assert [e["type"] for e in got["events"]] == [status]
    assert got["events"][0]["detail"]["reply"] is None


def test_record_rejects_unknown_status(log: MessageLog) -> None:
    with pytest.raises(ValueError):
        record(log, status="queued")
    assert log.get("acct-a", "<m1@x>") is None


def test_get_unknown_message(log: MessageLog) -> None:
    assert log.get("acct-a", "<nope@x>") is None


def test_add_event_appends_in_order(log: MessageLog, clock: FakeClock) -> None:
    record(log)
    clock.advance(1.5)
    log.add_event("acct-a", "<m1@x>", "delivery-delayed", {"reason": "greylisted"})
    clock.advance(0.001)
    log.add_event("acct-a", "<m1@x>", "note")
    events = log.get("acct-a", "<m1@x>")["events"]
    assert events[1:] == [
        {
            "type": "delivery-delayed",
            "at": "2025-11-10T21:00:01.500Z",
            "detail": {"reason": "greylisted"},
        },
        {"type": "note", "at": "2025-11-10T21:00:01.501Z", "detail": None},
    ]


def test_add_event_for_unknown_message_raises(log: MessageLog) -> None:
    with pytest.raises(UnknownMessage):
        log.add_event("acct-a", "<nope@x>", "note")


def test_record_open_counts_and_keeps_first(log: MessageLog, clock: FakeClock) -> None:
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


def test_record_open_unknown_message_writes_nothing(log: MessageLog, db_path: str) -> None:
    assert log.record_open("acct-a", "<nope@x>") is False
    assert raw(db_path, "SELECT count(*) FROM events") == [(0,)]


def test_timestamps_are_utc_iso_with_milliseconds(log: MessageLog, clock: FakeClock) -> None:
    clock.now = 1.0 + 0.0429  # milliseconds are truncated, not rounded, and zero-padded
    record(log)
    assert log.get("acct-a", "<m1@x>")["createdAt"] == "1970-01-01T00:00:01.042Z"
    real = MessageLog(log.path)  # the default clock is the wall clock
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


def test_suppress_round_trip_newest_first(log: MessageLog, clock: FakeClock) -> None:
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
            "messageId": None,
            "createdAt": "2025-11-10T21:00:01.000Z",
        },
        {
            "email": "bad@example.net",
            "reason": "hard bounce",
            "code": 550,
            "enhancedCode": "5.1.1",
            "messageId": "<m1@x>",
            "createdAt": "2025-11-10T21:00:00.000Z",
        },
    ]


def test_suppress_is_an_upsert(log: MessageLog, clock: FakeClock) -> None:
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
            "messageId": "<m2@x>",
            "createdAt": "2025-11-10T21:00:05.000Z",
        }
    ]


def test_suppressed_is_case_insensitive_and_answers_as_given(log: MessageLog) -> None:
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


def test_suppressed_handles_many_addresses(log: MessageLog) -> None:
    log.suppress(
        "acct-a", "u1999@example.net", reason="r", code=None, enhanced_code=None, message_id=None
    )
    asked = [f"u{i}@example.net" for i in range(2000)]  # more than one IN (...) chunk
    assert log.suppressed("acct-a", asked) == ["u1999@example.net"]


def test_unsuppress(log: MessageLog) -> None:
    log.suppress(
        "acct-a", "bad@example.net", reason="r", code=None, enhanced_code=None, message_id=None
    )
    assert log.unsuppress("acct-a", "BAD@example.net") is True
    assert log.unsuppress("acct-a", "bad@example.net") is False
    assert log.suppressions("acct-a") == []
    assert log.suppressed("acct-a", ["bad@example.net"]) == []


# -- idempotency ----------------------------------------------------------------------------


def test_claim_new_then_pending_then_replay(log: MessageLog) -> None:
    assert log.claim("acct-a", "k1", "h1") == ("new", None, None)
    assert log.claim("acct-a", "k1", "h1") == ("pending", None, None)
    log.complete("acct-a", "k1", 200, {"success": True, "messageId": "<m1@x>"})
    assert log.claim("acct-a", "k1", "h1") == (
        "replay",
        200,
        {"success": True, "messageId": "<m1@x>"},
    )
    assert log.claim("acct-a", "k1", "h1")[0] == "replay"  # replays do not use the key up


def test_claim_conflict_pending_and_completed(log: MessageLog) -> None:
    assert log.claim("acct-a", "k1", "h1")[0] == "new"
    assert log.claim("acct-a", "k1", "h2") == ("conflict", None, None)
    log.complete("acct-a", "k1", 200, {"ok": 1})
    assert log.claim("acct-a", "k1", "h2") == ("conflict", None, None)


def test_release_frees_a_pending_claim_only(log: MessageLog) -> None:
    assert log.claim("acct-a", "k1", "h1")[0] == "new"
    log.release("acct-a", "k1")
    assert log.claim("acct-a", "k1", "h2")[0] == "new"  # gone: even another body may use it
    log.complete("acct-a", "k1", 200, {"ok": 1})
    log.release("acct-a", "k1")  # a completed key is kept for replays
    assert log.claim("acct-a", "k1", "h2") == ("replay", 200, {"ok": 1})


def test_claim_expires_after_ttl(log: MessageLog, clock: FakeClock, db_path: str) -> None:
    assert log.claim("acct-a", "k1", "h1")[0] == "new"
    log.complete("acct-a", "k1", 200, {"ok": 1})
    assert log.claim("acct-a", "k2", "h1")[0] == "new"  # left pending
    clock.advance(86400)
    assert log.claim("acct-a", "k1", "h1")[0] == "replay"  # exactly 24 h old: still kept
    clock.advance(0.001)
    assert log.claim("acct-a", "k1", "h2") == ("new", None, None)
    # every expired row of the account went, the stale pending k2 too
    assert raw(db_path, "SELECT key FROM idempotency") == [("k1",)]
    clock.advance(2)
    assert log.claim("acct-a", "k1", "h2", ttl_seconds=1) == ("new", None, None)


def test_abandoned_pending_claim_is_taken_over(log: MessageLog, clock: FakeClock) -> None:
    assert log.claim("acct-a", "k1", "h1")[0] == "new"  # its worker dies: never completed
    clock.advance(299)
    assert log.claim("acct-a", "k1", "h1")[0] == "pending"  # may still be running
    assert log.claim("acct-a", "k1", "h2")[0] == "conflict"  # another body never takes it
    clock.advance(2)
    assert log.claim("acct-a", "k1", "h1") == ("new", None, None)  # abandoned: retry proceeds
    assert log.claim("acct-a", "k1", "h1")[0] == "pending"  # and the takeover is a claim
    log.complete("acct-a", "k1", 200, {"ok": 1})
    clock.advance(1000)
    assert log.claim("acct-a", "k1", "h1") == ("replay", 200, {"ok": 1})  # completed: kept


def test_claim_expiry_with_the_wall_clock(db_path: str) -> None:
    real = MessageLog(db_path)
    try:
        assert real.claim("acct-a", "k1", "h1", ttl_seconds=1)[0] == "new"
        assert real.claim("acct-a", "k1", "h1", ttl_seconds=1)[0] == "pending"
        time.sleep(1.1)
        assert real.claim("acct-a", "k1", "h1", ttl_seconds=1)[0] == "new"
    finally:
        real.close()


# -- account isolation ----------------------------------------------------------------------


def test_accounts_cannot_see_or_change_each_others_rows(log: MessageLog, clock: FakeClock) -> None:
    record(log, account_id="acct-a")
    log.suppress(
        "acct-a", "bad@example.net", reason="r", code=550, enhanced_code=None, message_id=None
    )
    assert log.claim("acct-a", "k1", "h1")[0] == "new"
    log.complete("acct-a", "k1", 200, {"secret": "a"})
    assert log.claim("acct-a", "k2", "h1")[0] == "new"  # pending

    assert log.get("acct-b", "<m1@x>") is None
    assert log.record_open("acct-b", "<m1@x>") is False
    with pytest.raises(UnknownMessage):
        log.add_event("acct-b", "<m1@x>", "note")
    assert log.suppressions("acct-b") == []
    assert log.suppressed("acct-b", ["bad@example.net"]) == []
    assert log.unsuppress("acct-b", "bad@example.net") is False
    # B's keys are B's own: A's completed response is never replayed to B
    assert log.claim("acct-b", "k1", "h1") == ("new", None, None)
    log.complete("acct-b", "k2", 500, {"secret": "b"})  # must not complete A's pending k2
    log.release("acct-b", "k2")  # nor release it
    clock.advance(10)
    assert log.claim("acct-b", "k3", "h1", ttl_seconds=1)[0] == "new"  # expires B's rows only

    a = log.get("acct-a", "<m1@x>")
    assert a["opens"] == 0 and [e["type"] for e in a["events"]] == ["sent"]
    assert [s["email"] for s in log.suppressions("acct-a")] == ["bad@example.net"]
    assert log.claim("acct-a", "k1", "h1") == ("replay", 200, {"secret": "a"})
    assert log.claim("acct-a", "k2", "h1") == ("pending", None, None)


def test_same_message_id_in_two_accounts_stays_apart(log: MessageLog) -> None:
    record(log, account_id="acct-a", subject="for a")
    record(log, account_id="acct-b", subject="for b")
    assert log.record_open("acct-b", "<m1@x>") is True
    a, b = log.get("acct-a", "<m1@x>"), log.get("acct-b", "<m1@x>")
    assert (a["subject"], a["opens"], len(a["events"])) == ("for a", 0, 1)
    assert (b["subject"], b["opens"], len(b["events"])) == ("for b", 1, 2)


# -- the file and the connection ------------------------------------------------------------


def test_files_are_private_and_wal_is_on(db_path: str, log: MessageLog) -> None:
    old = os.umask(0)  # even a permissive umask must not widen the files
    try:
        record(log)
    finally:
        os.umask(old)
    for suffix in ("", "-wal", "-shm"):
        assert stat.S_IMODE(os.stat(db_path + suffix).st_mode) == 0o600, suffix
    assert raw(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert raw(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    conn = log._db()
    assert conn.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
    assert conn.execute("PRAGMA busy_timeout").fetchone() == (5000,)
    assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)


def test_nothing_is_opened_until_first_use(db_path: str) -> None:
    MessageLog(db_path)
    assert not os.path.exists(db_path)


def test_reopening_keeps_data_and_schema(db_path: str, clock: FakeClock) -> None:
    first = MessageLog(db_path, clock=clock)
    record(first)
    first.close()
    first.close()  # closing twice is harmless
    second = MessageLog(db_path, clock=clock)
    try:
        assert second.get("acct-a", "<m1@x>")["subject"] == "Hello"
        assert first.get("acct-a", "<m1@x>")["subject"] == "Hello"  # reopened lazily
    finally:
        first.close()
        second.close()
    assert raw(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_each_thread_has_its_own_connection(log: MessageLog) -> None:
    record(log)
    mine = log._db()
    seen: list[Any] = []

    def work() -> None:
        try:
            seen.append(log._db())
            seen.append(log.get("acct-a", "<m1@x>")["subject"])
        finally:
            log.close()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen[0] is not mine and seen[1] == "Hello"
    assert log._db() is mine


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_connection_from_before_a_fork_is_not_used_in_the_child(log: MessageLog) -> None:
    record(log)
    inherited = log._db()
    with warnings.catch_warnings():  # Python 3.12+ warns about forking with threads running
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        code = 1
        try:
            record(log, message_id="<child@x>")
            fresh = log._db()
            ok = fresh is not inherited and fresh.pid == os.getpid()
            ok = ok and log.get("acct-a", "<m1@x>") is not None
            log.close()
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert log._db() is inherited  # the parent's connection is untouched and still works
    assert log.get("acct-a", "<child@x>")["status"] == "sent"


def test_claim_race_between_threads(db_path: str) -> None:
    log = MessageLog(db_path)
    barrier = threading.Barrier(8)
    results: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait()
            results.append(log.claim("acct-a", "race", "h")[0])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            log.close()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == ["new"] + ["pending"] * 7


# -- many processes, many threads -----------------------------------------------------------

PROCESSES = 4
THREADS = 4
MESSAGES = 100


def _process(path: str, index: int, start: Any, results: Any) -> None:
    """One worker process: THREADS threads each record MESSAGES messages and open each one."""
    log = MessageLog(path)
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
        finally:
            log.close()

    start.wait()  # every process starts writing at once
    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put((index, errors, claims))


def test_many_processes_and_threads_write_at_once(db_path: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_process, args=(db_path, p, start, results)) for p in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    try:
        reports = [results.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
        results.close()
        results.join_thread()
    assert [p.exitcode for p in procs] == [0] * PROCESSES

    errors = [e for _, errs, _ in reports for e in errs]
    assert errors == []  # no "database is locked", nothing missing
    claims = sorted(c for _, _, cs in reports for c in cs)
    assert claims == ["new"] + ["pending"] * (PROCESSES * THREADS - 1)

    total = PROCESSES * THREADS * MESSAGES
    assert raw(db_path, "SELECT count(*), sum(opens) FROM messages") == [(total, total)]
    assert raw(db_path, "SELECT type, count(*) FROM events GROUP BY type ORDER BY type") == [
        ("open", total),
        ("sent", total),
    ]
    assert raw(db_path, "SELECT account_id, count(*) FROM suppressions GROUP BY 1") == [
        ("acct-0", MESSAGES),
        ("acct-1", MESSAGES),
    ]
    log = MessageLog(db_path)
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
        log = MessageLog(str(tmp_path / f"fresh-{run}.sqlite3"))
        barrier = threading.Barrier(8)

        def work(log: MessageLog = log, barrier: threading.Barrier = barrier) -> None:
            try:
                barrier.wait()
                log.suppressed("acct-a", ["x@example.net"])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            finally:
                log.close()

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_writers_queue_on_the_gate_across_processes(log: MessageLog, db_path: str) -> None:
    """A writer waits for the write gate (a flock another process holds) instead of meeting
    SQLite's sleeping busy handler; it goes on, and succeeds, as soon as the gate is free."""
    import subprocess
    import sys

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


def test_the_gate_is_per_process_after_a_fork(log: MessageLog) -> None:
    """A forked child writes through its own gate, even if the parent holds its own meanwhile
    in another thread (a copied, locked thread lock would hang the child forever)."""
    record(log, message_id="<before@x>")
    ctx = multiprocessing.get_context("fork")
    hold = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with log._gate._lock:  # the parent's thread lock, held across the fork
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


def _child_write(log: MessageLog) -> None:
    record(log, message_id="<from-child@x>")
