"""The message database: one SQLAlchemy engine on SQLite (embedded) or PostgreSQL (shared by
several instances), its migrations, and transactions for the stores built on it."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.sql.expression import Executable

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000
DEFAULT_GATE_SECONDS = 9.0  # write_gate_seconds(150, 30): create_app passes the configured one
MIGRATIONS = Path(__file__).with_name("migrations")
# pg_advisory_xact_lock key: one migrator at a time across every instance of one database.
_MIGRATION_LOCK_KEY = 0x736D7470  # "smtp"


class Row(dict):
    """One result row: a dict of column name -> value that also reads as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _rows(cursor: Any) -> list[Row]:
    names = [d[0] for d in cursor.description]
    return [Row(zip(names, values, strict=True)) for values in cursor.fetchall()]


class Transaction:
    """The statements of one write transaction, on one pooled DBAPI connection."""

    def __init__(self, db: Database, raw: Any) -> None:
        self._db = db
        self._raw = raw

    def execute(self, statement: Executable, params: Mapping[str, Any] | None = None) -> Any:
        """Run one statement in the transaction; the DBAPI cursor (rowcount, fetchone())."""
        return self._db.execute(self._raw, statement, params)

    def rows(self, statement: Executable, params: Mapping[str, Any] | None = None) -> list[Row]:
        """The rows of one statement in the transaction."""
        return _rows(self.execute(statement, params))


class DatabaseError(Exception):
    """The database cannot be used as configured (a bad URL, an unknown driver); one line."""


class StorageBusy(Exception):
    """A write could not have the SQLite write gate within its bound (another writer, in this
    process or another, held it all that time); nothing was written. The text holds no data."""


def write_gate_seconds(deadline_seconds: float, takeover_margin_seconds: float) -> float:
    """How long a write may wait for the SQLite write gate (Database's `gate_timeout`).

    A send makes at most two writes (its idempotency claim, then its record), each of which may
    wait for the gate and then for SQLite's busy timeout (writers outside the service), and it
    must have made them before its claim may be taken over, `deadline_seconds`
    (SMTP_DEADLINE) plus `takeover_margin_seconds` after the claim: the two writes share that
    margin, less 2 s for building the message, and none waits longer than a whole send may
    take. With SMTP_DEADLINE 150 s and the margin of 30 s: 9 s. Seconds, at least 0.1.
    """
    share = (takeover_margin_seconds - 2 * BUSY_TIMEOUT_MS / 1000 - 2.0) / 2
    return max(0.1, min(deadline_seconds, share))


def storable(text: str) -> bool:
    """False for text no supported database can hold (PostgreSQL refuses NUL in text): no row
    is keyed by it, so a look-up by it finds nothing instead of failing."""
    return "\x00" not in text


def sqlite_url(path: str) -> str:
    """The SQLAlchemy URL of an SQLite file at `path` (absolute or relative to the cwd)."""
    return f"sqlite:///{os.path.abspath(path)}"


