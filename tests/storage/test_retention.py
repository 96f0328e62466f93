"""Retention on SQLite and PostgreSQL: rows past their retention go, newer rows and rows retention never
touches (open alerts, undelivered notifications) stay, deletion goes in bounded chunks; the command line and
the daemon's schedule."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, event, func, select

from detector.alerts.lifecycle import NotificationPolicy
from detector.broker import EmbeddedBroker
from detector.domain import AlertStatus, RiskAction, RiskDecision, utc
from detector.metrics import RETENTION_TABLES, Metrics
from detector.service import StopFlag, run_daemon
from detector.service.retention import ScheduledRetention
from detector.settings import load_settings
from detector.storage import (
    DurableBatch,
    OutboxStore,
    Retention,
    RetentionPolicy,
    RiskStore,
    StorageError,
    Store,
    StoredClientState,
    create_engine_for,
    open_store,
    upgrade,
)
from detector.storage.tables import (
    AlertRow,
    Base,
    ClientStateRow,
    CoordinationPoolRow,
    DeadLetterRow,
    SeenEventRow,
    SessionRow,
)
from tests.support import make_settings
from tests.test_cli import cli_env, mia

from .conftest import START, Alerts, FakeClock, write
from .test_alerts import detection
from .test_repository import dead_letter, seen, session

DAY = 86_400.0
POLICY = RetentionPolicy(
    sessions=30 * DAY,
    client_states=14 * DAY,
    dead_letters=7 * DAY,
    seen_events=3 * DAY,
    alerts=90 * DAY,
    notifications=30 * DAY,
    risk=180 * DAY,
)


def count(engine: Engine, table: type[Base], *where: Any) -> int:
    with engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def ids(engine: Engine, column: Any) -> set[Any]:
    with engine.connect() as connection:
        return set(connection.execute(select(column)).scalars())


def at(clock: FakeClock, epoch: float) -> FakeClock:
    clock.now = epoch
    return clock


def store_rows(store: Store, clock: FakeClock, tag: str, count: int = 3) -> None:
    """Sessions, client states, dead letters and seen events, stamped with the clock's time; ids start with
    `tag`."""
    offset = {"old": 0, "new": 1000}[tag]
    write(
        store,
        DurableBatch(
            seen_events=[seen(f"{tag}-e{i}") for i in range(count)],
            sessions=[session(f"{tag}-s{i}", client_id=f"{tag}-{i}") for i in range(count)],
            client_states=[StoredClientState("m", f"{tag}-{i}", b"state", START) for i in range(count)],
            dead_letters=[dead_letter(offset + i) for i in range(count)],
        ),
    )
    with store.transaction() as transaction:
        transaction.write_pools({("m", f"{tag}-net-{i}"): b"pool" for i in range(count)})


def test_rows_past_retention_go_and_newer_rows_stay(store: Store, clock: FakeClock) -> None:
    engine = store.engine
    at(clock, START)
    store_rows(store, clock, "old")
    write(store, DurableBatch(model_scales={"m": b"scale", "unserved": b"scale"}))
    at(clock, START + 29 * DAY)
    store_rows(store, clock, "new")

    retention = Retention(engine, clock=at(FakeClock(), START + 31 * DAY))
    purges = retention.apply(POLICY)

    by_table = {purge.table: purge for purge in purges}
    assert [purge.table for purge in purges] == list(RETENTION_TABLES)
    # Sessions: kept 30 days, so the old ones (31 days) go and the new ones (2 days) stay.
    assert by_table["sessions"].deleted == 3
    assert ids(engine, SessionRow.id) == {f"new-s{i}" for i in range(3)}
    # Dead letters and seen events are kept 7 and 3 days: only the 2-day-old ones stay.
    assert by_table["dead_letters"].deleted == 3 and count(engine, DeadLetterRow) == 3
    assert ids(engine, DeadLetterRow.position) == {1000, 1001, 1002}
    assert by_table["seen_events"].deleted == 3
    assert ids(engine, SeenEventRow.event_id) == {f"new-e{i}" for i in range(3)}
    assert by_table["sessions"].before == datetime.fromtimestamp(START + DAY, UTC)
    # Client states are kept 14 days by their last write (the composite key deletes in chunks too).
    assert by_table["client_states"].deleted == 3
    assert ids(engine, ClientStateRow.client_id) == {f"new-{i}" for i in range(3)}
    # Coordination pools go with them, by their last write.
    assert ids(engine, CoordinationPoolRow.network) == {f"new-net-{i}" for i in range(3)}
    # The input scale learned for a model goes with the last client state built on it, not before.
    assert store.model_scales() == {"m": b"scale"}

    # A second run finds nothing more to delete.
    assert {purge.table: purge.deleted for purge in retention.apply(POLICY)} == dict.fromkeys(
        RETENTION_TABLES, 0
    )


def test_only_resolved_alerts_and_delivered_notifications_go(store: Store, clock: FakeClock) -> None:
    engine = store.engine
    sinks = ("webhook",)
    alerts = Alerts(store, NotificationPolicy(sinks=sinks), clock=clock)
    outbox = OutboxStore(engine, clock=clock)

    at(clock, START)
    opened = alerts.record([detection(client) for client in ("resolved-long-ago", "open", "resolved-lately")])
    by_client = {change.alert.client_ids[0]: change.alert.id for _, change in opened.changes}
    resolved_long_ago, open_long_ago, resolved_lately = by_client.values()
    alerts.resolve(resolved_long_ago)

    def queued(alert_id: int) -> list[int]:
        return [q.id for q in outbox.list(sink="webhook") if q.notification.alert.id == alert_id]

    for row_id in queued(resolved_long_ago):  # opened and resolved, delivered at once
        outbox.mark_delivered(row_id)
    at(clock, START + 80 * DAY)
    alerts.resolve(resolved_lately)  # by an operator: the open alert is left as it is
    resolution, opening = queued(resolved_lately)  # newest first
    outbox.mark_delivered(opening)  # delivered 20 days before the run
    outbox.mark_failed(resolution, 1, "rejected")  # failed: kept for `alerts redeliver`
    # The open alert's opening stays pending (a sink down for months).

    purges = Retention(engine, clock=at(FakeClock(), START + 100 * DAY)).apply(POLICY)

    by_table = {purge.table: purge.deleted for purge in purges}
    assert by_table["alerts"] == 1
    assert ids(engine, AlertRow.id) == {open_long_ago, resolved_lately}
    assert count(engine, AlertRow, AlertRow.status == AlertStatus.OPEN.value) == 1
    # Delivered more than 30 days ago: resolved-long-ago's two. The pending one of the open alert, the one
    # delivered 20 days ago and the failed one stay.
    assert by_table["notifications"] == 2
    left = sorted((row.notification.alert.id, row.status.value) for row in outbox.list())
    assert left == sorted(
        [(open_long_ago, "pending"), (resolved_lately, "delivered"), (resolved_lately, "failed")]
    )


def test_the_risk_audit_and_decisions_expired_long_ago_go(store: Store, clock: FakeClock) -> None:
    risk = RiskStore(store.engine, clock=clock)

    def decide(client_id: str, decided_at: float, expires_at: float | None) -> None:
        risk.override(
            RiskDecision(
                model="m",
                client_id=client_id,
                action=RiskAction.BLOCK,
                source="operator",
                actor="alice",
                reason="probing",
                decided_at=utc(decided_at),
                expires_at=utc(expires_at) if expires_at is not None else None,
            )
        )

    decide("expired-long-ago", START, START + DAY)
    decide("for-good", START, None)
    decide("expired-lately", START + 130 * DAY, START + 150 * DAY)
    clock.now = START + 250 * DAY
    risk.clear("m", "for-good", "bob", "a false alarm")  # audited at the clock's time
    decide("for-good", START + 250 * DAY, None)

    purges = Retention(store.engine, clock=at(FakeClock(), START + 300 * DAY)).apply(POLICY)

    # Kept 180 days: the audit entries made 300 days ago go, and the decision that expired 299 days ago.
    assert {purge.table: purge.deleted for purge in purges}["risk_audit"] == 2
    assert [(d.client_id, d.expires_at) for d in risk.decisions()] == [
        ("expired-lately", utc(START + 150 * DAY)),  # expired 150 days ago: listed, within retention
        ("for-good", None),
    ]
    assert [(entry["client_id"], entry["change"]) for entry in risk.audit_log()] == [
        ("for-good", "overridden"),
        ("for-good", "cleared"),
        ("expired-lately", "overridden"),
    ]


def test_unset_retention_keeps_a_table_for_good(store: Store, clock: FakeClock) -> None:
    at(clock, START)
    store_rows(store, clock, "old")
    keep_all = RetentionPolicy(None, None, None, None, None, None, None)
    purges = Retention(store.engine, clock=at(FakeClock(), START + 1000 * DAY)).apply(keep_all)
    assert [(purge.before, purge.deleted) for purge in purges] == [(None, 0)] * len(RETENTION_TABLES)
    assert count(store.engine, SessionRow) == count(store.engine, DeadLetterRow) == 3
    assert count(store.engine, ClientStateRow) == 3


@pytest.fixture
def deletes(store: Store) -> Iterator[list[int]]:
    """The number of rows of every DELETE statement run through the store's engine."""
    counts: list[int] = []

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            counts.append(cursor.rowcount)

    event.listen(store.engine, "after_cursor_execute", after)
    yield counts
    event.remove(store.engine, "after_cursor_execute", after)


