"""Alerts on SQLite and PostgreSQL: one open alert per dedup key, updated in place, stored with the rest of
the batch or not at all; the `alerts` commands. (How detections combine into an alert and when it resolves:
`tests/alerts/test_lifecycle.py`.)"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError

from detector.alerts.lifecycle import AlertChange, Change, NotificationPolicy
from detector.domain import MAX_EVIDENCE, AlertKind, AlertStatus, Detection, Exposure, Reason, Severity
from detector.storage import DurableBatch, SeenEvent, Store, create_engine_for, upgrade
from detector.storage.tables import AlertRow

from .conftest import START, Alerts, FakeClock

MODEL = "fraud-v1"
REASON = Reason(feature="confidence_share", value=0.97, baseline_percentile=99.5)


def detection(
    *clients: str,
    kind: AlertKind = AlertKind.CONFIDENCE_HARVESTING,
    severity: Severity = Severity.MEDIUM,
    score: float = 0.8,
    evidence: list[str] | None = None,
    first_seen: float = START,
    last_seen: float = START + 60,
    queries: int = 100,
    reasons: list[Reason] | None = None,
    rule_id: str = "MIA-001",
    detected_at: float | None = None,
    fired: bool = True,
) -> Detection:
    return Detection(
        model=MODEL,
        client_ids=clients or ("client-a",),
        kind=kind,
        severity=severity,
        rule_id=rule_id,
        score=score,
        threshold=0.5,
        reasons=reasons if reasons is not None else [REASON],
        evidence=evidence if evidence is not None else ["e1", "e2"],
        first_seen=first_seen,
        last_seen=last_seen,
        queries=queries,
        detected_at=last_seen if detected_at is None else detected_at,
        detected_after_queries=queries,
        triage="Check whether the client pulls full probability vectors for many distinct inputs.",
        fired=fired,
    )


# The default quiet period after which an alert resolves.
QUIET = NotificationPolicy().resolve_after_seconds


@pytest.fixture
def alerts(store: Store, clock: FakeClock) -> Alerts:
    """The alert lifecycle, without sinks, on a database migrated to head."""
    return Alerts(store, clock=clock)


def rows(engine: Engine) -> list[dict[str, Any]]:
    """Every stored alert row, open or not, by id."""
    with engine.connect() as connection:
        query = select(AlertRow.__table__).order_by(AlertRow.id)
        return [dict(row._mapping) for row in connection.execute(query)]


def utc(epoch_seconds: float) -> datetime:
    return datetime.fromtimestamp(epoch_seconds, UTC)


# -- the detection -------------------------------------------------------------------------------------------


def test_a_detection_normalises_clients_and_keeps_the_newest_evidence() -> None:
    group = detection(
        "c", "a", "b", "a", kind=AlertKind.COORDINATED_CLIENTS, evidence=[*"xyzx", *map(str, range(30))]
    )

    assert group.client_ids == ("a", "b", "c") and group.client_id == "a"
    assert group.dedup_key == "fraud-v1|a,b,c|coordinated_clients"
    assert group.evidence == [str(i) for i in range(10, 30)]
    assert len(detection(evidence=[f"e{i}" for i in range(MAX_EVIDENCE)]).evidence) == MAX_EVIDENCE


def test_a_dedup_key_too_long_to_store_is_shortened_to_a_stable_digest() -> None:
    clients = [f"client-{i:03d}-{'x' * 200}" for i in range(10)]

    key = detection(*clients).dedup_key

    assert len(key) <= 1024 and key == detection(*reversed(clients)).dedup_key
    assert re.fullmatch(r"fraud-v1\|sha256:[0-9a-f]{64}\|confidence_harvesting", key)
    assert detection(*clients[:9]).dedup_key != key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"client_ids": ()}, "at least one client"),
        ({"score": float("nan")}, "finite"),
        ({"threshold": float("inf")}, "finite"),
        ({"first_seen": START + 61}, "after last_seen"),
        ({"queries": -1}, "negative"),
    ],
)
def test_a_detection_refuses_values_an_alert_cannot_hold(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(detection(), **change)


def test_a_reason_refuses_values_json_cannot_hold_and_percentiles_out_of_range() -> None:
    with pytest.raises(ValueError, match="finite"):
        Reason(feature="entropy", value=float("nan"))
    with pytest.raises(ValueError, match="percentile"):
        Reason(feature="entropy", value=0.1, baseline_percentile=100.5)


def test_severities_rank_from_low_to_critical() -> None:
    assert [severity.rank for severity in Severity] == [0, 1, 2, 3]
    assert max(Severity.HIGH, Severity.CRITICAL, Severity.LOW, key=lambda s: s.rank) is Severity.CRITICAL


def test_a_groups_detections_combine_their_exposures_exactly_or_as_a_lower_bound_never_more() -> None:
    def wave(*clients: str, given: Exposure | None, last_seen: float = START + 60) -> Detection:
        found = detection(*clients, kind=AlertKind.COORDINATED_CLIENTS, last_seen=last_seen)
        return dataclasses.replace(found, group="198.51.100.0/24", exposure=given)

    def given(records: int, probes: int = 0) -> Exposure:
        return Exposure(probability_records=records, training_records=records // 10, probes=probes)

    first, second = wave("a", "b", given=given(100, 3)), wave("c", given=given(50), last_seen=START + 90)
    both = first.combined(second)
    assert both.exposure == Exposure(probability_records=150, training_records=15, probes=3)  # disjoint
    assert both.combined(second).exposure == both.exposure == second.combined(both).exposure  # included
    assert first.combined(wave("a", "b", given=given(120), last_seen=START + 90)).exposure == given(120)
    # Overlapping only: each count at least as large as either's, nothing counted twice.
    overlap = first.combined(wave("b", "c", given=given(80, 5), last_seen=START + 90))
    assert overlap.exposure == Exposure(probability_records=100, training_records=10, probes=5)
    # A part of the group not accounted (an alert raised before exposures): a blank.
    assert wave("x", given=None).combined(first).exposure is None
    assert first.combined(wave("a", "b", given=None, last_seen=START + 90)).exposure == first.exposure


def test_detections_of_different_alerts_cannot_be_combined() -> None:
    with pytest.raises(ValueError, match="cannot combine"):
        detection("a").combined(detection("b"))


def test_an_incident_departed_when_any_of_its_detections_did_and_keeps_saying_where() -> None:
    """A known client's batch: its score went beyond its own history on one query, back within it (a hold)
    by the last one; the combined detection is still no allow-list's to excuse, and still says why."""
    departure = Reason(feature="own_baseline.maximum", value=300.0)
    beyond = dataclasses.replace(detection(score=0.9, reasons=[REASON, departure]), departed=True)
    later = detection(score=0.7, last_seen=START + 90)
    combined = beyond.combined(later)
    assert combined.departed and combined.reasons == [REASON, departure]
    assert later.combined(beyond) == combined
    assert not detection().combined(later).departed


