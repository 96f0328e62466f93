"""Fixtures of the alert tests: a settable clock and a store on an empty database migrated to head."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from detector.storage import Store, create_engine_for, upgrade
from tests.storage.conftest import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(database_url: str, clock: FakeClock) -> Iterator[Store]:
    """A store on an empty database (SQLite, and PostgreSQL) migrated to head, stamping with `clock`."""
    engine = create_engine_for(database_url)
    try:
        upgrade(engine)
        yield Store(engine, clock=clock)
    finally:
        engine.dispose()
