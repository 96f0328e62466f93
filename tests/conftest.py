"""Shared fixtures: the embedded Kafka-protocol broker, and settings pointing at it and at a database."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from detector.broker import EmbeddedBroker
from detector.storage import create_engine_for


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


# A role allowed to create databases; each PostgreSQL test gets its own `mia_test_*` database.
POSTGRES_ADMIN_URL = os.environ.get("MIA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database, dropped after the test."""
    if request.param == "sqlite":
        # A directory that does not exist yet: create_engine_for must create it.
        yield f"sqlite:///{tmp_path / 'data' / 'mia.db'}"
        return
    name = f"mia_test_{uuid.uuid4().hex[:16]}"
    admin = create_engine_for(POSTGRES_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield admin.url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()
