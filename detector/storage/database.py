"""Engines for the supported backends (SQLite, PostgreSQL) and the Alembic migrations, run from code.

The migration scripts ship inside the package, so `upgrade` works from an installed wheel without an
`alembic.ini`; the `alembic.ini` at the repository root only serves developers writing new revisions.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, Connection, make_url

from detector.settings import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Page cache per connection, filled only as used: the seen-event index outgrows the 2 MiB default within
# minutes, and every batch then re-reads its pages.
_SQLITE_CACHE_KIB = 64 * 1024

# Any fixed number: the PostgreSQL advisory lock that serialises migrations of one database.
_MIGRATION_LOCK_KEY = 0x6D69_615F_6D69_67  # "mia_mig"


def normalize_url(url: str) -> URL:
    """Parse `url`, sending plain `postgresql://` and `postgres://` URLs to the psycopg (3) driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def create_engine_for(url: str, busy_timeout_seconds: float = 30.0) -> Engine:
    """An engine for `url`, tuned for this workload.

    SQLite gets a write-ahead log (readers do not block the writer), `synchronous=FULL` (a commit survives a
    power cut, so Kafka offsets committed after it never run ahead of what is stored; the pipeline commits
    in batches, so the fsync per commit is cheap), a 64 MiB page cache and a busy timeout (how long a
    statement waits for another connection's lock before failing); the parent directory of a database file
    is created when missing. PostgreSQL URLs without a driver use psycopg 3.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)
    database = parsed.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed)
    event.listen(engine, "connect", functools.partial(_configure_sqlite_connection, busy_timeout_seconds))
    return engine


def _configure_sqlite_connection(
    busy_timeout_seconds: float, dbapi_connection: Any, _connection_record: Any
) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {round(busy_timeout_seconds * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute(f"PRAGMA cache_size = -{_SQLITE_CACHE_KIB}")
    finally:
        cursor.close()


def open_engine(settings: Settings, migrate: bool | None = None) -> Engine:
    """An engine on the configured database, migrated to the latest schema unless told otherwise (by
    default, as `database.migrate_on_start` says)."""
    engine = create_engine_for(
        settings.database.url.get_secret_value(), busy_timeout_seconds=settings.database.busy_timeout_seconds
    )
    if settings.database.migrate_on_start if migrate is None else migrate:
        upgrade(engine)
    return engine


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration pointing at the packaged migrations, bound to `connection` when given.

    Without a connection, `env.py` connects to `MIA_DATABASE_URL`.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine) -> None:
    """Apply every pending migration to `engine`'s database, all of them or none.

    Concurrent calls, such as detector instances of one consumer group starting together, are serialised:
    the first migrates and the others then find the database at head.
    """
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        elif connection.dialect.name == "sqlite":
            # pysqlite would only begin a transaction at the first INSERT, leaving the DDL before it
            # unprotected; taking the write lock up front makes the whole migration one transaction.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        command.upgrade(alembic_config(connection), "head")


def current_revision(engine: Engine) -> str | None:
    """The migration revision the database is at; None when it was never migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest migration revision shipped with this package."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migration found in {MIGRATIONS_DIR}")
    return head
