"""What the lifecycle decides: which change notifies, silences, the notification (no database needed); and,
on SQLite and PostgreSQL, how detections open and update alerts, when alerts resolve, and what the
allow-list drops. Storing alerts is tested in `tests/storage/test_alerts.py`, the outbox in
`tests/storage/test_outbox.py`."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from detector.alerts.lifecycle import (
    AlertChange,
    Change,
    NotificationPolicy,
    build_notification,
    change_event,
    connectivity_check,
    silenced_by,
)
from detector.domain import (
    AlertKind,
    AlertStatus,
    AllowEntry,
    AllowList,
    Detection,
    Exposure,
    Notification,
    NotificationEvent,
    NotificationState,
    Reason,
    Severity,
    Silence,
    dashboard_link,
)
from detector.scoring.detector import Detector
from detector.storage import Store, create_engine_for, upgrade
from tests.scoring.test_scoring import RULES, client_after, fired_on
from tests.storage.conftest import START, Alerts, FakeClock
from tests.storage.test_alerts import QUIET, detection, utc
from tests.streams import Stream, augmentation_probe
from tests.support import ALERT_TIMES, as_written, make_notification

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
POLICY = NotificationPolicy(sinks=("webhook",), renotify_seconds=600, dashboard_url="https://g.example/d/x")


def silence(**criteria: str) -> Silence:
    return Silence(
        id=1,
        client_id=criteria.get("client_id"),
        model=criteria.get("model"),
        kind=criteria.get("kind"),
        rule_id=criteria.get("rule_id"),
        reason="",
        created_by="ops",
        created_at=NOW,
        expires_at=NOW + timedelta(hours=2),
    )


@pytest.mark.parametrize(
    ("notified_ago", "notified_severity", "severity", "expected"),
    [
        (None, None, Severity.MEDIUM, NotificationEvent.OPENED),
        (10, Severity.MEDIUM, Severity.HIGH, NotificationEvent.ESCALATED),
        (10, Severity.HIGH, Severity.MEDIUM, None),  # severity never goes down, but must not notify if fed
        (10, Severity.HIGH, Severity.HIGH, None),
        (599, Severity.HIGH, Severity.HIGH, None),
        (600, Severity.HIGH, Severity.HIGH, NotificationEvent.UPDATED),
    ],
)
def test_change_event(
    notified_ago: float | None,
    notified_severity: Severity | None,
    severity: Severity,
    expected: NotificationEvent | None,
) -> None:
    alert = make_notification(severity=severity).alert
    notified_at = None if notified_ago is None else NOW - timedelta(seconds=notified_ago)
    state = NotificationState(notified_at, notified_severity)

    assert change_event(alert, state, NOW, POLICY) == expected


def test_silences_match_on_every_criterion_they_set() -> None:
    group = make_notification(client_ids=("a", "b"), kind=AlertKind.COORDINATED_CLIENTS).alert

    assert silence(client_id="b").matches(group)
    assert silence(client_id="b", rule_id="MIA-003", model="credit-risk").matches(group)
    assert not silence(client_id="b", rule_id="MIA-004").matches(group)
    assert not silence(kind="boundary_probing").matches(group)
    assert silenced_by(group, [silence(client_id="z"), silence(kind="coordinated_clients")]) is not None
    assert silenced_by(group, [silence(client_id="z")]) is None


def test_a_notification_links_to_the_clients_dashboard_and_has_a_fresh_key() -> None:
    alert = make_notification().alert
    first = build_notification(NotificationEvent.ESCALATED, alert, NOW, POLICY, Severity.MEDIUM)
    second = build_notification(NotificationEvent.UPDATED, alert, NOW, POLICY, Severity.MEDIUM)

    assert first.idempotency_key != second.idempotency_key
    assert first.previous_severity is Severity.MEDIUM and second.previous_severity is None
    assert first.dashboard_url == "https://g.example/d/x?var-model=credit-risk&var-client=client-17"
    assert (
        dashboard_link("https://g/d?orgId=1", "m", "a b&c")
        == "https://g/d?orgId=1&var-model=m&var-client=a+b%26c"
    )
    assert dashboard_link(None, "m", "c") is None


def test_titles_and_summaries_say_what_happened() -> None:
    opened = make_notification()
    assert opened.title == "[HIGH] training set targeting on credit-risk by client-17"
    assert opened.summary.startswith(opened.title + ": opened; rule MIA-003 scored 0.42 (threshold 0.1)")
    group = make_notification(client_ids=("a", "b", "c"), kind=AlertKind.COORDINATED_CLIENTS)
    assert group.title.endswith("by 3 clients")
    test = connectivity_check(NOW)
    assert test.event is NotificationEvent.TEST and test.title.startswith("[TEST] ")


def test_a_notification_survives_its_json_round_trip() -> None:
    notification = make_notification(NotificationEvent.RESOLVED)
    between = NOW.replace(microsecond=123_456)  # between two milliseconds
    alert = notification.alert.model_copy(update=dict.fromkeys(ALERT_TIMES, between))
    notification = notification.model_copy(update={"alert": alert})

    restored = Notification.model_validate_json(notification.model_dump_json())

    # An alert's times are written to the millisecond (RFC 3339, `Z`): that is all the round trip loses.
    assert {getattr(restored.alert, name) for name in ALERT_TIMES} == {NOW.replace(microsecond=123_000)}
    assert restored == as_written(notification) != notification
    assert restored.model_dump_json() == notification.model_dump_json()


# -- on a database: opening, updating and resolving alerts ---------------------------------------------------


@pytest.fixture
def alerts(store: Store, clock: FakeClock) -> Alerts:
    """The lifecycle without sinks or allow-list, each call in a transaction of its own."""
    return Alerts(store, clock=clock)


def test_a_later_detection_updates_the_open_alert(alerts: Alerts, clock: FakeClock) -> None:
    [opened] = alerts.upsert([detection(severity=Severity.MEDIUM, score=0.8, queries=100)])
    newer_reasons = [Reason(feature="augmentation_share", value=0.4, baseline_percentile=97.0)]
    clock.now += 30

    [updated] = alerts.upsert(
        [
            detection(
                severity=Severity.CRITICAL,
                score=0.95,
                evidence=["e2", "e3"],
                first_seen=START - 10,
                last_seen=START + 120,
                queries=250,
                reasons=newer_reasons,
                rule_id="MIA-002",
            )
        ]
    )

    [alert] = alerts.list_alerts()
    assert (updated.alert.id, updated.alert.dedup_key) == (opened.alert.id, opened.alert.dedup_key)
    # The alert as updated is the alert as stored; its severity rose from medium.
    assert updated == AlertChange(alert, Change.ESCALATED, severity_before=Severity.MEDIUM)
    assert (alert.severity, alert.score, alert.queries, alert.rule_id) == (
        Severity.CRITICAL,
        0.95,
        250,
        "MIA-002",
    )
    assert (alert.first_seen, alert.last_seen) == (utc(START - 10), utc(START + 120))
    assert alert.reasons == newer_reasons
    assert alert.evidence == ["e1", "e2", "e3"]
    assert (alert.updates, alert.raised_at, alert.updated_at) == (1, utc(START), utc(START + 30))


def test_an_update_keeps_the_higher_severity_and_the_peak_score(alerts: Alerts) -> None:
    alerts.upsert([detection(severity=Severity.HIGH, score=0.9, queries=300)])

    [change] = alerts.upsert(
        [detection(severity=Severity.LOW, score=0.6, queries=20, last_seen=START + 90, reasons=[])]
    )

    [alert] = alerts.list_alerts()
    assert change.change is Change.UPDATED
    assert (alert.severity, alert.score, alert.queries) == (Severity.HIGH, 0.9, 300)
    assert alert.reasons == [] and alert.last_seen == utc(START + 90)  # the newest explanation wins


def test_an_older_detection_arriving_late_keeps_the_newer_explanation(alerts: Alerts) -> None:
    alerts.upsert([detection(last_seen=START + 100, evidence=["new"], rule_id="MIA-NEW")])

    alerts.upsert([detection(last_seen=START + 50, evidence=["old"], rule_id="MIA-OLD")])

    [alert] = alerts.list_alerts()
    assert (alert.rule_id, alert.evidence, alert.last_seen) == ("MIA-NEW", ["old", "new"], utc(START + 100))


def test_evidence_keeps_the_newest_distinct_event_ids_up_to_the_cap(alerts: Alerts) -> None:
    for round_ in range(6):
        # Overlapping windows: every id but the first is sent twice.
        ids = [f"e{i}" for i in range(round_ * 5, round_ * 5 + 10)]
        alerts.upsert([detection(evidence=ids, last_seen=START + 60 + round_)])

    [alert] = alerts.list_alerts()
    assert alert.evidence == [f"e{i}" for i in range(15, 35)]
    assert alert.updates == 5


def test_detections_sharing_a_key_in_one_call_become_one_alert(alerts: Alerts) -> None:
    first = detection(score=0.7, evidence=["e1"], last_seen=START + 60)
    second = detection(score=0.9, severity=Severity.HIGH, evidence=["e2"], last_seen=START + 70)
    other = detection("client-b")

    changes = alerts.upsert([first, other, second])

    assert [change.change for change in changes] == [Change.OPENED] * 2
    assert changes[0] != changes[1]
    alert = alerts.list_alerts(client_id="client-a")[0]
    assert (alert.score, alert.severity, alert.evidence, alert.updates) == (
        0.9,
        Severity.HIGH,
        ["e1", "e2"],
        0,
    )
    assert alerts.upsert([]) == []


def test_detections_of_one_group_update_its_one_alert_which_names_every_client(alerts: Alerts) -> None:
    # A coordinated campaign: a first wave of keys, then keys of the same pool that another replica held.
    first = replace(
        detection("s1", "s2", kind=AlertKind.COORDINATED_CLIENTS, queries=40),
        group="198.51.100.0/24",
        exposure=Exposure(probability_records=40, training_records=9, probes=2),
    )
    second = replace(
        detection("s0", "s3", kind=AlertKind.COORDINATED_CLIENTS, queries=30, last_seen=START + 90),
        group="198.51.100.0/24",
        exposure=Exposure(probability_records=30, training_records=7, label_only_answers=4),
    )
    [opened] = alerts.upsert([first])

    [updated] = alerts.upsert([second])

    [alert] = alerts.list_alerts()
    assert updated.change is Change.UPDATED and alert.id == opened.alert.id
    assert alert.dedup_key == "fraud-v1|group:198.51.100.0/24|coordinated_clients" == second.dedup_key
    assert (alert.client_ids, alert.client_id) == (["s0", "s1", "s2", "s3"], "s0")  # as stored
    assert alert.group == "198.51.100.0/24" and alert.as_detection().dedup_key == alert.dedup_key
    assert (alert.queries, alert.detected_at) == (70, utc(START + 60))  # the first wave crossed first
    assert alert.exposure == Exposure(
        probability_records=70, training_records=16, label_only_answers=4, probes=2
    )
    assert alerts.upsert([first]) == [AlertChange(alert, Change.UNCHANGED)]  # sent again: nothing new
    assert alerts.list_alerts(client_id="s0") == [alert]  # the primary client moved to the new first one


def test_a_detection_after_the_alert_was_resolved_opens_a_new_alert(alerts: Alerts, clock: FakeClock) -> None:
    [first] = alerts.upsert([detection(last_seen=START + 60)])
    clock.now += 3600
    [quiet] = alerts.resolve_quiet().resolved  # an hour without change: quiet in wall time

    [second] = alerts.upsert([detection(first_seen=START + 7200, last_seen=START + 7260)])

    assert second.change is Change.OPENED and second.alert.id != first.alert.id
    assert second.alert.dedup_key == first.alert.dedup_key
    latest, resolved = alerts.list_alerts()
    assert (latest.id, latest.status) == (second.alert.id, AlertStatus.OPEN)
    assert (resolved.id, resolved.status, resolved.resolved_at) == (
        first.alert.id,
        AlertStatus.RESOLVED,
        utc(START + 3600),
    )
    assert resolved.updated_at == utc(START + 3600) and resolved.last_seen == utc(START + 60)
    assert quiet == resolved  # the alert as resolved is the alert as stored


def test_resolve_quiet_resolves_open_alerts_last_seen_a_quiet_period_before_the_watermark(
    alerts: Alerts, clock: FakeClock
) -> None:
    alerts.upsert([detection("idle", last_seen=START + 100), detection("edge", last_seen=START + 200)])
    alerts.upsert([detection("busy", last_seen=START + 300)])
    clock.now += 10

    assert [a.client_id for a in alerts.resolve_quiet(watermark=START + 200 + QUIET).resolved] == ["idle"]
    assert alerts.resolve_quiet(watermark=START + 200 + QUIET).resolved == []

    statuses = {alert.client_id: alert.status for alert in alerts.list_alerts()}
    assert statuses == {"idle": AlertStatus.RESOLVED, "edge": AlertStatus.OPEN, "busy": AlertStatus.OPEN}
    assert [a.resolved_at for a in alerts.list_alerts(status="resolved")] == [utc(START + 10)]
    assert alerts.open_alert_count() == 2


# -- incidents in event time ---------------------------------------------------------------------------------


def incident_history(alerts: Alerts) -> list[tuple[str, AlertStatus, datetime, int]]:
    """Every alert stored, oldest first: its client, status, detection time and queries by then."""
    return [
        (alert.client_id, alert.status, alert.detected_at, alert.detected_after_queries)
        for alert in sorted(alerts.list_alerts(), key=lambda alert: alert.id)
    ]


def test_an_alert_keeps_the_detection_time_of_the_query_that_first_crossed(alerts: Alerts) -> None:
    alerts.upsert([detection(last_seen=START + 60, detected_at=START + 40, queries=40)])
    alerts.upsert([detection(last_seen=START + 600, detected_at=START + 600, queries=90)])

    [alert] = alerts.list_alerts()
    assert (alert.detected_at, alert.detected_after_queries) == (utc(START + 40), 40)
    assert (alert.last_seen, alert.queries) == (utc(START + 600), 90)


def attack_that_pauses() -> list[Detection]:
    """Detections of one client: fired, a pause longer than the quiet period, fired again, and on."""
    return [
        detection(last_seen=START + 60, queries=30),
        detection(last_seen=START + 300, queries=60),
        detection(last_seen=START + 300 + QUIET + 1, queries=61),
        detection(last_seen=START + 400 + QUIET, queries=90),
    ]


def test_an_incident_that_ends_within_one_call_is_stored_resolved_and_both_notified(
    store: Store, clock: FakeClock
) -> None:
    alerts = Alerts(store, POLICY, clock=clock)

    outcome = alerts.record(attack_that_pauses())

    assert incident_history(alerts) == [
        ("client-a", AlertStatus.RESOLVED, utc(START + 60), 30),
        ("client-a", AlertStatus.OPEN, utc(START + 301 + QUIET), 61),
    ]
    first, second = sorted(alerts.list_alerts(), key=lambda alert: alert.id)
    assert [(n.event, n.alert.id) for n in outcome.notifications] == [
        (NotificationEvent.OPENED, first.id),
        (NotificationEvent.RESOLVED, first.id),
        (NotificationEvent.OPENED, second.id),
    ]
    assert [alert.id for alert in outcome.resolved] == [first.id]
    assert [change.change for _, change in outcome.changes] == [Change.OPENED, Change.OPENED]


def test_exposure_is_recorded_not_delivered_until_it_escalates(store: Store, clock: FakeClock) -> None:
    alerts = Alerts(store, POLICY, clock=clock)
    exposure = detection(severity=Severity.LOW, last_seen=START + 60, queries=300)

    opened = alerts.record([exposure])
    assert [change.change for _, change in opened.changes] == [Change.OPENED]
    assert opened.notifications == []  # below medium: stored, shown, not delivered
    clock.now += 60
    assert alerts.record([exposure]).notifications == []

    escalated = detection(severity=Severity.HIGH, last_seen=START + 120, queries=400)
    outcome = alerts.record([escalated])
    [(_, change)] = outcome.changes
    assert (change.change, change.severity_before) == (Change.ESCALATED, Severity.LOW)
    # The receivers never heard of it: it reaches them as opened, then its resolution follows.
    assert [n.event for n in outcome.notifications] == [NotificationEvent.OPENED]
    resolved = alerts.resolve_quiet(START + 120 + QUIET + 1)
    assert [n.event for n in resolved.notifications] == [NotificationEvent.RESOLVED]


def test_an_exposure_that_ends_within_one_call_is_stored_and_not_delivered(
    store: Store, clock: FakeClock
) -> None:
    alerts = Alerts(store, POLICY, clock=clock)
    early = detection(severity=Severity.LOW, last_seen=START + 60)
    later = detection(
        severity=Severity.LOW, first_seen=START + 60 + 2 * QUIET, last_seen=START + 90 + 2 * QUIET
    )

    outcome = alerts.record([early, later], START + 90 + 2 * QUIET)

    assert [alert.status for alert in sorted(alerts.list_alerts(), key=lambda a: a.id)] == [
        AlertStatus.RESOLVED,
        AlertStatus.OPEN,
    ]
    assert outcome.notifications == []


def test_one_call_or_one_per_detection_decide_the_same_incidents(database_url: str, clock: FakeClock) -> None:
    """A backlog committed at once and a live stream committed per query (the watermark moving on) make the
    same alerts and send the same notifications."""
    histories, events = [], []
    for calls in ([attack_that_pauses()], [[d] for d in attack_that_pauses()]):
        engine = create_engine_for(database_url)
        try:
            upgrade(engine)
            alerts = Alerts(Store(engine, clock=clock), POLICY, clock=clock)
            sent = []
            for call in calls:
                outcome = alerts.record(call, watermark=max(d.last_seen for d in call))
                sent += [(n.event, n.alert.detected_at) for n in outcome.notifications]
            histories.append(incident_history(alerts))
            events.append(sent)
        finally:
            with engine.begin() as connection:
                for table in ("notifications", "alerts"):
                    connection.exec_driver_sql(f"DELETE FROM {table}")
            engine.dispose()
    assert histories[0] == histories[1] and len(histories[0]) == 2
    assert sorted(events[0]) == sorted(events[1]) and len(events[0]) == 3


def test_an_incident_read_in_one_batch_continues_the_alert_it_began_within_the_quiet_period_of(
    alerts: Alerts,
) -> None:
    alerts.upsert([detection(last_seen=START + 60)])
    # One batch holds the attack going on: its first detection comes within the quiet period of the alert's
    # last query, its latest long after.
    alerts.record([detection(last_seen=START + QUIET), detection(last_seen=START + 2 * QUIET)])

    [alert] = alerts.list_alerts()
    assert (alert.status, alert.last_seen) == (AlertStatus.OPEN, utc(START + 2 * QUIET))


def test_a_verdict_in_the_hold_band_keeps_an_open_alert_open_and_opens_none(alerts: Alerts) -> None:
    held = detection(last_seen=START + 60, fired=False)
    assert alerts.upsert([held]) == [] and alerts.list_alerts() == []

    alerts.upsert([detection(last_seen=START + 100)])
    # Wavering just under the threshold, each time within the quiet period of the last: still one incident.
    for step in (1, 2, 3):
        alerts.record([detection(last_seen=START + 100 + step * (QUIET - 10), fired=False)])
    last = START + 100 + 3 * (QUIET - 10)
    assert alerts.resolve_quiet(watermark=last + QUIET - 1).resolved == []
    [alert] = alerts.list_alerts()
    assert (alert.status, alert.last_seen, alert.detected_at) == (
        AlertStatus.OPEN,
        utc(last),
        utc(START + 100),
    )
    # After a quiet gap, a verdict in the hold band continues nothing and opens nothing.
    alerts.record([detection(last_seen=last + QUIET + 1, fired=False)], watermark=last + QUIET + 1)
    assert [a.status for a in alerts.list_alerts()] == [AlertStatus.RESOLVED]


# -- the allow-list ------------------------------------------------------------------------------------------


def test_the_allow_list_drops_a_clients_detections_for_one_kind_or_all(
    store: Store, clock: FakeClock
) -> None:
    queries = augmentation_probe(Stream("tta-client"))
    detections = fired_on(Detector(RULES), ("m", "tta-client"), client_after(queries))
    assert detections  # the detector reports them: the allow-list is the lifecycle's
    policy = NotificationPolicy(sinks=("webhook",))
    for entry in (
        AllowEntry("tta-client", "test-time augmentation"),
        AllowEntry("tta-client", "test-time augmentation", AlertKind.AUGMENTATION_PROBING),
    ):
        outcome = Alerts(store, policy, AllowList((entry,)), clock).record(detections)
        assert (outcome.changes, outcome.notifications) == ([], [])
    assert store.alerts.list_alerts() == []

    other_kind = AllowEntry("tta-client", "nightly job", AlertKind.TRAINING_SET_TARGETING)
    outcome = Alerts(store, policy, AllowList((other_kind,)), clock).record(detections)
    assert [(found, change.change) for found, change in outcome.changes] == [
        (detection, Change.OPENED) for detection in detections
    ]
    assert len(outcome.notifications) == len(detections)
    assert {alert.client_id for alert in store.alerts.list_alerts()} == {"tta-client"}


def test_an_allow_listed_key_that_departs_from_its_own_history_is_alerted_on(
    store: Store, clock: FakeClock
) -> None:
    """The owner's re-scoring job is allow-listed for every kind: excused while it keeps to its own baseline
    profile, alerted on (with the reasons the detector gave) once it departs from it."""
    alerts = Alerts(store, POLICY, AllowList((AllowEntry("svc-job", "nightly re-scoring"),)), clock)

    def targeting(departed: bool) -> Detection:
        found = detection("svc-job", kind=AlertKind.TRAINING_SET_TARGETING, rule_id="MIA-003", score=900.0)
        return replace(
            found,
            departed=departed,
            reasons=[*found.reasons, Reason(feature="own_baseline.maximum", value=300.0)] if departed else [],
        )

    assert alerts.record([targeting(departed=False)]).changes == []
    outcome = alerts.record([targeting(departed=True)])
    assert [change.change for _, change in outcome.changes] == [Change.OPENED]
    assert len(outcome.notifications) == 1
    (alert,) = alerts.list_alerts()
    assert alert.reasons[-1].text == "own_baseline.maximum = 300"


def test_a_group_is_dropped_only_when_the_allow_list_covers_every_client(
    store: Store, clock: FakeClock
) -> None:
    allowlist = AllowList((AllowEntry("a", "load test"), AllowEntry("b", "load test")))
    alerts = Alerts(store, allowlist=allowlist, clock=clock)
    listed = detection("a", "b", kind=AlertKind.COORDINATED_CLIENTS)
    mixed = detection("a", "c", kind=AlertKind.COORDINATED_CLIENTS)

    outcome = alerts.record([listed, detection("a"), mixed])

    assert [(found.client_ids, change.change) for found, change in outcome.changes] == [
        (("a", "c"), Change.OPENED)
    ]
    assert [alert.client_ids for alert in alerts.list_alerts()] == [["a", "c"]]
