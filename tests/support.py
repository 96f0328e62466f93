"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import orjson
import pytest

from detector.alerts.canary import canary_missed, canary_recovered
from detector.broker import EmbeddedBroker
from detector.domain import (
    Alert,
    AlertKind,
    AlertStatus,
    Canary,
    CanaryClients,
    Exposure,
    Notification,
    NotificationEvent,
    Reason,
    Severity,
)
from detector.settings import Settings, load_settings
from detector.storage import create_engine_for

# The Kafka consumer the tests' daemons and sources use: `kafka-python` unless `make test-confluent` runs the
# Kafka tests again on `confluent`.
KAFKA_CLIENT = os.environ.get("MIA_TEST_KAFKA_CLIENT", "kafka-python")


def unique(prefix: str) -> str:
    """A name no other test uses (topics and groups outlive a test on the shared broker)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_settings(
    database_url: str, broker: EmbeddedBroker | None = None, **groups: dict[str, Any]
) -> Settings:
    """Settings for a test: the given database, the test broker, a fresh topic and group, quick commits."""
    kafka: dict[str, Any] = {
        "topics": [unique("logs")],
        "group_id": unique("group"),
        "session_timeout_ms": 6000,
        "client": KAFKA_CLIENT,
    }
    if broker is not None:
        kafka["bootstrap_servers"] = broker.bootstrap_servers
    kafka.update(groups.pop("kafka", {}))
    commit = {"min_records": 500, "min_interval_seconds": 0.5} | groups.pop("commit", {})
    # No metrics endpoint unless a test asks for one: tests must not compete for a fixed port.
    metrics = {"addr": ""} | groups.pop("metrics", {})
    database = {"url": database_url} | groups.pop("database", {})
    return load_settings(None, database=database, kafka=kafka, commit=commit, metrics=metrics, **groups)


# Every time an alert carries.
ALERT_TIMES = (
    "first_seen",
    "last_seen",
    "detected_at",
    "raised_at",
    "updated_at",
    "resolved_at",
    "acknowledged_at",
)


def as_written(notification: Notification) -> Notification:
    """`notification` as its JSON carries it (the outbox, a webhook's body): every time to the millisecond,
    as RFC 3339 writes them; everything else as it is."""
    alert = notification.alert
    times = {
        name: _millisecond(moment) for name in ALERT_TIMES if (moment := getattr(alert, name)) is not None
    }
    return notification.model_copy(
        update={
            "alert": alert.model_copy(update=times),
            "created_at": _millisecond(notification.created_at),
        }
    )


def _millisecond(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def make_notification(
    event: NotificationEvent = NotificationEvent.OPENED,
    *,
    alert_id: int = 7,
    sequence: int = 1,
    severity: Severity = Severity.HIGH,
    previous_severity: Severity | None = None,
    client_ids: tuple[str, ...] = ("client-17",),
    kind: AlertKind = AlertKind.TRAINING_SET_TARGETING,
    dashboard_url: str | None = "https://grafana.example/d/mia-client?var-client=client-17",
) -> Notification:
    """A realistic notification of one alert (resolved and canary_recovered ones carry `resolved_at`)."""
    now = datetime.now(UTC)
    resolved = event.ends_alert
    alert = Alert(
        id=alert_id,
        dedup_key=f"credit-risk|{','.join(client_ids)}|{kind.value}",
        model="credit-risk",
        client_ids=list(client_ids),
        kind=kind,
        severity=severity,
        status=AlertStatus.RESOLVED if resolved else AlertStatus.OPEN,
        rule_id="MIA-003",
        score=0.42,
        threshold=0.1,
        reasons=[
            Reason(feature="training_hit_rate", value=0.42, baseline_percentile=100.0),
            Reason(feature="distinct_training_hits", value=57.0, baseline_percentile=99.9),
            Reason(feature="queries", value=136.0),
        ],
        evidence=[f"evt-{i:04d}" for i in range(5)],
        atlas_technique="AML.T0024",
        triage="client queried 57 distinct training records",
        first_seen=now - timedelta(minutes=20),
        last_seen=now - timedelta(minutes=1),
        raised_at=now - timedelta(minutes=15),
        updated_at=now - timedelta(minutes=1),
        resolved_at=now if resolved else None,
        queries=136,
        detected_at=now - timedelta(minutes=16),
        detected_after_queries=61,
        exposure=Exposure(probability_records=120, training_records=57, label_only_answers=16, probes=0),
    )
    return Notification(
        idempotency_key=f"mia-{alert_id}-{sequence}",
        event=event,
        created_at=now,
        alert=alert,
        previous_severity=previous_severity,
        dashboard_url=dashboard_url,
    )


def canary_miss_and_recovery() -> tuple[Notification, Notification]:
    """A detection canary's `canary_missed` (a minute ago) and the `canary_recovered` that the next canary,
    passing now, queues after it: as the monitor builds them."""
    clients = CanaryClients("mia-canary-", b"the canary key of the sink tests")
    now = datetime.now(UTC).timestamp()
    missed = canary_missed(
        Canary(clients.mint(), AlertKind.AUGMENTATION_PROBING, now - 120, 264), 60.0, now - 60
    )
    passed = Canary(clients.mint(), AlertKind.AUGMENTATION_PROBING, now - 2, 264)
    return missed, canary_recovered(missed.alert, passed, 60.0, now)


def missing_tool(what: str, install: str = "make tools") -> NoReturn:
    """Skip the test on a developer's machine without `what`; fail it in CI, where everything is installed
    (`.ci/run`), so that a missing install step cannot pass as a green run."""
    message = f"{what} is not installed ({install})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# A role allowed to create databases; each PostgreSQL test gets its own `mia_test_*` database.
POSTGRES_ADMIN_URL = os.environ.get("MIA_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """The URL of a new, empty `mia_test_*` PostgreSQL database, dropped on exit."""
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


def events_with_sybils(scenario: Path, keys: int) -> tuple[list[bytes], list[str]]:
    """A simulated scenario's event records (lines without their newline), its training-set attacker's
    dealt in turn over `keys` sybil keys (its address kept: one network); and those keys."""
    truth = [orjson.loads(line) for line in (scenario / "truth.jsonl").read_bytes().splitlines()]
    attacker = next(client["client_id"] for client in truth if client["kind"] == "training_set_targeting")
    sybils = [f"{attacker}-sybil-{index}" for index in range(keys)]
    lines, dealt = [], 0
    for line in (scenario / "events.jsonl").read_bytes().splitlines():
        record = orjson.loads(line)
        if record["client"]["id"] == attacker:
            record["client"]["id"] = sybils[dealt % keys]
            dealt += 1
            line = orjson.dumps(record)
        lines.append(line)
    assert dealt >= keys, f"the attacker sent {dealt} records, fewer than {keys} keys"
    return lines, sybils
