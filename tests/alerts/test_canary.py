"""Detection canaries: who is one (the tagged client id), what their alerts do (recorded, never notified nor
decided on), and the monitor that settles each one as passed or missed, and recovers a miss once a canary
passes again, on a settable clock."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import pytest
from sqlalchemy import text

from detector.alerts.alert_log import AlertLog
from detector.alerts.canary import CanaryMonitor, canary_missed, canary_recovered
from detector.alerts.lifecycle import NotificationPolicy
from detector.alerts.risk import RiskPolicy
from detector.domain import AlertKind, AlertStatus, Canary, CanaryClients, NotificationEvent, Severity
from detector.metrics import Metrics
from detector.storage import OutboxStore, RiskStore, Store
from tests.storage.conftest import Alerts, FakeClock
from tests.storage.test_alerts import detection

CLIENTS = CanaryClients("mia-canary-", b"a canary key of 32 characters..")
DEADLINE = 60.0
KIND = AlertKind.AUGMENTATION_PROBING


def alerts_with_canaries(store: Store, clock: FakeClock) -> Alerts:
    """The lifecycle notifying a webhook and deciding risk, knowing the canaries of `CLIENTS`."""
    policy = NotificationPolicy(sinks=("webhook",), canaries=CLIENTS)
    return Alerts(store, policy, clock=clock, risk=RiskPolicy.load())


def raise_alert(alerts: Alerts, client_id: str) -> None:
    alerts.record([detection(client_id, kind=KIND, severity=Severity.HIGH)])


def gauge(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(f"mia_detector_canary_{name}")


# -- who is a canary -----------------------------------------------------------------------------------------


def test_a_minted_client_verifies_and_a_borrowed_prefix_does_not() -> None:
    minted = CLIENTS.mint()

    assert minted.startswith("mia-canary-") and minted != CLIENTS.mint()
    assert CLIENTS.verifies(minted)
    other_key = CanaryClients("mia-canary-", b"another key, as long as the first")
    token, _, tag = minted.rpartition("-")
    for impostor in (
        "mia-canary-3f9a1c2b7d4e",  # the prefix alone
        f"{token}-{'0' * len(tag)}",  # a made-up tag
        f"{token}x-{tag}",  # the tag of another token
        minted.upper(),
        minted.replace("mia-canary-", "mia-canary-x-", 1),
    ):
        assert not CLIENTS.verifies(impostor), impostor
    assert not other_key.verifies(minted)


def test_a_canarys_alert_is_recorded_never_notified_nor_decided(store: Store, clock: FakeClock) -> None:
    alerts = alerts_with_canaries(store, clock)
    canary, impostor = CLIENTS.mint(), "mia-canary-3f9a1c2b7d4e-0123456789abcdef"

    raise_alert(alerts, canary)
    raise_alert(alerts, impostor)
    clock.now += 3600
    resolved = alerts.resolve_quiet()

    assert {alert.client_id for alert in alerts.list_alerts()} == {canary, impostor}
    assert len(resolved.resolved) == 2
    notified = {queued.notification.alert.client_id for queued in OutboxStore(store.engine).list()}
    assert notified == {impostor}  # opened and resolved: a client that only borrows the prefix is real
    risk = RiskStore(store.engine)
    assert risk.audit_log(client_id=canary) == []  # gateways allow canaries through
    assert {entry["change"] for entry in risk.audit_log(client_id=impostor)} == {"decided", "withdrawn"}


def test_a_canarys_alert_is_logged_as_canary_not_as_an_alert(
    store: Store, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    outcome = alerts_with_canaries(store, clock).record(
        [detection(client, kind=KIND, severity=Severity.HIGH) for client in (CLIENTS.mint(), "real-client")]
    )

    with caplog.at_level(logging.INFO, logger="detector.alerts"):
        AlertLog(NotificationPolicy(canaries=CLIENTS)).opened(
            [(change, found) for found, change in outcome.opened]
        )

    assert sorted((record.levelname, record.getMessage().split()[0]) for record in caplog.records) == [
        ("INFO", "CANARY"),
        ("WARNING", "ALERT"),
    ]


# -- the monitor ---------------------------------------------------------------------------------------------


def monitor_of(
    store: Store,
    clock: FakeClock,
    metrics: Metrics,
    wake: Callable[[], None] | None = None,
    sinks: Sequence[str] = ("webhook",),
) -> CanaryMonitor:
    return CanaryMonitor(store, metrics, DEADLINE, sinks=sinks, wake=wake, clock=clock)


def test_a_canary_whose_alert_is_raised_in_time_passes_with_its_latency(
    store: Store, clock: FakeClock
) -> None:
    metrics = Metrics()
    monitor = monitor_of(store, clock, metrics)
    canary = Canary(CLIENTS.mint(), KIND, clock.now, 264)
    monitor.watch(canary)
    assert monitor.check() == []  # nothing raised yet, well within the deadline

    clock.now += 2.5
    raise_alert(alerts_with_canaries(store, clock), canary.client_id)
    [result] = monitor.check()

    assert result.passed and result.latency_seconds == pytest.approx(2.5)
    assert monitor.watched == []
    assert gauge(metrics, "last_outcome") == 1.0
    assert gauge(metrics, "last_latency_seconds") == pytest.approx(2.5)
    assert gauge(metrics, "last_run_timestamp_seconds") == canary.injected_at
    assert OutboxStore(store.engine).list() == []


def test_a_canary_without_its_alert_by_the_deadline_raises_canary_missed(
    store: Store, clock: FakeClock
) -> None:
    metrics, woken = Metrics(), []
    monitor = monitor_of(store, clock, metrics, wake=lambda: woken.append(True))
    canary = Canary(CLIENTS.mint(), KIND, clock.now, 264)
    monitor.watch(canary)
    # An alert of another kind for the canary's client is not the one its attack must raise.
    alerts_with_canaries(store, clock).record([detection(canary.client_id, kind=AlertKind.BOUNDARY_PROBING)])

    clock.now += DEADLINE - 1
    assert monitor.check() == []
    clock.now += 1
    [result] = monitor.check()

    assert not result.passed and result.latency_seconds is None
    assert gauge(metrics, "last_outcome") == 0.0
    assert gauge(metrics, "last_latency_seconds") is not None  # NaN: no canary passed yet
    [queued] = OutboxStore(store.engine).list()
    assert (queued.sink, queued.notification.event) == ("webhook", NotificationEvent.CANARY_MISSED)
    assert queued.notification.alert.client_ids == [canary.client_id]
    assert woken == [True]
    assert monitor.check() == []  # settled once


def test_an_alert_raised_after_the_deadline_is_still_a_miss(store: Store, clock: FakeClock) -> None:
    metrics = Metrics()
    monitor = monitor_of(store, clock, metrics)
    canary = Canary(CLIENTS.mint(), KIND, clock.now, 264)
    monitor.watch(canary)

    clock.now += DEADLINE + 5
    raise_alert(alerts_with_canaries(store, clock), canary.client_id)
    [result] = monitor.check()

    assert not result.passed and result.latency_seconds == pytest.approx(DEADLINE + 5)
    assert [queued.notification.event for queued in OutboxStore(store.engine).list()] == [
        NotificationEvent.CANARY_MISSED
    ]


def test_canary_missed_reads_as_no_attack_and_every_miss_is_one_incident() -> None:
    first, second = (canary_missed(Canary(CLIENTS.mint(), KIND, 1000.0, 264), DEADLINE, 1060.0) for _ in "ab")

    assert first.title.startswith("[CANARY MISSED] [HIGH] augmentation probing on mia-canary by mia-canary-")
    assert "raised no alert within 60 s" in first.alert.triage
    assert first.alert.dedup_key == second.alert.dedup_key
    assert first.idempotency_key != second.idempotency_key


# -- recovery ------------------------------------------------------------------------------------------------

SINKS = ("webhook", "pagerduty")


def miss(monitor: CanaryMonitor, clock: FakeClock) -> Canary:
    """A canary watched by `monitor` and missed: its deadline passes without its alert."""
    canary = Canary(CLIENTS.mint(), KIND, clock.now, 264)
    monitor.watch(canary)
    clock.now += DEADLINE
    [result] = monitor.check()
    assert not result.passed
    return canary


def pass_one(monitor: CanaryMonitor, store: Store, clock: FakeClock) -> None:
    """A canary watched by `monitor` whose alert is raised a second after its injection, settled."""
    canary = Canary(CLIENTS.mint(), KIND, clock.now, 264)
    monitor.watch(canary)
    clock.now += 1
    raise_alert(alerts_with_canaries(store, clock), canary.client_id)
    [result] = monitor.check()
    assert result.passed


def queued_events(store: Store) -> list[tuple[str, NotificationEvent, str]]:
    """Each outbox row, oldest first: its sink, event and alert's client."""
    rows = reversed(OutboxStore(store.engine).list())
    return [(row.sink, row.notification.event, row.notification.alert.client_id) for row in rows]


