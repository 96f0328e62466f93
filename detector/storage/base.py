"""What every repository shares: an engine on a supported backend, a clock, and closing."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any, Self, cast

from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection


class Repository:
    """Base of the repositories; `clock` returns the current time in epoch seconds, for the stamps written."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ValueError(
                f"unsupported database backend {engine.dialect.name!r}: use SQLite or PostgreSQL"
            )
        self._engine = engine
        self._clock = clock

    @property
    def engine(self) -> Engine:
        """The engine this repository reads and writes through (other repositories may share it)."""
        return self._engine

    def close(self) -> None:
        """Close every pooled connection (the repository can still be used: it reconnects on demand)."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def lock_sqlite(connection: Connection) -> None:
    """On SQLite, take the database's write lock now, at the start of the transaction."""
    # pysqlite begins a transaction only at the first write, so another writer could change an alert between
    # this transaction reading it and writing it back: take SQLite's write lock before reading. (PostgreSQL
    # locks the rows read instead, with FOR UPDATE.)
    if connection.dialect.name != "sqlite":
        return
    if not cast(sqlite3.Connection, connection.connection.dbapi_connection).in_transaction:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def dialect_insert(connection: Connection, table: type[Any]) -> sqlite.Insert | postgresql.Insert:
    """An INSERT into `table` in the dialect of `connection`, so that it can take an ON CONFLICT clause."""
    if connection.dialect.name == "sqlite":
        return sqlite.insert(table)
    return postgresql.insert(table)
