"""The Alertmanager sink: its body against a strict receiver, then its alerts' lifecycle in a real
Alertmanager (read back from `GET /api/v2/alerts`, which in 0.25 lists no resolved alert at all)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from detector.alerts.sinks.alertmanager import AlertmanagerSink, alert_name
from detector.domain import AlertKind, Notification, NotificationEvent, Severity
from tests.alertmanager import alertmanager_binary, running_alertmanager
from tests.receivers import RecordedRequest, RecordingReceiver
from tests.support import canary_miss_and_recovery, make_notification, missing_tool

PREFIX = "/s3cr3t"  # Alertmanager behind a path prefix, to check that the sink keeps it
PATH = f"{PREFIX}/api/v2/alerts"
HOLD_SECONDS = 600.0
# The sink's clock: fixed, after the raising of every alert the tests build.
NOW = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)

LABELS = {"alertname", "severity", "model", "kind", "client", "alert_id", "service"}
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")


def parse_time(text: str) -> datetime:
    assert _RFC3339.fullmatch(text), f"not RFC 3339: {text!r}"
    return datetime.fromisoformat(text)


def validate_alerts(request: RecordedRequest) -> str | None:
    """Alertmanager's v2 `postableAlerts` schema, and the label set every alert of ours has."""
    assert request.method == "POST" and request.path == PATH, (request.method, request.path)
    assert request.headers["content-type"] == "application/json"
    alerts = request.json
    assert isinstance(alerts, list) and alerts, "a non-empty list of alerts"
    for alert in alerts:
        assert set(alert) <= {"labels", "annotations", "startsAt", "endsAt", "generatorURL"}, sorted(alert)
        labels, annotations = alert["labels"], alert.get("annotations", {})
        assert set(labels) == LABELS, sorted(labels)
        for name, value in [*labels.items(), *annotations.items()]:
            assert _LABEL_NAME.fullmatch(name) and isinstance(value, str), (name, value)
        assert all(labels.values()), f"empty label in {labels}"
        assert parse_time(alert["startsAt"]) <= parse_time(alert["endsAt"]), "ends before it starts"
        assert alert.get("generatorURL", "https://").startswith(("http://", "https://"))
    return None


@pytest.fixture
def receiver() -> Iterator[RecordingReceiver]:
    with RecordingReceiver(validate=validate_alerts) as running:
        yield running


@pytest.fixture
def sink(receiver: RecordingReceiver) -> Iterator[AlertmanagerSink]:
    alertmanager = AlertmanagerSink(receiver.url + PREFIX + "/", hold_seconds=HOLD_SECONDS, clock=lambda: NOW)
    yield alertmanager
    alertmanager.close()


def posted(sink: AlertmanagerSink, receiver: RecordingReceiver, notification: Notification) -> list[Any]:
    sink.deliver(notification)
    assert receiver.rejected == []
    alerts: list[Any] = receiver.accepted[-1].json
    return alerts


def test_alert_names_are_camel_case() -> None:
    assert alert_name("training_set_targeting") == "MiaDetectorTrainingSetTargeting"
    assert {alert_name(kind.value) for kind in AlertKind} >= {"MiaDetectorCoordinatedClients"}


def test_an_open_alert_is_held_active_with_its_labels_and_annotations(
    sink: AlertmanagerSink, receiver: RecordingReceiver
) -> None:
    notification = make_notification()
    [alert] = posted(sink, receiver, notification)
    assert alert["labels"] == {
        "alertname": "MiaDetectorTrainingSetTargeting",
        "severity": "high",
        "model": "credit-risk",
        "kind": "training_set_targeting",
        "client": "client-17",
        "alert_id": "7",
        "service": "mia-detector",
    }
    annotations = alert["annotations"]
    assert annotations["summary"] == notification.summary
    assert annotations["description"].splitlines() == [
        "training_hit_rate = 0.42 (p100 of baseline)",
        "distinct_training_hits = 57 (p99.9 of baseline)",
        "queries = 136",
    ]
    assert annotations["evidence"] == "evt-0000,evt-0001,evt-0002,evt-0003,evt-0004"
    assert annotations["triage"] == notification.alert.triage
    assert annotations["clients"] == "client-17"
    assert annotations["exposure"] == notification.alert.exposure.summary()  # type: ignore[union-attr]
    assert annotations["dashboard"] == alert["generatorURL"] == notification.dashboard_url
    raised_at = notification.alert.raised_at
    assert abs(parse_time(alert["startsAt"]) - raised_at) < timedelta(milliseconds=1)
    assert parse_time(alert["endsAt"]) == NOW + timedelta(seconds=HOLD_SECONDS)