def test_a_canary_passing_after_a_miss_queues_canary_recovered_for_every_sink(
    store: Store, clock: FakeClock
) -> None:
    woken: list[bool] = []
    monitor = monitor_of(store, clock, Metrics(), wake=lambda: woken.append(True), sinks=SINKS)
    missed = miss(monitor, clock)
    pass_one(monitor, store, clock)

    rows = OutboxStore(store.engine).list()
    assert sorted((row.sink, row.notification.event) for row in rows) == sorted(
        (sink, event)
        for sink in SINKS
        for event in (NotificationEvent.CANARY_MISSED, NotificationEvent.CANARY_RECOVERED)
    )
    by_event = {(row.sink, row.notification.event): row.notification for row in rows}
    for sink in SINKS:
        miss_alert = by_event[sink, NotificationEvent.CANARY_MISSED].alert
        recovery_alert = by_event[sink, NotificationEvent.CANARY_RECOVERED].alert
        assert recovery_alert.dedup_key == miss_alert.dedup_key
        assert recovery_alert.client_ids == miss_alert.client_ids == [missed.client_id]
        assert recovery_alert.status is AlertStatus.RESOLVED
    assert woken == [True, True]  # the miss, then the recovery


def test_only_the_first_pass_after_a_miss_queues_canary_recovered(store: Store, clock: FakeClock) -> None:
    monitor = monitor_of(store, clock, Metrics(), sinks=SINKS)
    pass_one(monitor, store, clock)
    assert queued_events(store) == []

    miss(monitor, clock)
    pass_one(monitor, store, clock)
    pass_one(monitor, store, clock)  # after the recovery
    assert [event for sink, event, _ in queued_events(store) if sink == "webhook"] == [
        NotificationEvent.CANARY_MISSED,
        NotificationEvent.CANARY_RECOVERED,
    ]