# -- opening and storing -------------------------------------------------------------------------------------


def test_a_first_detection_opens_an_alert_holding_every_value(alerts: Alerts) -> None:
    reasons = [REASON, Reason(feature="distinct_inputs", value=1234.0, baseline_percentile=None)]
    group = detection(
        "client-b", "client-a", kind=AlertKind.COORDINATED_CLIENTS, severity=Severity.HIGH, reasons=reasons
    )

    changes = alerts.upsert([group])

    [alert] = alerts.list_alerts()
    assert changes == [AlertChange(alert, Change.OPENED)]  # the alert as opened is the alert as stored
    assert alert.dedup_key == "fraud-v1|client-a,client-b|coordinated_clients"
    assert alert.as_detection() == group
    assert (alert.client_id, alert.client_ids) == ("client-a", ["client-a", "client-b"])
    assert alert.reasons == reasons and alert.reasons[1].baseline_percentile is None
    assert (alert.status, alert.updates, alert.resolved_at, alert.acknowledged_at) == (
        AlertStatus.OPEN,
        0,
        None,
        None,
    )
    assert alert.raised_at == alert.updated_at == utc(START)
    assert alert.first_seen == utc(START) and alert.last_seen.tzinfo is UTC
    assert alerts.open_alert_count() == 1


