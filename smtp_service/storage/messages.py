"""The message log, suppression list and idempotency records: one SQLite database in WAL mode."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from smtp_service.timestamps import iso_utc

BUSY_TIMEOUT_MS = 5000
STATUSES = frozenset({"sent", "failed", "bounced"})
_IN_CHUNK = 500  # below SQLite's bound-parameter limit on every version

# Index i upgrades the schema from user_version i to i + 1; append, never edit.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS messages (
            account_id TEXT NOT NULL,
            message_id TEXT NOT NULL,
            status TEXT NOT NULL,
            from_addr TEXT NOT NULL,
            recipients TEXT NOT NULL,
            subject TEXT NOT NULL,
            transport TEXT NOT NULL,
            accepted TEXT NOT NULL,
            rejected TEXT NOT NULL,
            smtp_reply TEXT,
            duration_ms REAL NOT NULL,
            tracking INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            opens INTEGER NOT NULL DEFAULT 0,
            first_opened_at INTEGER,
            PRIMARY KEY (account_id, message_id)
        )""",
        """CREATE TABLE IF NOT EXISTS events (
            id INTEGER PRIMARY KEY,
            account_id TEXT NOT NULL,
            message_id TEXT NOT NULL,
            type TEXT NOT NULL,
            at INTEGER NOT NULL,
            detail TEXT,
            FOREIGN KEY (account_id, message_id)
                REFERENCES messages (account_id, message_id) ON DELETE CASCADE
        )""",
        "CREATE INDEX IF NOT EXISTS events_by_message ON events (account_id, message_id, id)",
        """CREATE TABLE IF NOT EXISTS suppressions (
            account_id TEXT NOT NULL,
            email TEXT NOT NULL,
            reason TEXT NOT NULL,
            code INTEGER,
            enhanced_code TEXT,
            message_id TEXT,
            created_at INTEGER NOT NULL,
            PRIMARY KEY (account_id, email)
        )""",
        """CREATE TABLE IF NOT EXISTS idempotency (
            account_id TEXT NOT NULL,
            key TEXT NOT NULL,
            body_hash TEXT NOT NULL,
            status INTEGER,
            body TEXT,
            created_at INTEGER NOT NULL,
            PRIMARY KEY (account_id, key)
        )""",
        "CREATE INDEX IF NOT EXISTS idempotency_by_age ON idempotency (account_id, created_at)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)


class UnknownMessage(LookupError):
    """The message does not exist for this account."""


class _Connection(sqlite3.Connection):
    """A connection that remembers the process that opened it."""

    pid: int


# Fork safety. SQLite forbids using a connection in a child process, and closing it there would
# run SQLite's unlock code with the parent's lock state. A pid check keeps the child from using
# inherited connections; these references keep it from closing them: a fork clears the other
# threads' thread-locals, which would otherwise deallocate (and so close) their connections.
_live: weakref.WeakSet[_Connection] = weakref.WeakSet()
_live_lock = threading.Lock()
_held_over_fork: list[_Connection] = []
_inherited: list[_Connection] = []  # never used nor closed in this process


def _before_fork() -> None:
    _live_lock.acquire()  # no connection is registered while the fork copies the set
    _held_over_fork.extend(_live)


def _after_fork_in_parent() -> None:
    _held_over_fork.clear()
    _live_lock.release()


def _after_fork_in_child() -> None:
    _inherited.extend(_held_over_fork)
    _held_over_fork.clear()
    _live.clear()
    _live_lock.release()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


