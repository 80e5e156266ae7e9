"""The message database under test: SQLite, and PostgreSQL when TEST_DATABASE_URL names one.

Each pytest session gets its own PostgreSQL schema (dropped at the end); each test starts with
empty tables. Where TEST_DATABASE_URL is unset the PostgreSQL cases are skipped with one reason,
which `pytest -ra` prints as one line.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from smtp_service.storage.tables import metadata

PG_ENV = "TEST_DATABASE_URL"
PG_SKIP = f"{PG_ENV} is not set: the PostgreSQL cases are skipped (.ci/run sets it)"
ENGINES = ["sqlite", "postgresql"]


def pg_url() -> str | None:
    """TEST_DATABASE_URL with the psycopg 3 driver, or None."""
    url = os.environ.get(PG_ENV, "").strip()
    if not url:
        return None
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def in_schema(url: str, schema: str) -> str:
    """The URL with `schema` first on the search path (tables and alembic_version land there)."""
    parsed = make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
    return parsed.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_schema_url() -> Iterator[str | None]:
    """A fresh schema for this session on the PostgreSQL server, or None without one."""
    url = pg_url()
    if url is None:
        yield None
        return
    schema = f"test_{os.getpid()}_{secrets.token_hex(3)}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield in_schema(url, schema)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def empty_tables(url: str) -> None:
    """Delete every row the previous test left (the schema stays migrated)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            if sa.inspect(conn).has_table("messages"):
                names = ", ".join(t.name for t in metadata.sorted_tables)
                conn.exec_driver_sql(f"TRUNCATE {names}")
    finally:
        engine.dispose()


@pytest.fixture(params=ENGINES)
def database_url(request: pytest.FixtureRequest, pg_schema_url: str | None, tmp_path) -> str:
    """A database URL for one engine, empty: a file under tmp_path, or the session's schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'messages.sqlite3'}"
    if pg_schema_url is None:
        pytest.skip(PG_SKIP)
    empty_tables(pg_schema_url)
    return pg_schema_url


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line for every PostgreSQL case skipped for want of a server (instead of one a test)."""
    skipped = [
        r
        for r in terminalreporter.stats.get("skipped", [])
        if isinstance(r.longrepr, tuple) and PG_SKIP in str(r.longrepr[2])
    ]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} PostgreSQL cases skipped: {PG_SKIP}")