def test_an_alert_carries_its_clients_latest_exposure(alerts: Alerts) -> None:
    early = Exposure(probability_records=40, training_records=12, label_only_answers=3, probes=0)
    later = Exposure(probability_records=90, training_records=31, label_only_answers=3, probes=5)
    alerts.upsert([dataclasses.replace(detection(), exposure=early)])
    alerts.upsert([dataclasses.replace(detection(last_seen=START + 120, evidence=["e3"]), exposure=later)])

    [alert] = alerts.list_alerts()
    assert alert.exposure == later and alert.updates == 1
    assert alert.as_detection().exposure == later


def test_the_same_detection_again_changes_nothing(alerts: Alerts, engine: Engine, clock: FakeClock) -> None:
    # Event times finer than the microseconds stored: the comparison must not see a change.
    again = detection(first_seen=START + 0.1234567, last_seen=START + 60.7654321)
    [opened] = alerts.upsert([again])
    before = rows(engine)
    clock.now += 60

    [change] = alerts.upsert([dataclasses.replace(again)])

    assert change == dataclasses.replace(opened, change=Change.UNCHANGED)
    assert rows(engine) == before


def test_many_upserts_never_open_a_second_alert_for_one_key(alerts: Alerts, engine: Engine) -> None:
    for round_ in range(30):
        batch = [
            detection(score=round_ / 30, evidence=[f"r{round_}"], last_seen=START + 60 + round_),
            detection("client-b", last_seen=START + 60 + round_),
            detection(kind=AlertKind.BOUNDARY_PROBING, queries=round_),
        ]
        alerts.upsert(batch)

    stored = rows(engine)
    assert len(stored) == 3 and {row["status"] for row in stored} == {"open"}
    assert sorted(row["dedup_key"] for row in stored) == [
        "fraud-v1|client-a|boundary_probing",
        "fraud-v1|client-a|confidence_harvesting",
        "fraud-v1|client-b|confidence_harvesting",
    ]
    assert alerts.open_alert_count() == 3


def test_the_database_itself_refuses_a_second_open_alert_for_a_key(alerts: Alerts, engine: Engine) -> None:
    alerts.upsert([detection()])
    [row] = rows(engine)
    del row["id"]

    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(insert(AlertRow), row)
    with engine.begin() as connection:  # resolved alerts are history: any number of them per key
        connection.execute(insert(AlertRow), [{**row, "status": "resolved"}, {**row, "status": "resolved"}])

    assert [r["status"] for r in rows(engine)] == ["open", "resolved", "resolved"]


def test_a_schema_refusing_new_alerts_fails_loudly_instead_of_retrying_forever(
    alerts: Alerts, engine: Engine
) -> None:
    with engine.begin() as connection:  # the unique index as it must not be: over resolved alerts too
        connection.exec_driver_sql("DROP INDEX uq_alerts_open_dedup_key")
        connection.exec_driver_sql("CREATE UNIQUE INDEX uq_alerts_open_dedup_key ON alerts (dedup_key)")
    alerts.upsert([detection(last_seen=START + 60)])
    alerts.resolve_quiet(watermark=START + 61 + QUIET)

    with pytest.raises(RuntimeError, match="partial index"):
        alerts.upsert([detection(last_seen=START + 120)])