def test_deletion_goes_in_chunks_each_a_transaction_of_its_own(
    store: Store, clock: FakeClock, deletes: list[int]
) -> None:
    at(clock, START)
    write(store, DurableBatch(seen_events=[seen(f"e{i}") for i in range(23)]))
    retention = Retention(store.engine, clock=at(FakeClock(), START + 10 * DAY), pause_seconds=0)
    deleted = retention.delete_seen_events(datetime.fromtimestamp(START + DAY, UTC), chunk_rows=5)
    assert deleted == 23
    assert deletes == [5, 5, 5, 5, 3]
    assert count(store.engine, SeenEventRow) == 0


def test_a_stop_ends_the_work_after_the_chunk_in_progress(store: Store, clock: FakeClock) -> None:
    at(clock, START)
    write(store, DurableBatch(seen_events=[seen(f"e{i}") for i in range(20)]))
    stop = threading.Event()
    stop.set()
    retention = Retention(store.engine, clock=at(FakeClock(), START + 10 * DAY), pause_seconds=0)
    deleted = retention.delete_seen_events(datetime.fromtimestamp(START + DAY, UTC), 5, stop)
    assert deleted == 5 and count(store.engine, SeenEventRow) == 15


def test_the_policy_comes_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MIA_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MIA_RETENTION_SESSIONS_DAYS", "10")
    monkeypatch.setenv("MIA_RETENTION_ALERTS_DAYS", "")  # blank: kept for good
    monkeypatch.setenv("MIA_DATABASE_SEEN_EVENTS_RETENTION_HOURS", "48")
    policy = RetentionPolicy.from_settings(load_settings())
    assert policy == RetentionPolicy(
        sessions=10 * DAY,
        client_states=14 * DAY,
        dead_letters=7 * DAY,
        seen_events=48 * 3600,
        alerts=None,
        notifications=30 * DAY,
        risk=365 * DAY,
    )
    assert load_settings().retention.interval_seconds == 3600
    monkeypatch.setenv("MIA_RETENTION_DEAD_LETTERS_DAYS", "0")
    with pytest.raises(ValueError, match="MIA_RETENTION_DEAD_LETTERS_DAYS"):
        load_settings()


