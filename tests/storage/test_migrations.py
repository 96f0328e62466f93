"""Migrations build exactly the schema the models describe, on SQLite and on PostgreSQL."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Engine, Integer, MetaData, inspect, text
from sqlalchemy.exc import DBAPIError

import detector
from detector.storage import (
    OutboxStore,
    create_engine_for,
    current_revision,
    database,
    head_revision,
    upgrade,
)
from detector.storage.database import MIGRATIONS_DIR, alembic_config
from detector.storage.tables import Base

TABLES = {
    "sessions",
    "client_states",
    "coordination_pools",
    "risk_decisions",
    "risk_audit",
    "model_scales",
    "dead_letters",
    "consumer_checkpoints",
    "partition_leases",
    "seen_events",
    "alerts",
    "silences",
    "notifications",
}


def schema_differences(engine: Engine, metadata: MetaData) -> list[Any]:
    with engine.connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection), metadata))


def test_upgrade_from_empty_reaches_head(engine: Engine) -> None:
    assert current_revision(engine) is None

    upgrade(engine)

    assert head_revision() == "0012"
    assert current_revision(engine) == "0012"
    assert set(inspect(engine).get_table_names()) == {*TABLES, "alembic_version"}


def test_migrated_schema_matches_the_models(engine: Engine) -> None:
    upgrade(engine)

    assert schema_differences(engine, Base.metadata) == []


def test_comparison_reports_drift(engine: Engine) -> None:
    # Guards the test above: a model change without a migration must show up as a difference.
    upgrade(engine)
    drifted = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["sessions"].append_column(Column("risk", Integer, nullable=True))

    differences = schema_differences(engine, drifted)

    assert [(kind, column.name) for kind, _schema, _table, column in differences] == [("add_column", "risk")]


def test_upgrade_twice_changes_nothing(engine: Engine) -> None:
    upgrade(engine)
    upgrade(engine)

    assert current_revision(engine) == head_revision()
    assert schema_differences(engine, Base.metadata) == []


def test_downgrade_to_base_then_upgrade_again(engine: Engine) -> None:
    upgrade(engine)
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")

    assert current_revision(engine) is None
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}

    upgrade(engine)
    assert schema_differences(engine, Base.metadata) == []


def test_alerts_stored_before_reasons_had_their_text_get_it(engine: Engine) -> None:
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0004")
        connection.execute(
            text(
                "INSERT INTO alerts (dedup_key, model, client_id, client_ids, kind, severity, status,"
                " rule_id, score, threshold, reasons, evidence, atlas_technique, triage, first_seen,"
                " last_seen, raised_at, updated_at, queries, updates)"
                " VALUES ('m|c|k', 'm', 'c', '[\"c\"]', 'boundary_probing', 'high', 'open', 'MIA-002',"
                " 5, 4, :reasons, '[]', 'AML.T0024', '', :t, :t, :t, :t, 10, 0)"
            ),
            {
                "reasons": '[{"feature": "probing.flips", "value": 12.0, "baseline_percentile": 99.5}]',
                "t": "2026-11-29 08:00:00.000000",
            },
        )

    upgrade(engine)

    with engine.connect() as connection:
        stored = connection.execute(text("SELECT reasons FROM alerts")).scalar_one()
    reasons = orjson.loads(stored) if isinstance(stored, str) else stored
    assert reasons == [
        {
            "feature": "probing.flips",
            "value": 12.0,
            "baseline_percentile": 99.5,
            "text": "probing.flips = 12 (p99.5 of baseline)",
        }
    ]


def test_notifications_queued_before_the_one_alert_shape_are_still_delivered(engine: Engine) -> None:
    # The alert inside a notification queued by an older version has no `updated_at` and reasons without
    # their `text`: after the upgrade the dispatcher must read it, not stall the sink's queue on it.
    payload = {
        "idempotency_key": "k-1",
        "event": "opened",
        "created_at": "2026-11-29T08:00:00.000Z",
        "alert": {
            "id": 1,
            "dedup_key": "m|c|boundary_probing",
            "model": "m",
            "client_ids": ["c"],
            "kind": "boundary_probing",
            "severity": "high",
            "status": "open",
            "rule_id": "MIA-001",
            "score": 5.0,
            "threshold": 4.0,
            "reasons": [{"feature": "probing.flips", "value": 5.0, "baseline_percentile": None}],
            "evidence": ["e1"],
            "atlas_technique": "AML.T0024",
            "triage": "",
            "first_seen": "2026-11-29T07:50:00.000Z",
            "last_seen": "2026-11-29T07:59:00.000Z",
            "raised_at": "2026-11-29T08:00:00.000Z",
            "resolved_at": None,
            "acknowledged_at": None,
            "queries": 40,
        },
    }
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0004")
        connection.execute(
            text(
                "INSERT INTO notifications (alert_id, sink, idempotency_key, event, payload, status,"
                " attempts, next_attempt_at, created_at)"
                " VALUES (1, 'webhook', 'k-1', 'opened', :payload, 'pending', 0, :t, :t)"
            ),
            {"payload": orjson.dumps(payload).decode(), "t": "2026-11-29 08:00:00.000000"},
        )

    upgrade(engine)

    [queued] = OutboxStore(engine).head("webhook", 10)
    assert queued.notification.alert.updated_at == queued.notification.alert.raised_at
    assert [reason.text for reason in queued.notification.alert.reasons] == ["probing.flips = 5"]


def test_alembic_command_without_connection_uses_environment(
    database_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIA_DATABASE_URL", database_url)

    command.upgrade(alembic_config(), "head")

    assert current_revision(engine) == head_revision()


def test_migrations_need_no_ini_file_nor_working_directory(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    upgrade(engine)

    assert current_revision(engine) == head_revision()


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "mia.db"
    engine = create_engine_for(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            pragmas = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "busy_timeout", "cache_size")
            }
    finally:
        engine.dispose()

    assert path.parent.is_dir()
    assert pragmas == {"journal_mode": "wal", "synchronous": 2, "busy_timeout": 30_000, "cache_size": -65_536}


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://u@db:5432/mia", "postgresql+psycopg"),
        ("postgres://u@db:5432/mia", "postgresql+psycopg"),
        ("postgresql+psycopg://u@db:5432/mia", "postgresql+psycopg"),
        ("sqlite:///:memory:", "sqlite"),
    ],
)
def test_engine_driver(url: str, driver: str) -> None:
    engine = create_engine_for(url)  # no connection is made until first use

    assert engine.url.drivername == driver
    engine.dispose()


def test_upgrade_in_memory_sqlite() -> None:
    engine = create_engine_for("sqlite://")
    try:
        upgrade(engine)

        assert current_revision(engine) == head_revision()
        assert schema_differences(engine, Base.metadata) == []
    finally:
        engine.dispose()


@pytest.mark.slow
def test_concurrent_upgrades_are_serialised(database_url: str, engine: Engine) -> None:
    # Separate processes, as detector instances are: Alembic's migration context is global to a process.
    script = (
        "import sys; from detector.storage import create_engine_for, upgrade; "
        "upgrade(create_engine_for(sys.argv[1]))"
    )
    repo_root = Path(detector.__file__).resolve().parents[1]
    workers = [
        subprocess.Popen([sys.executable, "-c", script, database_url], cwd=repo_root, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    outcomes = [(worker.communicate(timeout=120)[1], worker.returncode) for worker in workers]
    failures = [stderr.decode() for stderr, returncode in outcomes if returncode != 0]

    assert failures == []
    assert current_revision(engine) == head_revision()
    assert schema_differences(engine, Base.metadata) == []


def test_a_failed_migration_leaves_the_database_untouched(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The packaged migrations plus one that fails after them: none of them may stay applied.
    scripts = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "9999_broken.py").write_text(
        "from alembic import op\n"
        f"revision = 'broken'\ndown_revision = {head_revision()!r}\n"
        "def upgrade():\n    op.execute('SELECT * FROM no_such_table')\n"
        "def downgrade():\n    pass\n"
    )
    monkeypatch.setattr(database, "MIGRATIONS_DIR", scripts)

    with pytest.raises(DBAPIError, match="no_such_table"):
        upgrade(engine)

    assert current_revision(engine) is None
    assert set(inspect(engine).get_table_names()) == set()