def test_list_alerts_filters_and_puts_the_newest_raised_first(alerts: Alerts, clock: FakeClock) -> None:
    for client, kind in [
        ("a", AlertKind.BOUNDARY_PROBING),
        ("b", AlertKind.CONFIDENCE_HARVESTING),
        ("a", AlertKind.ANOMALOUS_SESSION),
    ]:
        alerts.upsert([detection(client, kind=kind)])
        clock.now += 1

    def listed(**filters: Any) -> list[tuple[str, str]]:
        return [(alert.client_id, alert.kind.value) for alert in alerts.list_alerts(**filters)]

    assert listed() == [("a", "anomalous_session"), ("b", "confidence_harvesting"), ("a", "boundary_probing")]
    assert listed(client_id="a") == [("a", "anomalous_session"), ("a", "boundary_probing")]
    assert listed(kind="boundary_probing") == [("a", "boundary_probing")]
    assert listed(status="resolved") == []
    assert listed(limit=1) == [("a", "anomalous_session")]
    assert len(listed(limit=None)) == 3
    # A client among a coordinated group's, not its primary one (nor a prefix of another's id).
    alerts.upsert([detection("a", "c", "bb", kind=AlertKind.COORDINATED_CLIENTS)])
    assert listed(client_id="c") == [("a", "coordinated_clients")]
    assert listed(client_id="b") == [("b", "confidence_harvesting")]


# -- transactions and concurrency ----------------------------------------------------------------------------


def seen(event_id: str) -> SeenEvent:
    return SeenEvent(event_id, START, event_id.encode().ljust(16, b"#"))


def test_alerts_are_stored_with_the_rest_of_the_batch_or_not_at_all(alerts: Alerts, store: Store) -> None:
    with store.transaction() as transaction:
        # The batch is written first: the transaction is under way when the alerts join it.
        transaction.write(DurableBatch(seen_events=[seen("kept")]))
        alerts.lifecycle.apply(transaction.alerts, [detection("kept")])
    with (
        pytest.raises(RuntimeError, match="the rest of the batch failed"),
        store.transaction() as transaction,
    ):
        alerts.lifecycle.apply(transaction.alerts, [detection("rolled-back")])
        transaction.write(DurableBatch(seen_events=[seen("rolled-back")]))
        raise RuntimeError("the rest of the batch failed")

    assert [alert.client_id for alert in alerts.list_alerts()] == ["kept"]
    assert set(store.seen_digests(["kept", "rolled-back"])) == {"kept"}


def test_a_concurrent_writer_updates_the_alert_instead_of_opening_another(
    alerts: Alerts, engine: Engine
) -> None:
    results: list[AlertChange] = []
    with alerts.store.transaction() as first:
        [(_, opened)] = alerts.lifecycle.apply(first.alerts, [detection(evidence=["first"])]).changes
        # The second writer runs in a transaction of its own while the first has opened the alert but not
        # yet committed it.
        second = threading.Thread(
            target=lambda: results.extend(
                alerts.upsert([detection(evidence=["second"], last_seen=START + 61)])
            )
        )
        second.start()
        wait_until_blocked(engine)
    second.join(timeout=60)

    [alert] = alerts.list_alerts()
    assert [(change.alert.id, change.change) for change in results] == [(opened.alert.id, Change.UPDATED)]
    assert results == [AlertChange(alert, Change.UPDATED, severity_before=Severity.MEDIUM)]
    assert (alert.evidence, alert.updates) == (["first", "second"], 1)


def wait_until_blocked(engine: Engine) -> None:
    """Until another session waits for a lock (PostgreSQL), or a moment has passed (SQLite)."""
    if engine.dialect.name == "sqlite":
        time.sleep(0.5)  # SQLite shows no waiting writers; the test holds either way, only the race varies
        return
    deadline = time.monotonic() + 30
    with engine.connect() as probe:
        while not probe.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).scalar_one():
            assert time.monotonic() < deadline, "the second writer never waited for the first"
            time.sleep(0.02)
            probe.rollback()  # a fresh snapshot of pg_stat_activity


# -- command line --------------------------------------------------------------------------------------------


