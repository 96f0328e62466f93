"""The PagerDuty sink against a receiver that checks every request as the Events API v2 would."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from detector.alerts.sinks.base import DeliveryError
from detector.alerts.sinks.pagerduty import PagerDutySink
from detector.domain import Notification, NotificationEvent, Severity
from tests.receivers import RecordedRequest, RecordingReceiver
from tests.support import canary_miss_and_recovery, make_notification

ROUTING_KEY = "R0123456789abcdef0123456789abcde"  # integration keys are 32 characters
PATH = "/s3cr3t/v2/enqueue"
ACCEPTED = {"status": "success", "message": "Event processed", "dedup_key": "echoed"}

_EVENT_KEYS = {
    "routing_key",
    "event_action",
    "dedup_key",
    "payload",
    "images",
    "links",
    "client",
    "client_url",
}
_PAYLOAD_KEYS = {
    "summary",
    "source",
    "severity",
    "timestamp",
    "component",
    "group",
    "class",
    "custom_details",
}


def validate_event(request: RecordedRequest) -> str | None:
    """Reject what the Events API v2 would reject, and what it would take but we never mean to send."""
    assert request.method == "POST", request.method
    assert request.path == PATH, request.path
    assert request.headers["content-type"] == "application/json"
    event = request.json
    assert isinstance(event, dict), "the body is not a JSON object"
    assert event.get("routing_key") == ROUTING_KEY, "wrong routing_key"
    action = event.get("event_action")
    assert action in {"trigger", "acknowledge", "resolve"}, f"event_action {action!r}"
    key = event.get("dedup_key")
    assert isinstance(key, str) and 0 < len(key) <= 255, f"dedup_key {key!r}"
    if action != "trigger":
        assert set(event) == {"routing_key", "event_action", "dedup_key"}, sorted(event)
        return None
    assert set(event) <= _EVENT_KEYS, sorted(set(event) - _EVENT_KEYS)
    payload = event["payload"]
    assert set(payload) <= _PAYLOAD_KEYS, sorted(set(payload) - _PAYLOAD_KEYS)
    summary, source = payload["summary"], payload["source"]
    assert isinstance(summary, str) and 0 < len(summary) <= 1024, f"summary of {len(summary)} chars"
    assert isinstance(source, str) and source, "source is required"
    assert payload["severity"] in {"critical", "error", "warning", "info"}, payload["severity"]
    assert datetime.fromisoformat(payload["timestamp"]).tzinfo is not None, "timestamp without zone"
    for name in ("component", "group", "class"):
        assert isinstance(payload.get(name, ""), str), name
    assert isinstance(payload.get("custom_details", {}), dict)
    for link in event.get("links", []):
        assert set(link) <= {"href", "text"} and link["href"].startswith(("http://", "https://")), link
    assert isinstance(event.get("client", ""), str)
    return None


@pytest.fixture
def receiver() -> Iterator[RecordingReceiver]:
    with RecordingReceiver(status=202, body=ACCEPTED, validate=validate_event) as running:
        yield running


@pytest.fixture
def sink(receiver: RecordingReceiver) -> Iterator[PagerDutySink]:
    pagerduty = PagerDutySink(ROUTING_KEY, url=receiver.url + PATH, timeout=2.0)
    yield pagerduty
    pagerduty.close()


def sent(sink: PagerDutySink, receiver: RecordingReceiver, notification: Notification) -> dict[str, Any]:
    """Deliver `notification` and return the event the receiver accepted."""
    sink.deliver(notification)
    assert receiver.rejected == []
    event: dict[str, Any] = receiver.accepted[-1].json
    return event


@pytest.mark.parametrize(
    ("event", "action"),
    [
        (NotificationEvent.OPENED, "trigger"),
        (NotificationEvent.UPDATED, "trigger"),
        (NotificationEvent.ESCALATED, "trigger"),
        (NotificationEvent.TEST, "trigger"),
        (NotificationEvent.ACKNOWLEDGED, "acknowledge"),
        (NotificationEvent.RESOLVED, "resolve"),
        (NotificationEvent.CANARY_MISSED, "trigger"),
        (NotificationEvent.CANARY_RECOVERED, "resolve"),
    ],
)
def test_each_event_maps_to_its_event_action(
    sink: PagerDutySink, receiver: RecordingReceiver, event: NotificationEvent, action: str
) -> None:
    body = sent(sink, receiver, make_notification(event, previous_severity=None))
    assert body["event_action"] == action
    assert ("payload" in body) == (action == "trigger")


def test_every_event_of_one_alert_has_one_dedup_key(sink: PagerDutySink, receiver: RecordingReceiver) -> None:
    lifecycle = [
        make_notification(NotificationEvent.OPENED, severity=Severity.MEDIUM, sequence=1),
        make_notification(NotificationEvent.UPDATED, severity=Severity.MEDIUM, sequence=2),
        make_notification(
            NotificationEvent.ESCALATED, severity=Severity.HIGH, previous_severity=Severity.MEDIUM, sequence=3
        ),
        make_notification(NotificationEvent.ACKNOWLEDGED, sequence=4),
        make_notification(NotificationEvent.RESOLVED, sequence=5),
    ]
    keys = {sent(sink, receiver, notification)["dedup_key"] for notification in lifecycle}
    assert keys == {"mia-detector:credit-risk|client-17|training_set_targeting"}

    other = sent(sink, receiver, make_notification(alert_id=8, client_ids=("client-18",)))
    test = sent(sink, receiver, make_notification(NotificationEvent.TEST, sequence=9))
    assert len(keys | {other["dedup_key"], test["dedup_key"]}) == 3


def test_a_canary_recovery_resolves_the_incident_of_the_miss(
    sink: PagerDutySink, receiver: RecordingReceiver
) -> None:
    missed, recovered = canary_miss_and_recovery()
    trigger = sent(sink, receiver, missed)
    resolve = sent(sink, receiver, recovered)
    assert (trigger["event_action"], resolve["event_action"]) == ("trigger", "resolve")
    assert (
        resolve["dedup_key"] == trigger["dedup_key"] == "mia-detector:mia-canary|canary|augmentation_probing"
    )


def test_a_long_dedup_key_is_replaced_by_its_digest(sink: PagerDutySink, receiver: RecordingReceiver) -> None:
    clients = tuple(f"coordinated-client-{i:04d}" for i in range(40))
    first = sent(sink, receiver, make_notification(client_ids=clients))
    again = sent(sink, receiver, make_notification(NotificationEvent.RESOLVED, client_ids=clients))
    assert first["dedup_key"] == again["dedup_key"]
    assert first["dedup_key"].startswith("mia-detector:sha256:")
    assert len(first["dedup_key"]) == len("mia-detector:sha256:") + 64
    # The digest covers the whole key: another group of the same size gets another one.
    others = sent(sink, receiver, make_notification(client_ids=(*clients[:-1], "someone-else")))
    assert others["dedup_key"] != first["dedup_key"]


@pytest.mark.parametrize(
    ("severity", "expected"),
    [
        (Severity.CRITICAL, "critical"),
        (Severity.HIGH, "error"),
        (Severity.MEDIUM, "warning"),
        (Severity.LOW, "info"),
    ],
)
def test_severity_is_mapped_to_pagerduty_severities(
    sink: PagerDutySink, receiver: RecordingReceiver, severity: Severity, expected: str
) -> None:
    assert sent(sink, receiver, make_notification(severity=severity))["payload"]["severity"] == expected


def test_a_trigger_carries_what_a_responder_needs(sink: PagerDutySink, receiver: RecordingReceiver) -> None:
    notification = make_notification(
        NotificationEvent.ESCALATED, severity=Severity.CRITICAL, previous_severity=Severity.HIGH
    )
    body = sent(sink, receiver, notification)
    payload = body["payload"]
    assert payload["summary"] == notification.summary
    assert payload["source"] == "credit-risk"
    assert payload["class"] == "training_set_targeting"
    assert payload["group"] == "mia-detector"
    details = payload["custom_details"]
    assert details["model"] == "credit-risk"
    assert details["clients"] == ["client-17"]
    assert details["exposure"] == {
        "probability_records": 120,
        "training_records": 57,
        "label_only_answers": 16,
        "probes": 0,
    }
    assert details["kind"] == "training_set_targeting"
    assert details["rule"] == "MIA-003"
    assert (details["score"], details["threshold"], details["queries"]) == (0.42, 0.1, 136)
    assert details["reasons"][:2] == [
        "training_hit_rate = 0.42 (p100 of baseline)",
        "distinct_training_hits = 57 (p99.9 of baseline)",
    ]
    assert details["evidence"] == notification.alert.evidence
    assert details["triage"] == notification.alert.triage
    assert details["previous_severity"] == "high"
    assert details["idempotency_key"] == notification.idempotency_key
    first_seen = datetime.fromisoformat(details["first_seen"])
    assert abs(first_seen - notification.alert.first_seen) < timedelta(milliseconds=1)
    assert body["links"] == [{"href": notification.dashboard_url, "text": "Investigate"}]
    assert body["client"] == "mia-detector" and body["client_url"] == notification.dashboard_url


def test_without_a_dashboard_there_are_no_links(sink: PagerDutySink, receiver: RecordingReceiver) -> None:
    body = sent(sink, receiver, make_notification(dashboard_url=None))
    assert "links" not in body and "client_url" not in body


def test_a_test_notification_is_info_and_says_so(sink: PagerDutySink, receiver: RecordingReceiver) -> None:
    body = sent(sink, receiver, make_notification(NotificationEvent.TEST, severity=Severity.CRITICAL))
    assert body["payload"]["severity"] == "info"
    assert body["payload"]["class"] == "test"
    assert body["payload"]["summary"].startswith("[TEST] ")
    assert body["dedup_key"].startswith("mia-detector:test:")


def test_an_attacker_sized_client_id_stays_within_the_limits(
    sink: PagerDutySink, receiver: RecordingReceiver
) -> None:
    body = sent(sink, receiver, make_notification(client_ids=("x" * 5000,)))
    assert len(body["payload"]["summary"]) <= 1024
    assert " by " + "x" * 255 + "…" in body["payload"]["summary"]
    assert len(body["dedup_key"]) <= 255


def test_an_invalid_event_is_a_permanent_failure(receiver: RecordingReceiver) -> None:
    # A routing key PagerDuty does not know: it answers 400 "invalid event", as the validator does here.
    sink = PagerDutySink("not-the-routing-key", url=receiver.url + PATH, timeout=2.0)
    try:
        with pytest.raises(DeliveryError) as raised:
            sink.deliver(make_notification())
    finally:
        sink.close()
    assert raised.value.permanent
    assert "wrong routing_key" in str(raised.value)  # the receiver's reason is kept
    assert "s3cr3t" not in str(raised.value)
    assert len(receiver.rejected) == 1 and receiver.accepted == []