# -- the schedule ------------------------------------------------------------------------------------------


def test_a_scheduled_run_deletes_and_counts(store: Store, clock: FakeClock) -> None:
    at(clock, time.time() - 10 * DAY)
    store_rows(store, clock, "old")
    metrics = Metrics()
    schedule = ScheduledRetention(Retention(store.engine), POLICY, interval_seconds=0.1, metrics=metrics)
    schedule.start()
    try:
        deadline = time.monotonic() + 20
        while count(store.engine, DeadLetterRow) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        schedule.close()
    assert count(store.engine, DeadLetterRow) == count(store.engine, SeenEventRow) == 0
    assert count(store.engine, SessionRow) == 3  # 10 days old: kept 30
    registry = metrics.registry
    assert (
        registry.get_sample_value("mia_detector_retention_runs_total", {"outcome": "completed"}) or 0
    ) >= 1
    deleted = registry.get_sample_value(
        "mia_detector_retention_deleted_rows_total", {"table": "dead_letters"}
    )
    assert deleted == 3


def test_a_failing_database_never_stops_the_schedule() -> None:
    # A real PostgreSQL client against a port nobody listens on: every run fails, the schedule goes on.
    engine = create_engine_for("postgresql://nobody@127.0.0.1:1/none")
    metrics = Metrics()
    schedule = ScheduledRetention(Retention(engine), POLICY, interval_seconds=0.05, metrics=metrics)
    with pytest.raises(StorageError):
        Retention(engine).apply(POLICY)
    schedule.start()
    try:
        deadline = time.monotonic() + 20
        failed = 0.0
        while failed < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
            failed = (
                metrics.registry.get_sample_value("mia_detector_retention_runs_total", {"outcome": "failed"})
                or 0.0
            )
    finally:
        schedule.close()
        engine.dispose()
    assert failed >= 3