def test_every_miss_in_a_row_is_recovered_once_with_the_last_ones_client(
    store: Store, clock: FakeClock
) -> None:
    monitor = monitor_of(store, clock, Metrics())
    miss(monitor, clock)
    last = miss(monitor, clock)
    pass_one(monitor, store, clock)

    assert [(event, client) for _, event, client in queued_events(store)][1:] == [
        (NotificationEvent.CANARY_MISSED, last.client_id),
        (NotificationEvent.CANARY_RECOVERED, last.client_id),
    ]


def test_a_new_monitor_recovers_a_miss_an_earlier_one_queued(store: Store, clock: FakeClock) -> None:
    missed = miss(monitor_of(store, clock, Metrics(), sinks=SINKS), clock)

    restarted = monitor_of(store, clock, Metrics(), sinks=SINKS)
    pass_one(restarted, store, clock)
    pass_one(monitor_of(store, clock, Metrics(), sinks=SINKS), store, clock)  # the recovery is read too

    assert queued_events(store)[len(SINKS) :] == [
        (sink, NotificationEvent.CANARY_RECOVERED, missed.client_id) for sink in SINKS
    ]


def test_without_sinks_a_pass_after_a_miss_queues_nothing(store: Store, clock: FakeClock) -> None:
    miss(monitor_of(store, clock, Metrics()), clock)

    pass_one(monitor_of(store, clock, Metrics(), sinks=()), store, clock)

    assert [event for _, event, _ in queued_events(store)] == [NotificationEvent.CANARY_MISSED]


def test_an_unreadable_outbox_delays_the_recovery_to_the_next_pass(
    store: Store, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    miss(monitor_of(store, clock, Metrics()), clock)
    monitor = monitor_of(store, clock, Metrics())

    with store.engine.begin() as connection:
        connection.execute(text("ALTER TABLE notifications RENAME TO notifications_away"))
    with caplog.at_level(logging.ERROR, logger="detector.alerts.canary"):
        pass_one(monitor, store, clock)
    with store.engine.begin() as connection:
        connection.execute(text("ALTER TABLE notifications_away RENAME TO notifications"))
    assert "canary notifications unreadable" in caplog.text
    assert [event for _, event, _ in queued_events(store)] == [NotificationEvent.CANARY_MISSED]

    pass_one(monitor, store, clock)
    assert [event for _, event, _ in queued_events(store)] == [
        NotificationEvent.CANARY_MISSED,
        NotificationEvent.CANARY_RECOVERED,
    ]


def test_canary_recovered_resolves_the_miss_it_follows() -> None:
    missed = canary_missed(Canary(CLIENTS.mint(), KIND, 1000.0, 264), DEADLINE, 1060.0)
    passed = Canary(CLIENTS.mint(), KIND, 1300.0, 264)

    recovered = canary_recovered(missed.alert, passed, DEADLINE, 1302.5)

    assert recovered.title.startswith("[CANARY RECOVERED] [HIGH] augmentation probing on mia-canary by ")
    alert = recovered.alert
    assert (alert.id, alert.dedup_key, alert.client_ids) == (
        0,
        missed.alert.dedup_key,
        missed.alert.client_ids,
    )
    assert alert.status is AlertStatus.RESOLVED
    assert alert.raised_at == missed.alert.raised_at
    assert alert.resolved_at == alert.updated_at == recovered.created_at
    assert recovered.created_at.timestamp() == 1302.5
    assert passed.client_id in alert.triage and "detection works again" in alert.triage
    assert recovered.idempotency_key != missed.idempotency_key
