"""Detection canaries: who is one (the tagged client id), what their alerts do (recorded, never notified nor
decided on), and the monitor that settles each one as passed or missed, on a settable clock."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from detector.alerts.alert_log import AlertLog
from detector.alerts.canary import CanaryMonitor, canary_missed
from detector.alerts.lifecycle import NotificationPolicy
from detector.alerts.risk import RiskPolicy
from detector.domain import AlertKind, Canary, CanaryClients, NotificationEvent, Severity
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
    store: Store, clock: FakeClock, metrics: Metrics, wake: Callable[[], None] | None = None
) -> CanaryMonitor:
    return CanaryMonitor(store, metrics, DEADLINE, sinks=("webhook",), wake=wake, clock=clock)


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