def test_one_alert_keeps_one_label_set_while_it_changes(
    sink: AlertmanagerSink, receiver: RecordingReceiver
) -> None:
    opened = make_notification(client_ids=("client-17", "client-18"))
    # A later detection of another rule updates the alert: its labels must not change, or Alertmanager
    # would see a second alert and leave the first one firing.
    alert = opened.alert.model_copy(update={"rule_id": "MIA-007", "evidence": ["evt-9"]})
    updated = opened.model_copy(update={"event": NotificationEvent.UPDATED, "alert": alert})
    acknowledged = updated.model_copy(update={"event": NotificationEvent.ACKNOWLEDGED})
    resolved = make_notification(NotificationEvent.RESOLVED, client_ids=("client-17", "client-18"))
    label_sets = [posted(sink, receiver, n)[0]["labels"] for n in (opened, updated, acknowledged, resolved)]
    assert all(labels == label_sets[0] for labels in label_sets)
    assert receiver.accepted[1].json[0]["annotations"]["rule"] == "MIA-007"
    assert receiver.accepted[0].json[0]["annotations"]["clients"] == "client-17,client-18"


def test_an_escalation_also_ends_the_lower_severity_alert(
    sink: AlertmanagerSink, receiver: RecordingReceiver
) -> None:
    notification = make_notification(
        NotificationEvent.ESCALATED, severity=Severity.CRITICAL, previous_severity=Severity.MEDIUM
    )
    previous, current = posted(sink, receiver, notification)
    assert (previous["labels"]["severity"], current["labels"]["severity"]) == ("medium", "critical")
    assert {**previous["labels"], "severity": "critical"} == current["labels"]
    assert parse_time(previous["endsAt"]) == NOW
    assert parse_time(current["endsAt"]) == NOW + timedelta(seconds=HOLD_SECONDS)


def test_a_resolution_ends_the_alert_when_it_was_resolved(
    sink: AlertmanagerSink, receiver: RecordingReceiver
) -> None:
    notification = make_notification(NotificationEvent.RESOLVED)
    [alert] = posted(sink, receiver, notification)
    assert notification.alert.resolved_at is not None
    assert abs(parse_time(alert["endsAt"]) - notification.alert.resolved_at) < timedelta(milliseconds=1)


def test_a_canary_recovery_ends_the_alert_of_the_miss(
    sink: AlertmanagerSink, receiver: RecordingReceiver
) -> None:
    missed, recovered = canary_miss_and_recovery()
    [firing] = posted(sink, receiver, missed)
    [ended] = posted(sink, receiver, recovered)
    assert ended["labels"] == firing["labels"]
    assert firing["labels"]["alertname"] == "MiaDetectorCanaryMissed"
    assert firing["labels"]["client"] == missed.alert.client_id
    assert parse_time(firing["endsAt"]) == NOW + timedelta(seconds=HOLD_SECONDS)
    assert recovered.alert.resolved_at is not None
    assert abs(parse_time(ended["endsAt"]) - recovered.alert.resolved_at) < timedelta(milliseconds=1)
    assert ended["annotations"]["summary"].startswith("[CANARY RECOVERED] ")


def test_a_test_alert_is_info_and_ends_by_itself(sink: AlertmanagerSink, receiver: RecordingReceiver) -> None:
    [alert] = posted(sink, receiver, make_notification(NotificationEvent.TEST, severity=Severity.CRITICAL))
    assert alert["labels"]["alertname"] == "MiaDetectorTest"
    assert alert["labels"]["severity"] == "info"
    assert parse_time(alert["endsAt"]) == NOW + timedelta(seconds=300)


def test_an_alert_never_ends_before_it_starts(receiver: RecordingReceiver) -> None:
    # The sink's clock an hour behind the one that raised the alert: Alertmanager would refuse the body.
    sink = AlertmanagerSink(receiver.url + PREFIX, hold_seconds=1.0, clock=lambda: NOW - timedelta(hours=1))
    try:
        notification = make_notification(
            NotificationEvent.ESCALATED, severity=Severity.HIGH, previous_severity=Severity.LOW
        )
        previous, current = posted(sink, receiver, notification)
    finally:
        sink.close()
    assert previous["endsAt"] == previous["startsAt"] == current["endsAt"]


