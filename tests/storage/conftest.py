"""Fixtures of the storage tests: every test runs against SQLite and against a fresh PostgreSQL database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from detector.storage import Store, create_engine_for, upgrade

START = 1_700_000_000.0


class FakeClock:
    """A settable clock (epoch seconds) for the `updated_at` / `created_at` / `seen_at` stamps."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on the empty database, not migrated."""
    engine = create_engine_for(database_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(engine: Engine, clock: FakeClock) -> Store:
    """A store on a database migrated to head."""
    upgrade(engine)
    return Store(engine, clock=clock)