class Database:
    """An engine, safe across threads and forks, with explicit read and write transactions.

    SQLite: every connection runs in WAL mode with a 5 s busy timeout; writes take the write
    lock up front (BEGIN IMMEDIATE) after a write gate (a thread lock and a flock() on
    `<file>.lock`) so that writers queue instead of meeting SQLite's polling busy handler; a
    write waits for the gate at most `gate_timeout` seconds (write_gate_seconds()), then raises
    StorageBusy. The file and its -wal, -shm and .lock companions are made private (0600).
    PostgreSQL: READ COMMITTED transactions; the stores use row locks and ON CONFLICT.
    After a fork the child drops the parent's pooled connections without closing them (the
    SQLAlchemy recipe), and opens its own on first use.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        clock: Callable[[], float] = time.time,
        gate_timeout: float = DEFAULT_GATE_SECONDS,
    ) -> None:
        try:
            parsed = make_url(url)
        except sa.exc.ArgumentError:
            raise DatabaseError("DATABASE_URL is not a database URL") from None
        self.url = parsed
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise DatabaseError(f"DATABASE_URL must be sqlite or postgresql, not {self.dialect}")
        self._clock = clock
        self.path: str | None = parsed.database if self.dialect == "sqlite" else None
        if self.dialect == "sqlite" and not self.path:
            raise DatabaseError("DATABASE_URL names no SQLite file")
        try:
            self.engine = self._make_engine(pool_size, gate_timeout)
        except (sa.exc.ArgumentError, ImportError) as exc:
            raise DatabaseError(f"DATABASE_URL cannot be used: {type(exc).__name__}") from None
        self._gate = _WriteGate(self.path + ".lock") if self.path else None
        self.gate_timeout = gate_timeout  # seconds a write() waits for the gate (SQLite)
        self._migrated = False
        self._migrate_lock = threading.Lock()
        self._local = threading.local()  # the thread's open write transaction, if any
        self._statements: dict[tuple, tuple] = {}  # compiled SQL per statement (and columns)
        _live.add(self)
        # Connections are closed (not dropped) when the Database goes away.
        weakref.finalize(self, self.engine.dispose)

    def _after_fork_in_child(self) -> None:
        # The SQLAlchemy recipe: forget the parent's pooled connections without closing them
        # (closing would talk to the parent's server session or SQLite lock state).
        self.engine.dispose(close=False)
        if self._gate is not None:
            self._gate.reset()

    def _make_engine(self, pool_size: int, gate_timeout: float) -> Engine:
        if self.dialect == "postgresql":
            return sa.create_engine(
                self.url,
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_pre_ping=True,
            )
        engine = sa.create_engine(
            self.url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_timeout=gate_timeout,  # writers wait for a connection before the gate
            connect_args={"timeout": BUSY_TIMEOUT_MS / 1000},
        )
        path = self.path
        assert path is not None

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI objects
            # pysqlite begins a transaction itself before the first INSERT, UPDATE or DELETE;
            # IMMEDIATE makes that BEGIN take the write lock up front (waiting up to the busy
            # timeout): a deferred one that reads and then writes can fail at once with
            # "database is locked". Every write transaction here starts with such a statement;
            # a lone SELECT runs outside a transaction, a snapshot by itself. (A "begin" event
            # listener would do the same at a cost on every statement of every connection.)
            dbapi_conn.isolation_level = "IMMEDIATE"
            _make_private(path)  # before WAL: the -wal and -shm files copy its mode
            dbapi_conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            mode = _enable_wal(dbapi_conn)
            if mode != "wal":
                raise sa.exc.OperationalError("PRAGMA journal_mode", None, Exception(mode))
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")
            dbapi_conn.execute("PRAGMA foreign_keys=ON")

        return engine

    # -- transactions ------------------------------------------------------------------------

    def now_ms(self) -> int:
        """The clock, in integer milliseconds since the epoch."""
        return int(self._clock() * 1000)

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        """A write transaction, committed when the block ends and rolled back if it raises.

        Nested in another write() of the same thread, it is part of that one: several stores'
        writes then commit or roll back together. On SQLite, raises StorageBusy (nothing
        written) when the write gate could not be had within `gate_timeout` seconds.
        """
        current: Transaction | None = getattr(self._local, "tx", None)
        if current is not None:
            yield current
            return
        self._ready()
        # The connection comes from the pool before the gate and goes back after it: the gate
        # is held for the transaction alone, not for the pool's Python code, which may wait
        # for the GIL while every other writer of both processes waits for the gate. (A writer
        # waiting for the gate holds a pooled connection meanwhile; on SQLite the pool's own
        # wait is bounded by gate_timeout too.)
        until = time.monotonic() + self.gate_timeout  # the pool's wait counts toward it
        raw = self.engine.raw_connection()
        try:
            with self._gate.hold(self.gate_timeout, until) if self._gate else nullcontext():
                try:
                    tx = Transaction(self, raw)
                    self._local.tx = tx
                    try:
                        yield tx
                    finally:
                        self._local.tx = None
                    raw.commit()
                except BaseException:
                    raw.rollback()
                    raise
        finally:
            raw.close()  # back to the pool

    def query(self, statement: Executable, params: Mapping[str, Any] | None = None) -> list[Row]:
        """The rows of one read-only statement, a snapshot by itself (on SQLite outside a
        transaction), each readable by column name."""
        self._ready()
        raw = self.engine.raw_connection()
        try:
            return _rows(self.execute(raw, statement, params))
        finally:
            raw.close()  # back to the pool, which ends PostgreSQL's implicit transaction

    def execute(self, raw: Any, statement: Executable, params: Mapping[str, Any] | None) -> Any:
        """Run `statement` on the DBAPI connection `raw`; the DBAPI cursor.

        SQLAlchemy compiles each statement once per dialect (and, for an INSERT, per set of
        columns given); the SQL then runs on the pooled DBAPI connection itself. Through
        SQLAlchemy's Connection every statement cost about 150 us more than the statement
        (measured with bench/send_cpu.py), twice per send.
        """
        params = params or {}
        sql, names, defaults = self._compiled(statement, params)
        values = {**defaults, **params}
        cursor = raw.cursor()
        cursor.execute(sql, [values[n] for n in names] if names is not None else values)
        return cursor

    def _compiled(self, statement: Executable, params: Mapping[str, Any]) -> tuple:
        columns = tuple(sorted(params)) if isinstance(statement, sa.Insert) else None
        key = (id(statement), columns)
        found = self._statements.get(key)
        if found is None or found[0] is not statement:
            compiled = statement.compile(
                dialect=self.engine.dialect,
                column_keys=list(columns) if columns is not None else None,
            )
            # Every bind parameter's value when the caller gives none: the literals the
            # statement holds (.values(type="open")), None for the rest.
            defaults = compiled.construct_params({}, _check=False)
            found = (statement, compiled.string, compiled.positiontup, defaults)
            self._statements[key] = found  # the statement is kept, so its id is not reused
        return found[1:]

    def ping(self) -> None:
        """SELECT 1 on a pooled connection (PostgreSQL's are checked before use, so a server
        that went away costs one reconnection attempt). Raises the driver's error when the
        database cannot be reached; the text of it may hold the URL, so callers name its type."""
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("SELECT 1")
            cursor.fetchall()
        finally:
            raw.close()

    def dispose(self) -> None:
        """Close every pooled connection; the next use opens new ones."""
        self.engine.dispose()

    # -- migrations --------------------------------------------------------------------------

    def _ready(self) -> None:
        if not self._migrated:
            self.migrate()

    def migrate(self) -> None:
        """Bring the schema up to the newest migration (Alembic), once per process.

        Safe when several workers and instances start at once: on PostgreSQL a transaction-level
        advisory lock, on SQLite the write lock (and the write gate), serialise the migrators,
        and each reads the current revision only once it holds the lock. A file written before
        Alembic was used (the schema of PRAGMA user_version 1) is adopted as revision 0001.
        """
        with self._migrate_lock:
            if self._migrated:
                return
            from smtp_service.storage.migrate import upgrade

            if self._gate is None:
                with self.engine.begin() as conn:
                    upgrade(conn, _MIGRATION_LOCK_KEY)
            else:
                with self._gate.hold(), self.engine.begin() as conn:
                    conn.exec_driver_sql("BEGIN IMMEDIATE")  # DDL would not begin one itself
                    upgrade(conn, None)
            self._migrated = True


class _WriteGate:
    """One SQLite writer at a time across the threads and processes of one file: a thread lock,
    handed over at once, then a flock() on `<database>.lock`; hold() may wait with a limit.

    Without it, concurrent writers meet in SQLite's busy handler, which polls with sleeps of up
    to 100 ms; with 32 writers in two processes that added hundreds of milliseconds to some
    sends. busy_timeout stays as the backstop for writers outside the service."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reset()

    def reset(self) -> None:
        """Forget the lock and descriptor (in a forked child: they are the parent's)."""
        # After a fork the parent's lock state and descriptor are not the child's: start afresh.
        self._lock = threading.Lock()
        self._fd: int | None = None

    @contextmanager
    def hold(self, timeout: float | None = None, until: float | None = None) -> Iterator[None]:
        """Hold the gate for the block, waiting for it at most `timeout` seconds (None: as
        long as it takes, for migrations at start-up), or until `until` (time.monotonic()) when
        given (a wait that began earlier); StorageBusy when that passed.

        Within the process the thread lock is handed over at once. flock() cannot wait with a
        limit, so while another process holds it the gate is tried again after a pause that
        starts at 0.1 ms and doubles up to 5 ms (a write holds it for a fraction of that)."""
        if timeout is None:
            until = None
            self._lock.acquire()
        else:
            if until is None:
                until = time.monotonic() + timeout
            if not self._lock.acquire(timeout=max(until - time.monotonic(), 0.0)):
                raise StorageBusy(f"no write slot in the message database within {timeout:g} s")
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                weakref.finalize(self, os.close, self._fd)
            if until is None:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            else:
                _flock_until(self._fd, until, timeout)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._lock.release()


def _flock_until(fd: int, until: float, timeout: float) -> None:
    """flock(LOCK_EX) on `fd` by `until` (time.monotonic()), else StorageBusy."""
    pause = 0.0001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        left = until - time.monotonic()
        if left <= 0:
            raise StorageBusy(f"no write slot in the message database within {timeout:g} s")
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.005)


# os.register_at_fork cannot be undone, so one hook serves every live Database.
_live: weakref.WeakSet[Database] = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [db._after_fork_in_child() for db in list(_live)])


def _make_private(path: str) -> None:
    # chmod, not umask (process-wide) nor creating the file ourselves: opening and closing a
    # descriptor of the database would drop every POSIX lock this process holds on it.
    for name in (path, path + "-wal", path + "-shm"):
        try:
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, 0o600)
        except FileNotFoundError:
            pass


def _enable_wal(conn) -> str:  # noqa: ANN001 - a DBAPI sqlite3 connection
    # Switching a new file to WAL needs it to itself and answers "database is locked" at once,
    # without the busy handler, while another process opens it: retry up to the busy timeout.
    import sqlite3

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
