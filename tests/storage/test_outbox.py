"""The alert lifecycle in the database: every notifying change queues one notification per sink in the
outbox, in the same transaction; silences; the dispatcher's and operator's views of the outbox."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, func, select

from detector.alerts.lifecycle import NotificationPolicy
from detector.domain import AlertKind, AlertStatus, Detection, Notification, NotificationEvent, Severity
from detector.storage import DeliveryStatus, OutboxStore, SilenceStore, Store, upgrade
from detector.storage.tables import NotificationRow

from .conftest import START, Alerts, FakeClock
from .test_alerts import detection

SINKS = ("webhook", "slack")
POLICY = NotificationPolicy(sinks=SINKS, renotify_seconds=600, resolve_after_seconds=1800)


@pytest.fixture
def alerts(store: Store, clock: FakeClock) -> Alerts:
    """The lifecycle notifying `SINKS`, on a database migrated to head."""
    return Alerts(store, POLICY, clock=clock)


@pytest.fixture
def outbox(engine: Engine, clock: FakeClock) -> OutboxStore:
    return OutboxStore(engine, clock=clock)


@pytest.fixture
def silences(engine: Engine, clock: FakeClock) -> SilenceStore:
    return SilenceStore(engine, clock=clock)


def record(alerts: Alerts, *detections: Detection, watermark: float | None = None) -> list[Notification]:
    """The notifications queued by applying `detections`, in a transaction of their own."""
    return alerts.record(detections, watermark).notifications


def queued_events(outbox: OutboxStore, sink: str = "webhook") -> list[tuple[int, str]]:
    """(alert id, event) of every notification queued for `sink`, oldest first."""
    return [(q.notification.alert.id, q.notification.event.value) for q in reversed(outbox.list(sink=sink))]


def test_an_opened_alert_queues_one_notification_per_sink(alerts: Alerts, outbox: OutboxStore) -> None:
    [notification] = record(alerts, detection("client-a"))

    assert notification.event is NotificationEvent.OPENED
    for sink in SINKS:
        [queued] = outbox.list(sink=sink)
        assert queued.notification == notification
        assert (queued.status, queued.attempts) == (DeliveryStatus.PENDING, 0)
    assert notification.alert.client_ids == ["client-a"] and notification.alert.status is AlertStatus.OPEN


def test_updates_notify_once_per_renotify_interval_and_escalations_at_once(
    alerts: Alerts, outbox: OutboxStore, clock: FakeClock
) -> None:
    record(alerts, detection(last_seen=START + 60))
    clock.now += 60
    assert record(alerts, detection(last_seen=START + 120)) == []  # within the interval: quiet

    clock.now += 60
    [escalated] = record(alerts, detection(severity=Severity.HIGH, last_seen=START + 180))
    assert escalated.event is NotificationEvent.ESCALATED
    assert (escalated.previous_severity, escalated.alert.severity) == (Severity.MEDIUM, Severity.HIGH)

    clock.now += 599
    assert record(alerts, detection(last_seen=START + 240)) == []
    clock.now += 1
    [updated] = record(alerts, detection(last_seen=START + 300))
    assert updated.event is NotificationEvent.UPDATED and updated.alert.severity is Severity.HIGH
    alert_id = updated.alert.id
    assert queued_events(outbox) == [(alert_id, "opened"), (alert_id, "escalated"), (alert_id, "updated")]


def test_nothing_is_queued_when_the_alert_transaction_rolls_back(
    alerts: Alerts, outbox: OutboxStore, store: Store
) -> None:
    with pytest.raises(RuntimeError, match="boom"), store.transaction() as transaction:
        assert alerts.lifecycle.apply(transaction.alerts, [detection()]).notifications
        raise RuntimeError("boom")

    assert outbox.list() == [] and alerts.list_alerts() == []


def test_a_quiet_alert_resolves_and_notifies_its_resolution(
    alerts: Alerts, outbox: OutboxStore, clock: FakeClock
) -> None:
    record(alerts, detection("idle", last_seen=START + 60), detection("busy", last_seen=START + 1000))

    clock.now += 10
    update = alerts.record([], watermark=START + 60 + 1800 + 1)  # event time: idle is quiet

    assert [alert.client_id for alert in update.resolved] == ["idle"]
    [resolution] = update.notifications
    assert resolution.event is NotificationEvent.RESOLVED and resolution.alert.status is AlertStatus.RESOLVED
    assert resolution.alert.resolved_at == datetime.fromtimestamp(clock.now, UTC)

    clock.now += 1800  # wall time: nothing changed on "busy" for the quiet period
    assert [alert.client_id for alert in alerts.resolve_quiet().resolved] == ["busy"]
    assert [event for _, event in queued_events(outbox)] == ["opened", "opened", "resolved", "resolved"]


def test_an_alert_opened_and_resolved_in_one_transaction_notifies_both(
    alerts: Alerts, outbox: OutboxStore
) -> None:
    # A backlog caught up in one commit: the watermark ends a quiet period past the detection's last query.
    update = alerts.record([detection(last_seen=START + 60)], watermark=START + 60 + 1800 + 1)

    assert [alert.status for alert in update.resolved] == [AlertStatus.RESOLVED]
    # Its receivers heard it open: they must hear it resolve, or their incident stays open for good.
    assert [event for _, event in queued_events(outbox)] == ["opened", "resolved"]


def test_a_silence_holds_notifications_of_matching_alerts_but_not_their_resolution(
    alerts: Alerts, outbox: OutboxStore, silences: SilenceStore, clock: FakeClock
) -> None:
    record(alerts, detection("noisy", last_seen=START + 60))
    silences.add(duration_seconds=3600, reason="pen test", created_by="alice", client_id="noisy")
    silences.add(duration_seconds=3600, reason="known job", created_by="bob", rule_id="MIA-004")

    clock.now += 700
    assert record(alerts, detection("noisy", severity=Severity.HIGH, last_seen=START + 700)) == []
    assert record(alerts, detection("other", rule_id="MIA-004")) == []
    [notified] = record(alerts, detection("third", kind=AlertKind.BOUNDARY_PROBING))
    assert notified.alert.client_ids == ["third"]

    clock.now += 1801
    resolved = alerts.resolve_quiet().notifications
    # "noisy" was notified before its silence: its receivers hear it resolve. "other" never was: nothing.
    assert sorted(n.alert.client_id for n in resolved) == ["noisy", "third"]


def test_an_alert_opened_under_an_expired_silence_notifies_as_opened(
    alerts: Alerts, silences: SilenceStore, clock: FakeClock
) -> None:
    silence = silences.add(duration_seconds=60, reason="maintenance", created_by="ops", model="fraud-v1")
    assert record(alerts, detection()) == []
    assert [s.id for s in silences.list()] == [silence.id]

    clock.now += 61
    assert silences.list() == [] and [s.id for s in silences.list(include_expired=True)] == [silence.id]
    [late] = record(alerts, detection(last_seen=START + 120))
    assert late.event is NotificationEvent.OPENED


def test_silences_need_a_criterion_and_a_positive_duration_and_can_end_early(
    silences: SilenceStore, engine: Engine
) -> None:
    upgrade(engine)
    with pytest.raises(ValueError, match="client, model, kind or rule"):
        silences.add(duration_seconds=60, reason="", created_by="x")
    with pytest.raises(ValueError, match="positive"):
        silences.add(duration_seconds=0, reason="", created_by="x", client_id="a")
    silence = silences.add(duration_seconds=60, reason="", created_by="x", client_id="a", rule_id="MIA-001")
    assert silence.describe() == "client=a rule=MIA-001"

    assert silences.expire(silence.id) is True
    assert silences.expire(silence.id) is False and silences.list() == []


def test_acknowledge_and_resolve_by_hand_notify_and_refuse_unknown_alerts(
    alerts: Alerts, outbox: OutboxStore
) -> None:
    [opened] = record(alerts, detection())
    alert_id = opened.alert.id

    [acknowledged] = alerts.acknowledge(alert_id).notifications
    assert acknowledged.event is NotificationEvent.ACKNOWLEDGED and acknowledged.alert.acknowledged_at
    outcome = alerts.resolve(alert_id)
    assert [alert.id for alert in outcome.resolved] == [alert_id]
    assert [n.event for n in outcome.notifications] == [NotificationEvent.RESOLVED]
    with pytest.raises(LookupError, match=f"no open alert with id {alert_id}"):
        alerts.resolve(alert_id)
    assert [event for _, event in queued_events(outbox)] == ["opened", "acknowledged", "resolved"]


def test_without_sinks_nothing_is_queued(store: Store, engine: Engine, clock: FakeClock) -> None:
    update = Alerts(store, clock=clock).record([detection()], watermark=START + 60)

    assert update.notifications == [] and [c.change.value for _, c in update.changes] == ["opened"]
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(NotificationRow)).scalar_one() == 0


def test_the_outbox_tracks_attempts_and_backlog_and_requeues_failures(
    alerts: Alerts, outbox: OutboxStore, clock: FakeClock
) -> None:
    record(alerts, detection("a"), detection("b"), detection("c"))
    first, second, third = outbox.head("webhook", limit=10)
    assert first.id < second.id < third.id

    clock.now += 5
    outbox.mark_delivered(first.id)
    outbox.mark_retry(second.id, 1, datetime.fromtimestamp(clock.now + 30, UTC), "webhook: HTTP 503")
    outbox.mark_failed(third.id, 1, "webhook: HTTP 400 bad payload")

    [head] = outbox.head("webhook", limit=10)
    assert (head.id, head.attempts, head.last_error) == (second.id, 1, "webhook: HTTP 503")
    backlog = outbox.backlog()
    assert backlog["webhook"].pending == 1 and backlog["slack"].pending == 3
    assert backlog["webhook"].oldest == datetime.fromtimestamp(START, UTC)
    assert [q.id for q in outbox.list(status="failed", sink="webhook")] == [third.id]
    assert outbox.list(status="delivered")[0].delivered_at == datetime.fromtimestamp(clock.now, UTC)

    assert outbox.retry_failed("slack") == 0
    assert outbox.retry_failed() == 1
    assert [q.id for q in outbox.head("webhook", limit=10)] == [second.id, third.id]


def test_newest_of_is_the_last_notification_queued_of_the_events_asked(
    alerts: Alerts, outbox: OutboxStore, clock: FakeClock
) -> None:
    assert outbox.newest_of([NotificationEvent.OPENED]) is None  # an empty outbox
    record(alerts, detection("a"))
    [last_opened] = record(alerts, detection("b"))
    clock.now += 3600
    resolutions = alerts.resolve_quiet().notifications
    for queued in outbox.list():
        outbox.mark_delivered(queued.id)  # delivered or not, it was queued

    assert len(resolutions) == 2
    assert outbox.newest_of([NotificationEvent.OPENED]) == last_opened
    assert outbox.newest_of([NotificationEvent.OPENED, NotificationEvent.RESOLVED]) == resolutions[-1]
    assert outbox.newest_of([NotificationEvent.CANARY_MISSED]) is None
