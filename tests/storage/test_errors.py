"""Database failures are told apart for real: an outage or a lock is retried, a refusal stops the process."""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import pytest

from detector.storage import DurableBatch, SeenEvent, Store, create_engine_for, upgrade
from detector.storage.errors import StorageFailed, StorageUnavailable

from .conftest import START, write

BATCH = DurableBatch(seen_events=[SeenEvent("e1", START, b"0123456789abcdef")])


def migrated_sqlite(path: Path, busy_timeout_seconds: float = 30.0) -> Store:
    engine = create_engine_for(f"sqlite:///{path}", busy_timeout_seconds=busy_timeout_seconds)
    upgrade(engine)
    return Store(engine)


def test_a_sqlite_file_locked_by_another_writer_is_unavailable_then_writable(tmp_path: Path) -> None:
    store = migrated_sqlite(tmp_path / "mia.db", busy_timeout_seconds=0.2)
    other = sqlite3.connect(tmp_path / "mia.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holding the write lock

    with pytest.raises(StorageUnavailable, match="locked"):
        write(store, BATCH)

    other.execute("ROLLBACK")
    write(store, BATCH)
    assert store.count_seen_events() == 1
    other.close()
    store.close()


def test_a_read_only_sqlite_file_fails_for_good(tmp_path: Path) -> None:
    path = tmp_path / "mia.db"
    migrated_sqlite(path).close()
    # Root ignores file modes; a read-only open is what a read-only mount or file gives everyone.
    store = Store(create_engine_for(f"sqlite:///file:{path}?mode=ro&uri=true"))

    with pytest.raises(StorageFailed, match="readonly"):
        write(store, BATCH)
    store.close()


def test_an_unreachable_postgresql_server_is_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the probe is closed
    store = Store(create_engine_for(f"postgresql://nobody@127.0.0.1:{port}/test?connect_timeout=2"))

    with pytest.raises(StorageUnavailable, match="OperationalError"):
        store.seen_digests(["e1"])
    with pytest.raises(StorageUnavailable):
        write(store, BATCH)
