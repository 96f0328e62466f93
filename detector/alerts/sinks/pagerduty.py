"""PagerDuty: notifications as Events API v2 events, one PagerDuty alert per detector alert.

Opened, updated, escalated, test and canary_missed notifications `trigger`; acknowledged ones `acknowledge`,
resolved and canary_recovered ones `resolve`. Every event of one alert carries the same `dedup_key`, so
PagerDuty folds them into one incident and a retried request changes nothing: every canary miss of one kind
is one incident, which the first canary to pass again resolves.

The summary and source are plain text that PagerDuty shows in pages, phone calls and mails: they are one line
with control characters shown as escapes (model and client as `display_name` shows them), the summary at
most 1024 characters. `custom_details` keeps the names as they are, in JSON, each string at most
`MAX_STRING_CHARS` characters.
"""

from __future__ import annotations

import hashlib
from typing import Any

import httpx

from detector.alerts.sinks.base import bounded, post_json
from detector.domain import PRODUCT, Notification, NotificationEvent, Severity, display_name, rfc3339
from detector.text import shorten

EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"

# Limits of the Events API v2.
MAX_DEDUP_KEY_LENGTH = 255
MAX_SUMMARY_LENGTH = 1024
# Client ids listed in custom_details; a large coordinated group is cut (its size is reported).
MAX_CLIENTS = 100

_SEVERITIES = {
    Severity.CRITICAL: "critical",
    Severity.HIGH: "error",
    Severity.MEDIUM: "warning",
    Severity.LOW: "info",
}
_ACTIONS = {
    NotificationEvent.ACKNOWLEDGED: "acknowledge",
    NotificationEvent.RESOLVED: "resolve",
    NotificationEvent.CANARY_RECOVERED: "resolve",
}


def dedup_key(notification: Notification) -> str:
    """The PagerDuty `dedup_key` of the notification's alert: the same for every event of one alert.

    `mia-detector:<alert dedup key>`, or `mia-detector:sha256:<hex digest>` when that exceeds PagerDuty's
    255 characters. A test notification has a key of its own, so that it never touches a real incident.
    """
    if notification.event is NotificationEvent.TEST:
        key = f"{PRODUCT}:test:{notification.idempotency_key}"
    else:
        key = f"{PRODUCT}:{notification.alert.dedup_key}"
    if len(key) <= MAX_DEDUP_KEY_LENGTH:
        return key
    return f"{PRODUCT}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"


class PagerDutySink:
    """Sends notifications to a PagerDuty service through its Events API v2 integration (`routing_key`)."""

    name = "pagerduty"

    def __init__(self, routing_key: str, *, url: str = EVENTS_URL, timeout: float = 10.0) -> None:
        self._routing_key = routing_key
        self._url = url
        self._client = httpx.Client(timeout=timeout)

    def deliver(self, notification: Notification) -> None:
        """Send the event for `notification`; raise `DeliveryError` unless PagerDuty accepted it."""
        post_json(self._client, self._url, self.event(notification), sink=self.name)

    def event(self, notification: Notification) -> dict[str, Any]:
        """The Events API v2 body for `notification`."""
        action = _ACTIONS.get(notification.event, "trigger")
        event: dict[str, Any] = {
            "routing_key": self._routing_key,
            "event_action": action,
            "dedup_key": dedup_key(notification),
        }
        if action != "trigger":
            return event
        alert = notification.alert
        test = notification.event is NotificationEvent.TEST
        event["payload"] = {
            "summary": shorten(notification.summary, MAX_SUMMARY_LENGTH),
            # The affected system is the model's prediction API; the attack pattern is the class.
            "source": display_name(alert.model),
            "severity": "info" if test else _SEVERITIES[alert.severity],
            "timestamp": rfc3339(notification.created_at.timestamp()),
            "component": alert.rule_id,
            "group": PRODUCT,
            "class": "test" if test else alert.kind.value,
            "custom_details": bounded(_details(notification)),
        }
        event["client"] = PRODUCT
        if notification.dashboard_url:
            event["client_url"] = notification.dashboard_url
            event["links"] = [{"href": notification.dashboard_url, "text": "Investigate"}]
        return event

    def close(self) -> None:
        """Close the connection pool; safe to call more than once."""
        self._client.close()


def _details(notification: Notification) -> dict[str, Any]:
    alert = notification.alert
    details: dict[str, Any] = {
        "event": notification.event.value,
        "model": alert.model,
        "clients": alert.client_ids[:MAX_CLIENTS],
        "client_count": len(alert.client_ids),
        "kind": alert.kind.value,
        "severity": alert.severity.value,
        "rule": alert.rule_id,
        "atlas_technique": alert.atlas_technique,
        "score": alert.score,
        "threshold": alert.threshold,
        "queries": alert.queries,
        "reasons": [reason.text for reason in alert.reasons],
        "evidence": alert.evidence,
        "triage": alert.triage,
        "first_seen": rfc3339(alert.first_seen.timestamp()),
        "last_seen": rfc3339(alert.last_seen.timestamp()),
        "detected_at": rfc3339(alert.detected_at.timestamp()),
        "detected_after_queries": alert.detected_after_queries,
        "alert_id": alert.id,
        "idempotency_key": notification.idempotency_key,
    }
    if alert.exposure is not None:
        details["exposure"] = alert.exposure.model_dump()
    if notification.previous_severity is not None:
        details["previous_severity"] = notification.previous_severity.value
    return details