# -- the command line ----------------------------------------------------------------------------------------


def test_retention_run_prints_what_it_deleted(database_url: str, clock: FakeClock) -> None:
    engine = create_engine_for(database_url)
    try:
        upgrade(engine)
        store = Store(engine, clock=at(clock, time.time() - 10 * DAY))
        store_rows(store, clock, "old")
        at(clock, time.time() - DAY)
        store_rows(store, clock, "new")
    finally:
        engine.dispose()
    env = cli_env(MIA_DATABASE_URL=database_url, MIA_RETENTION_SESSIONS_DAYS="")
    result = mia("retention", "run", "--format", "jsonl", env=env)
    assert result.returncode == 0, result.stderr
    printed = {row["table"]: row for row in map(orjson.loads, result.stdout.splitlines())}
    assert list(printed) == list(RETENTION_TABLES)
    assert printed["sessions"] == {"table": "sessions", "older_than": "kept for good", "deleted": 0}
    assert printed["dead_letters"]["deleted"] == 3 and printed["seen_events"]["deleted"] == 3
    assert printed["dead_letters"]["older_than"].endswith("Z")
    table = mia("retention", "run", env=env)
    assert table.returncode == 0 and "dead_letters" in table.stdout and "kept for good" in table.stdout


@pytest.mark.kafka
def test_the_daemon_deletes_on_its_schedule(broker: EmbeddedBroker, database_url: str) -> None:
    settings = make_settings(database_url, broker, retention={"interval_seconds": 0.2})
    engine = create_engine_for(database_url)
    try:
        upgrade(engine)
        clock = FakeClock(time.time() - 10 * DAY)
        store_rows(Store(engine, clock=clock), clock, "old")
    finally:
        engine.dispose()
    metrics = Metrics()
    # Nothing to consume: the daemon joins its group, stays idle for a few seconds and stops, its schedule
    # having run meanwhile (the first run 0.2 s after start).
    run_daemon(settings, StopFlag(), idle_exit_seconds=3.0, metrics=metrics)

    with open_store(settings) as store:
        assert store.list_dead_letters() == [] and store.count_seen_events() == 0
        assert store.count_sessions() == 3  # 10 days old, kept 30
    sample = metrics.registry.get_sample_value
    assert (sample("mia_detector_retention_runs_total", {"outcome": "completed"}) or 0) >= 1
    assert sample("mia_detector_retention_deleted_rows_total", {"table": "dead_letters"}) == 3