class _WriteGate:
    """One writer at a time across the threads and processes of one database, handed over at
    once: a thread lock, then a blocking flock() on `<database>.lock`.

    Without it, concurrent writers meet in SQLite's busy handler, which polls with sleeps of up
    to 100 ms; with 32 writers in two processes that added hundreds of milliseconds to some
    sends. busy_timeout stays as the backstop for writers outside the service (the CLI)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._reset()
        _gates.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                weakref.finalize(self, os.close, self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def after_fork_in_child(self) -> None:
        """The parent's lock state and descriptor are not this process's: start afresh."""
        self._reset()


_gates: weakref.WeakSet[_WriteGate] = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [gate.after_fork_in_child() for gate in list(_gates)])


def _make_private(path: str) -> None:
    # chmod, not umask (process-wide) nor creating the file ourselves: opening and closing a
    # descriptor of the database would drop every POSIX lock this process holds on it.
    for name in (path, path + "-wal", path + "-shm"):
        try:
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, 0o600)
        except FileNotFoundError:
            pass


def _enable_wal(conn: sqlite3.Connection) -> str:
    # Switching a new file to WAL needs it to itself and answers "database is locked" at once,
    # without the busy handler, while another process opens it: retry up to the busy timeout.
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if mode == "wal":  # persistent in the file: only its first opener changes it
                return mode
            return conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def _iso(ms: int) -> str:
    # From integer milliseconds, exactly: a float division could land a microsecond short.
    return iso_utc(datetime.fromtimestamp(ms // 1000, UTC) + timedelta(milliseconds=ms % 1000))


class MessageLog:
    """What was sent, who bounced, and idempotent replies, per account; safe for many writers.

    Each thread of each process has its own connection, opened on first use. Every query is
    scoped to one account_id.
    """

    def __init__(self, path: str, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._local = threading.local()
        self._gate = _WriteGate(path + ".lock")

    # -- connections -------------------------------------------------------------------------

    def _db(self) -> _Connection:
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.pid == os.getpid():
            return conn
        if conn is not None:  # opened before a fork: the parent's, never to be touched here
            _inherited.append(conn)
        self._local.conn = None
        conn = self._open()
        self._local.conn = conn
        return conn

    def _open(self) -> _Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE for writes
            factory=_Connection,
        )
        try:
            conn.pid = os.getpid()
            _make_private(self.path)  # before WAL mode: the -wal and -shm files copy its mode
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            mode = _enable_wal(conn)
            if mode != "wal":
                raise sqlite3.OperationalError(f"{self.path}: WAL mode unavailable ({mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        with _live_lock:
            _live.add(conn)
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process may have migrated meanwhile.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for statements in _MIGRATIONS[version:]:
                for statement in statements:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={max(version, SCHEMA_VERSION)}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front (waiting up to busy_timeout): a deferred
        # transaction that reads and then writes can fail with "database is locked" at once.
        conn = self._db()
        with self._gate.hold():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # some errors (disk full, I/O) already rolled it back
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        # One snapshot for reads spanning several queries.
        conn = self._db()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def _now(self) -> int:
        return int(self._clock() * 1000)

    def close(self) -> None:
        """Close this thread's connection; the next call opens a new one."""
        conn: _Connection | None = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is None:
            return
        if conn.pid != os.getpid():
            _inherited.append(conn)
            return
        with _live_lock:
            _live.discard(conn)
        conn.close()

    # -- messages ----------------------------------------------------------------------------

    def record(
        self,
        *,
        message_id: str,
        account_id: str,
        from_addr: str,
        recipients: list[str],
        subject: str,
        transport: str,
        status: str,
        accepted: list[str],
        rejected: list[dict],
        smtp_reply: str | None,
        duration_ms: float,
        tracking: bool,
    ) -> None:
        """Log one send attempt and its outcome event (type == status)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}")
        now = self._now()
        detail = {"reply": smtp_reply, "accepted": accepted, "rejected": rejected}
        with self._write() as db:
            db.execute(
                "INSERT INTO messages (account_id, message_id, status, from_addr, recipients,"
                " subject, transport, accepted, rejected, smtp_reply, duration_ms, tracking,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    account_id,
                    message_id,
                    status,
                    from_addr,
                    json.dumps(recipients),
                    subject,
                    transport,
                    json.dumps(accepted),
                    json.dumps(rejected),
                    smtp_reply,
                    float(duration_ms),
                    int(bool(tracking)),
                    now,
                ),
            )
            db.execute(
                "INSERT INTO events (account_id, message_id, type, at, detail)"
                " VALUES (?, ?, ?, ?, ?)",
                (account_id, message_id, status, now, json.dumps(detail)),
            )

    def add_event(
        self, account_id: str, message_id: str, type: str, detail: dict | None = None
    ) -> None:
        """Append an event to the account's message; UnknownMessage if it has no such message."""
        with self._write() as db:
            # Inserting through the account's own message row: no row, no event.
            inserted = db.execute(
                "INSERT INTO events (account_id, message_id, type, at, detail)"
                " SELECT account_id, message_id, ?, ?, ? FROM messages"
                " WHERE account_id = ? AND message_id = ?",
                (
                    type,
                    self._now(),
                    None if detail is None else json.dumps(detail),
                    account_id,
                    message_id,
                ),
            ).rowcount
        if not inserted:
            raise UnknownMessage(message_id)

    def get(self, account_id: str, message_id: str) -> dict[str, Any] | None:
        """The account's message with its events, or None when the account has no such message."""
        with self._read() as db:
            row = db.execute(
                "SELECT status, from_addr, recipients, subject, transport, accepted, rejected,"
                " smtp_reply, duration_ms, created_at, opens, first_opened_at FROM messages"
                " WHERE account_id = ? AND message_id = ?",
                (account_id, message_id),
            ).fetchone()
            if row is None:
                return None
            events = db.execute(
                "SELECT type, at, detail FROM events WHERE account_id = ? AND message_id = ?"
                " ORDER BY id",
                (account_id, message_id),
            ).fetchall()
        (status, from_addr, recipients, subject, transport, accepted, rejected) = row[:7]
        smtp_reply, duration_ms, created_at, opens, first_opened_at = row[7:]
        return {
            "messageId": message_id,
            "status": status,
            "from": from_addr,
            "recipients": json.loads(recipients),
            "subject": subject,
            "transport": transport,
            "accepted": json.loads(accepted),
            "rejected": json.loads(rejected),
            "smtpReply": smtp_reply,
            "durationMs": duration_ms,
            "createdAt": _iso(created_at),
            "opens": opens,
            "firstOpenedAt": None if first_opened_at is None else _iso(first_opened_at),
            "events": [
                {"type": t, "at": _iso(at), "detail": None if d is None else json.loads(d)}
                for t, at, d in events
            ],
        }

    def record_open(self, account_id: str, message_id: str) -> bool:
        """Count an open of the account's message; False (nothing written) if it has none such."""
        now = self._now()
        with self._write() as db:
            found = db.execute(
                "UPDATE messages SET opens = opens + 1,"
                " first_opened_at = COALESCE(first_opened_at, ?)"
                " WHERE account_id = ? AND message_id = ?",
                (now, account_id, message_id),
            ).rowcount
            if found:
                db.execute(
                    "INSERT INTO events (account_id, message_id, type, at, detail)"
                    " VALUES (?, ?, 'open', ?, NULL)",
                    (account_id, message_id, now),
                )
        return bool(found)

    # -- suppressions ------------------------------------------------------------------------

    def suppress(
        self,
        account_id: str,
        email: str,
        *,
        reason: str,
        code: int | None,
        enhanced_code: str | None,
        message_id: str | None,
    ) -> None:
        """Stop sending to an address; a repeat replaces the details and the date."""
        with self._write() as db:
            db.execute(
                "INSERT INTO suppressions"
                " (account_id, email, reason, code, enhanced_code, message_id, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (account_id, email) DO UPDATE SET reason = excluded.reason,"
                " code = excluded.code, enhanced_code = excluded.enhanced_code,"
                " message_id = excluded.message_id, created_at = excluded.created_at",
                (account_id, email.lower(), reason, code, enhanced_code, message_id, self._now()),
            )

    def suppressions(self, account_id: str) -> list[dict[str, Any]]:
        """The account's suppressed addresses, newest first."""
        rows = (
            self._db()
            .execute(
                "SELECT email, reason, code, enhanced_code, message_id, created_at"
                " FROM suppressions WHERE account_id = ? ORDER BY created_at DESC, email",
                (account_id,),
            )
            .fetchall()
        )
        return [
            {
                "email": email,
                "reason": reason,
                "code": code,
                "enhancedCode": enhanced_code,
                "messageId": message_id,
                "createdAt": _iso(created_at),
            }
            for email, reason, code, enhanced_code, message_id, created_at in rows
        ]

    def suppressed(self, account_id: str, emails: list[str]) -> list[str]:
        """Those of the addresses the account has suppressed, spelled and ordered as given."""
        wanted = sorted({e.lower() for e in emails})
        found: set[str] = set()
        # One chunk is one statement, a snapshot by itself: no BEGIN/COMMIT around it.
        reading = self._read() if len(wanted) > _IN_CHUNK else contextlib.nullcontext(self._db())
        with reading as db:
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                marks = ", ".join("?" * len(chunk))
                found.update(
                    r[0]
                    for r in db.execute(
                        "SELECT email FROM suppressions"
                        f" WHERE account_id = ? AND email IN ({marks})",
                        (account_id, *chunk),
                    )
                )
        return [e for e in emails if e.lower() in found]

    def unsuppress(self, account_id: str, email: str) -> bool:
        """Allow the address again; True when it was suppressed."""
        with self._write() as db:
            return bool(
                db.execute(
                    "DELETE FROM suppressions WHERE account_id = ? AND email = ?",
                    (account_id, email.lower()),
                ).rowcount
            )

    # -- idempotency -------------------------------------------------------------------------

    def claim(
        self,
        account_id: str,
        key: str,
        body_hash: str,
        ttl_seconds: int = 86400,
        abandoned_seconds: int = 300,
    ) -> tuple[str, dict | None]:
        """Claim an Idempotency-Key: ("new"|"replay"|"conflict"|"pending", stored result).

        The stored result (what complete() stored) comes with "replay" only; None otherwise.

        A claim still pending after `abandoned_seconds` belonged to a worker that died mid-send
        (gunicorn kills a request after 60 s): a retry then takes it over instead of being
        refused for the rest of the day.
        """
        now = self._now()
        with self._write() as db:  # the write lock makes check-then-insert atomic
            db.execute(
                "DELETE FROM idempotency WHERE account_id = ? AND created_at < ?",
                (account_id, now - int(ttl_seconds * 1000)),
            )
            row = db.execute(
                "SELECT body_hash, status, body, created_at FROM idempotency"
                " WHERE account_id = ? AND key = ?",
                (account_id, key),
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO idempotency (account_id, key, body_hash, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (account_id, key, body_hash, now),
                )
                return "new", None
            stored_hash, status, body, created_at = row
            if (
                status is None
                and stored_hash == body_hash
                and created_at < now - int(abandoned_seconds * 1000)
            ):
                db.execute(
                    "UPDATE idempotency SET created_at = ? WHERE account_id = ? AND key = ?",
                    (now, account_id, key),
                )
                return "new", None
        if stored_hash != body_hash:
            return "conflict", None
        if status is None:
            return "pending", None
        return "replay", json.loads(body)

    def complete(self, account_id: str, key: str, result: dict) -> None:
        """Store the result of a claimed key (a JSON-ready dict), for replays."""
        with self._write() as db:
            # status 0 marks the claim completed (NULL is pending); the result is in body.
            db.execute(
                "UPDATE idempotency SET status = 0, body = ? WHERE account_id = ? AND key = ?",
                (json.dumps(result), account_id, key),
            )

    def release(self, account_id: str, key: str) -> None:
        """Drop a pending claim so the request may be retried; completed ones stay."""
        with self._write() as db:
            db.execute(
                "DELETE FROM idempotency WHERE account_id = ? AND key = ? AND status IS NULL",
                (account_id, key),
            )