# --- A real Alertmanager ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if alertmanager_binary() is None:
        missing_tool("prometheus-alertmanager")
    with running_alertmanager(tmp_path_factory.mktemp("alertmanager")) as url:
        yield url


def active(url: str, alert_id: int, client: str | None = None) -> list[dict[str, Any]]:
    """The alerts of `alert_id` (and `client`, given one) Alertmanager lists (active, silenced, inhibited or
    unprocessed)."""
    query = {"filter": [f'alert_id="{alert_id}"', *([f'client="{client}"'] if client is not None else [])]}
    response = httpx.get(f"{url}/api/v2/alerts", params=query, timeout=5.0)
    response.raise_for_status()
    alerts: list[dict[str, Any]] = response.json()
    return alerts


def deliver(url: str, notification: Notification, hold_seconds: float = HOLD_SECONDS) -> None:
    sink = AlertmanagerSink(url, hold_seconds=hold_seconds, timeout=5.0)
    try:
        sink.deliver(notification)
    finally:
        sink.close()


@pytest.mark.slow
def test_alertmanager_lists_an_opened_alert_as_active(alertmanager: str) -> None:
    notification = make_notification(alert_id=101)
    deliver(alertmanager, notification)
    [alert] = active(alertmanager, 101)
    assert alert["status"]["state"] == "active"
    assert alert["labels"]["alertname"] == "MiaDetectorTrainingSetTargeting"
    assert alert["labels"]["severity"] == "high" and alert["labels"]["client"] == "client-17"
    assert alert["annotations"]["summary"] == notification.summary
    assert alert["annotations"]["evidence"] == "evt-0000,evt-0001,evt-0002,evt-0003,evt-0004"
    assert alert["generatorURL"] == notification.dashboard_url
    assert parse_time(alert["endsAt"]) > datetime.now(UTC) + timedelta(seconds=HOLD_SECONDS - 60)


@pytest.mark.slow
def test_alertmanager_ends_the_lower_severity_alert_on_escalation(alertmanager: str) -> None:
    deliver(alertmanager, make_notification(alert_id=102, severity=Severity.MEDIUM))
    assert [alert["labels"]["severity"] for alert in active(alertmanager, 102)] == ["medium"]
    escalated = make_notification(
        NotificationEvent.ESCALATED, alert_id=102, severity=Severity.HIGH, previous_severity=Severity.MEDIUM
    )
    deliver(alertmanager, escalated)
    [alert] = active(alertmanager, 102)
    assert alert["labels"]["severity"] == "high" and alert["status"]["state"] == "active"


@pytest.mark.slow
def test_alertmanager_stops_listing_a_resolved_alert(alertmanager: str) -> None:
    deliver(alertmanager, make_notification(alert_id=103))
    deliver(alertmanager, make_notification(NotificationEvent.UPDATED, alert_id=103, sequence=2))
    deliver(alertmanager, make_notification(NotificationEvent.ACKNOWLEDGED, alert_id=103, sequence=3))
    assert len(active(alertmanager, 103)) == 1
    deliver(alertmanager, make_notification(NotificationEvent.RESOLVED, alert_id=103, sequence=4))
    assert active(alertmanager, 103) == []


@pytest.mark.slow
def test_alertmanager_stops_listing_a_missed_canary_once_canaries_pass(alertmanager: str) -> None:
    missed, recovered = canary_miss_and_recovery()
    deliver(alertmanager, missed)
    [alert] = active(alertmanager, 0, client=missed.alert.client_id)
    assert alert["labels"]["alertname"] == "MiaDetectorCanaryMissed"
    deliver(alertmanager, recovered)
    assert active(alertmanager, 0, client=missed.alert.client_id) == []


@pytest.mark.slow
def test_alertmanager_shows_a_test_alert(alertmanager: str) -> None:
    deliver(alertmanager, make_notification(NotificationEvent.TEST, alert_id=104))
    [alert] = active(alertmanager, 104)
    assert alert["labels"]["alertname"] == "MiaDetectorTest" and alert["labels"]["severity"] == "info"
    assert alert["status"]["state"] == "active"


@pytest.mark.slow
def test_alertmanager_lets_an_alert_expire_when_the_detector_stops_sending(alertmanager: str) -> None:
    deliver(alertmanager, make_notification(alert_id=105), hold_seconds=1.0)
    assert len(active(alertmanager, 105)) == 1
    deadline = datetime.now(UTC) + timedelta(seconds=5)
    while active(alertmanager, 105) and datetime.now(UTC) < deadline:
        time.sleep(0.1)
    assert active(alertmanager, 105) == []