def mia(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MIA_")}
    env["MIA_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "detector", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


# The first reason of the coordination alert of `populated`, as every output writes it (`Reason.text`).
TOP_REASON = "shared_inputs = 0.625 (p99.9 of baseline)"
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def populated(sqlite_url: str) -> str:
    """A SQLite database holding one resolved alert and, raised later, one open coordination alert."""
    engine = create_engine_for(sqlite_url)
    clock = FakeClock()
    try:
        upgrade(engine)
        alerts = Alerts(Store(engine, clock=clock), clock=clock)
        alerts.upsert([detection("client-z", severity=Severity.LOW, last_seen=START + 60)])
        clock.now += 120
        alerts.resolve_quiet(watermark=START + 61 + QUIET)
        alerts.upsert(
            [
                detection(
                    "client-b",
                    "client-a",
                    kind=AlertKind.COORDINATED_CLIENTS,
                    severity=Severity.CRITICAL,
                    score=0.9375,
                    reasons=[
                        Reason(feature="shared_inputs", value=0.625, baseline_percentile=99.9),
                        Reason(feature="clients", value=2.0),
                    ],
                )
            ]
        )
    finally:
        engine.dispose()
    return sqlite_url


def test_alerts_export_prints_every_alert_as_json_lines(populated: str) -> None:
    result = mia(populated, "alerts", "export", "--format", "jsonl")

    assert result.returncode == 0, result.stderr
    exported = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [(a["client_id"], a["status"]) for a in exported] == [
        ("client-a", "open"),
        ("client-z", "resolved"),
    ]
    group = exported[0]
    assert group["client_ids"] == ["client-a", "client-b"]
    assert {
        key: group[key] for key in ("model", "kind", "severity", "rule_id", "score", "threshold", "queries")
    } == {
        "model": MODEL,
        "kind": "coordinated_clients",
        "severity": "critical",
        "rule_id": "MIA-001",
        "score": 0.9375,
        "threshold": 0.5,
        "queries": 100,
    }
    assert group["reasons"] == [
        {
            "feature": "shared_inputs",
            "value": 0.625,
            "baseline_percentile": 99.9,
            "text": TOP_REASON,
        },
        {"feature": "clients", "value": 2.0, "baseline_percentile": None, "text": "clients = 2"},
    ]
    assert group["evidence"] == ["e1", "e2"] and group["atlas_technique"] == "AML.T0024" and group["triage"]
    assert (group["first_seen"], group["raised_at"]) == (
        "2023-11-14T22:13:20.000Z",
        "2023-11-14T22:15:20.000Z",
    )
    for alert in exported:
        for field in ("first_seen", "last_seen", "detected_at", "raised_at", "updated_at"):
            assert RFC3339_UTC.fullmatch(alert[field]), (field, alert[field])
        assert alert["detected_after_queries"] == alert["queries"]
    assert group["resolved_at"] is None and RFC3339_UTC.fullmatch(exported[1]["resolved_at"])

    only_resolved = mia(populated, "alerts", "export", "--status", "resolved")
    assert [orjson.loads(line)["client_id"] for line in only_resolved.stdout.splitlines()] == ["client-z"]


def test_alerts_list_prints_a_table_with_the_top_reason(populated: str) -> None:
    result = mia(populated, "alerts", "list")

    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if "kind" in line)
    columns = [cell.strip() for cell in header.strip("┃│ ").replace("┃", "│").split("│")]
    assert columns == [
        "id",
        "kind",
        "severity",
        "status",
        "client_id",
        "model",
        "score",
        "threshold",
        "queries",
        "detected_at",
        "raised_at",
        "top_reason",
    ]
    assert TOP_REASON in result.stdout
    assert "coordinated_clients" in result.stdout and "client-z" in result.stdout

    filtered = mia(
        populated, "alerts", "list", "--status", "open", "--kind", "coordinated_clients", "--format", "jsonl"
    )
    [alert] = [orjson.loads(line) for line in filtered.stdout.splitlines()]
    assert (alert["client_id"], alert["top_reason"]) == (
        "client-a",
        "shared_inputs = 0.625 (p99.9 of baseline)",
    )
