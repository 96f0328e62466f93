"""What a database failure means for the pipeline: wait and retry, or stop.

The pipeline never guesses from a driver's exception: every read and write it makes goes through
`storage_errors`, which turns SQLAlchemy's exceptions into one of two named outcomes.

- `StorageUnavailable`: the database cannot be reached or is busy (connection refused or lost, a server
  restarting, a SQLite file locked by another writer, a deadlock). Nothing was stored; the same work can be
  tried again later and will then succeed.
- `StorageFailed`: the database refuses the work in a way that waiting will not cure (disk full, a read-only
  file or server, a schema the code does not match, a value it cannot store). The process must stop without
  committing source positions, and an operator must act.

A third refusal is the database's answer, not a failure: `Fenced`, a commit made for partitions whose lease
another member of the consumer group holds now.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from detector.domain import Backpressure

# PostgreSQL SQLSTATEs of a server that will answer again: connection exceptions (class 08), a shutdown or
# restart (57P01-57P03), too many connections (53300), serialisation failures and deadlocks (40001, 40P01),
# a lock timeout (55P03), a standby that is being promoted (25006 read-only transaction).
_PG_TRANSIENT_CLASSES = ("08",)
_PG_TRANSIENT_STATES = frozenset({"57P01", "57P02", "57P03", "53300", "40001", "40P01", "55P03", "25006"})
# SQLite messages of a lock held by another connection: it goes away when that writer commits.
_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "database is busy")


class StorageError(Exception):
    """A database failure, with a one-line description fit for a log line (no SQL, no parameters)."""


class StorageUnavailable(StorageError, Backpressure):
    """The database is unreachable or busy: nothing was stored; retry the same work later (back-pressure on
    the source, with the caller's backoff)."""


class StorageFailed(StorageError):
    """The database refuses the work for good (disk full, read-only, ...): stop, nothing was stored."""


class Fenced(StorageError):
    """Another member of the consumer group has claimed a partition this one was committing for: nothing was
    stored. What this member read and did not store is the new owner's to process; drop it and rejoin."""


def describe(error: BaseException) -> str:
    """The driver's own message, first line only: SQLAlchemy's text would add the statement and every
    bound parameter (event ids, client ids) to the log."""
    original = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    lines = str(original).strip().splitlines()
    return f"{type(original).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")


def is_transient(error: SQLAlchemyError) -> bool:
    """True when the same statement can succeed later without anyone acting on the database."""
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    original = error.orig
    state = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
    if isinstance(state, str) and state:
        return state.startswith(_PG_TRANSIENT_CLASSES) or state in _PG_TRANSIENT_STATES
    module = type(original).__module__
    if module.startswith("sqlite3"):
        message = str(original).lower()
        return any(fragment in message for fragment in _SQLITE_TRANSIENT)
    # A driver error without a SQLSTATE from a network driver: the connection could not be made or broke.
    return module.startswith("psycopg") and type(original).__name__ in ("OperationalError", "InterfaceError")


@contextmanager
def storage_errors(action: str) -> Iterator[None]:
    """Within the block, a SQLAlchemy error becomes `StorageUnavailable` or `StorageFailed`, its message
    `action` (what was being done) and `describe(error)`."""
    try:
        yield
    except SQLAlchemyError as error:
        message = f"{action}: {describe(error)}"
        if is_transient(error):
            raise StorageUnavailable(message) from error
        raise StorageFailed(message) from error
