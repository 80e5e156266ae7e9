"""Alembic migrations of the message database, run on a connection the caller holds."""

from __future__ import annotations

import functools

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from smtp_service.storage.database import MIGRATIONS

# The revision that matches the schema written before Alembic (PRAGMA user_version 1).
LEGACY_REVISION = "0001"


@functools.cache
def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


@functools.cache
def head() -> str:
    """The newest revision id."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current(conn: Connection) -> str | None:
    """The database's revision; None for an empty database (or one written before Alembic)."""
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()


def upgrade(conn: Connection, advisory_lock: int | None) -> None:
    """Upgrade to the newest revision inside the caller's transaction on `conn`.

    `advisory_lock` (PostgreSQL) is taken first, for the rest of the transaction, so that one
    migrator runs at a time and the others find the work done. A database written before
    Alembic (tables, no alembic_version) is stamped as LEGACY_REVISION first, then upgraded.
    """
    if advisory_lock is not None:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(advisory_lock)))
    revision = current(conn)
    if revision == head():
        return
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    if revision is None and sa.inspect(conn).has_table("messages"):
        command.stamp(config, LEGACY_REVISION)
    command.upgrade(config, "head")
