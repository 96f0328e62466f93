"""Shared fixtures: the embedded Kafka-protocol broker, and settings pointing at it and at a database."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from detector.broker import EmbeddedBroker
from tests.support import fresh_postgres_database

# Property tests: a bounded run by default (CI), `HYPOTHESIS_PROFILE=long` for a long local search. No example
# database: CI's clone is fresh anyway, and the work tree stays clean.
_HYPOTHESIS = settings(database=None, deadline=None, print_blob=True)
settings.register_profile(
    "ci",
    parent=_HYPOTHESIS,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long", parent=_HYPOTHESIS, max_examples=20_000, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A tansu broker on 127.0.0.1 for the whole test session (memory storage)."""
    log_file = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_file=log_file) as running:
        yield running


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file in the test's directory."""
    return f"sqlite:///{tmp_path / 'mia.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database, dropped after the test."""
    if request.param == "sqlite":
        # A directory that does not exist yet: create_engine_for must create it.
        yield f"sqlite:///{tmp_path / 'data' / 'mia.db'}"
        return
    with fresh_postgres_database() as url:
        yield url
