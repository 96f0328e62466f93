"""What the lifecycle decides without a database: which change notifies, silences, the notification."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from detector.alerts import AlertKind, Severity
from detector.alerts.lifecycle import (
    NotificationPolicy,
    NotificationState,
    Silence,
    build_notification,
    change_event,
    connectivity_check,
    silenced_by,
)
from detector.alerts.notification import Notification, NotificationEvent, dashboard_link
from tests.support import make_notification

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

    assert Notification.model_validate_json(notification.model_dump_json()) == notification
