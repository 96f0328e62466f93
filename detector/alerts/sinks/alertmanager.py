"""Alertmanager: every notification is posted to `POST /api/v2/alerts` as one or two alerts.

Alertmanager identifies an alert by its label set, so the labels of one alert at one severity never change:
`alertname` (`MiaDetector` + the kind in CamelCase), `severity`, `model`, `kind`, `client` (the primary
client), `alert_id` and `service`. Everything that may change between notifications of one alert (the rule
that fired last, the evidence, the explanation) goes into annotations.

Model names, client ids and event ids come from the prediction API's callers, and Alertmanager's receivers
put labels and annotations into mails, chat messages and pages: every one of them is shown as
`display_name` shows it (one line, control characters as escapes, at most 256 characters), a group of more
than `MAX_CLIENTS` clients is cut, and every annotation has at most `MAX_STRING_CHARS` characters.

An open alert is posted with `endsAt` `hold_seconds` ahead: it stays active while the detector keeps
re-sending it and expires by itself should the detector die. An escalation also posts the alert at its
previous severity with `endsAt` now, so that the lower-severity instance resolves instead of lingering; a
resolution posts it with `endsAt` at the time it was resolved.

A missed canary is `MiaDetectorCanaryMissed`, held active as an open alert is; `canary_recovered` posts the
labels of the last miss (the same alert name and client) with `endsAt` at the time canaries passed again.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from detector.alerts.sinks.base import MAX_STRING_CHARS, post_json
from detector.domain import PRODUCT, Notification, NotificationEvent, display_name, rfc3339
from detector.text import shorten

# How long a test alert stays active: long enough to see it in the Alertmanager UI and its receivers.
TEST_ALERT_SECONDS = 300.0
# Client ids listed in the `clients` annotation; the rest are counted.
MAX_CLIENTS = 100


def _utcnow() -> datetime:
    return datetime.now(UTC)


def alert_name(kind: str) -> str:
    """`MiaDetector` and `kind` in CamelCase: `training_set_targeting` → `MiaDetectorTrainingSetTargeting`."""
    return "MiaDetector" + "".join(part.capitalize() for part in kind.split("_"))


def _alertname(notification: Notification) -> str:
    """The `alertname` label: `alert_name` of the alert's kind, `MiaDetectorTest` for a test notification
    and `MiaDetectorCanaryMissed` for a canary's."""
    if notification.event is NotificationEvent.TEST:
        return "MiaDetectorTest"
    # A canary's notifications are named for what happened (MiaDetectorCanaryMissed), not for the attack it
    # was; its recovery keeps that name, as Alertmanager resolves only the alert of the same labels.
    if notification.event.is_canary:
        return alert_name(NotificationEvent.CANARY_MISSED.value)
    return alert_name(notification.alert.kind.value)


class AlertmanagerSink:
    """Posts notifications as Alertmanager alerts to `{url}/api/v2/alerts`.

    `hold_seconds`: how long an open alert stays active after each notification; it should exceed the
    longest time between two notifications of an open alert. `clock` returns the current aware time.
    """

    name = "alertmanager"

    def __init__(
        self,
        url: str,
        *,
        hold_seconds: float,
        timeout: float = 10.0,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if hold_seconds <= 0:
            raise ValueError(f"hold_seconds must be positive, got {hold_seconds}")
        self._url = f"{url.rstrip('/')}/api/v2/alerts"
        self._hold = timedelta(seconds=hold_seconds)
        self._clock = clock
        self._client = httpx.Client(timeout=timeout)

    def deliver(self, notification: Notification) -> None:
        """Post the alerts for `notification`; raise `DeliveryError` unless Alertmanager took them."""
        post_json(self._client, self._url, self.alerts(notification), sink=self.name)

    def alerts(self, notification: Notification) -> list[dict[str, Any]]:
        """The body posted for `notification`: a list of Alertmanager v2 `postableAlert`s."""
        now = self._clock()
        alert = notification.alert
        event = notification.event
        severity = alert.severity.value
        if event is NotificationEvent.TEST:
            return [self._alert(notification, "info", now + timedelta(seconds=TEST_ALERT_SECONDS))]
        if event.ends_alert:
            return [self._alert(notification, severity, alert.resolved_at or now)]
        current = self._alert(notification, severity, now + self._hold)
        previous = notification.previous_severity
        if event is NotificationEvent.ESCALATED and previous is not None and previous != alert.severity:
            return [self._alert(notification, previous.value, now), current]
        return [current]

    def close(self) -> None:
        """Close the connection pool; safe to call more than once."""
        self._client.close()

    def _alert(self, notification: Notification, severity: str, ends_at: datetime) -> dict[str, Any]:
        alert = notification.alert
        labels = {
            "alertname": _alertname(notification),
            "severity": severity,
            "model": display_name(alert.model),
            "kind": alert.kind.value,
            "client": display_name(alert.client_id),
            "alert_id": str(alert.id),
            "service": PRODUCT,
        }
        clients = ",".join(map(display_name, alert.client_ids[:MAX_CLIENTS]))
        if len(alert.client_ids) > MAX_CLIENTS:
            clients += f" and {len(alert.client_ids) - MAX_CLIENTS} more"
        annotations = {
            "summary": notification.summary,
            "description": "\n".join(reason.text for reason in notification.top_reasons()),
            "rule": alert.rule_id,
            "evidence": ",".join(map(display_name, alert.evidence)),
            "triage": alert.triage,
            "clients": clients,
            "detected_at": rfc3339(alert.detected_at.timestamp()),
            "detected_after_queries": str(alert.detected_after_queries),
        }
        if alert.exposure is not None:
            annotations["exposure"] = alert.exposure.summary()
        if alert.acknowledged_at is not None:
            annotations["acknowledged_at"] = rfc3339(alert.acknowledged_at.timestamp())
        # Alertmanager refuses an alert that ends before it starts (clocks of two hosts may disagree).
        ends_at = max(ends_at, alert.raised_at)
        body: dict[str, Any] = {"labels": labels, "startsAt": rfc3339(alert.raised_at.timestamp())}
        if notification.dashboard_url:
            annotations["dashboard"] = notification.dashboard_url
            body["generatorURL"] = notification.dashboard_url
        # Alertmanager drops empty annotations anyway; leaving them out keeps the body honest.
        body["annotations"] = {
            key: shorten(value, MAX_STRING_CHARS) for key, value in annotations.items() if value
        }
        body["endsAt"] = rfc3339(ends_at.timestamp())
        return body
