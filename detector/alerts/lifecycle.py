"""Which state changes of an alert become notifications, and what a notification says.

An alert is opened by its first detection, updated by later ones and resolved once quiet for the configured
period. Every change that matters to a responder is one notification: opened, escalated (severity raised),
updated (new evidence, at most once per renotify interval, so that a running attack does not page on every
commit), acknowledged and resolved. Silences keep matching alerts from notifying; a resolution is still
sent for an alert whose opening was, so that no receiver keeps an incident open forever.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from detector.alerts.model import DEFAULT_ATLAS_TECHNIQUE, AlertKind, AlertStatus, Severity
from detector.alerts.notification import (
    AlertReason,
    AlertSnapshot,
    Notification,
    NotificationEvent,
    dashboard_link,
)


@dataclass(frozen=True)
class NotificationPolicy:
    """Where notifications go and how often: the configured sinks (none: no notification is written)."""

    sinks: tuple[str, ...] = ()
    renotify_seconds: float = 900.0
    resolve_after_seconds: float = 1800.0
    dashboard_url: str | None = None


@dataclass(frozen=True)
class Silence:
    """An operator's silence: each field that is set must match the alert; it ends at `expires_at`."""

    id: int
    client_id: str | None
    model: str | None
    kind: str | None
    rule_id: str | None
    reason: str
    created_by: str
    created_at: datetime
    expires_at: datetime

    def matches(self, alert: AlertSnapshot) -> bool:
        """True when every criterion set matches `alert` (a client matches any of a group's clients)."""
        return (
            (self.client_id is None or self.client_id in alert.client_ids)
            and (self.model is None or self.model == alert.model)
            and (self.kind is None or self.kind == alert.kind.value)
            and (self.rule_id is None or self.rule_id == alert.rule_id)
        )

    def describe(self) -> str:
        """The criteria as `client=a rule=MIA-003`."""
        criteria = {"client": self.client_id, "model": self.model, "kind": self.kind, "rule": self.rule_id}
        return " ".join(f"{name}={value}" for name, value in criteria.items() if value is not None)


@dataclass(frozen=True)
class NotificationState:
    """What was last notified about an alert: when (wall time) and at which severity; None if never."""

    notified_at: datetime | None
    notified_severity: Severity | None


def change_event(
    alert: AlertSnapshot, state: NotificationState, now: datetime, policy: NotificationPolicy
) -> NotificationEvent | None:
    """The notification an opened or updated `alert` calls for now, or None.

    Never notified: opened (also for an alert that was opened under a since expired silence). A severity
    above the notified one: escalated. Otherwise updated, once `renotify_seconds` have passed since the
    last notification.
    """
    if state.notified_at is None or state.notified_severity is None:
        return NotificationEvent.OPENED
    if alert.severity.rank > state.notified_severity.rank:
        return NotificationEvent.ESCALATED
    if (now - state.notified_at).total_seconds() >= policy.renotify_seconds:
        return NotificationEvent.UPDATED
    return None


def silenced_by(alert: AlertSnapshot, silences: list[Silence]) -> Silence | None:
    """The first of the active `silences` that matches `alert`, or None."""
    return next((silence for silence in silences if silence.matches(alert)), None)


def build_notification(
    event: NotificationEvent,
    alert: AlertSnapshot,
    now: datetime,
    policy: NotificationPolicy,
    previous_severity: Severity | None = None,
) -> Notification:
    """A notification of `event` on `alert` with a new idempotency key and the alert's dashboard link."""
    return Notification(
        idempotency_key=uuid.uuid4().hex,
        event=event,
        created_at=now,
        alert=alert,
        previous_severity=previous_severity if event is NotificationEvent.ESCALATED else None,
        dashboard_url=dashboard_link(policy.dashboard_url, alert.model, alert.client_id),
    )


def connectivity_check(now: datetime, dashboard_url: str | None = None) -> Notification:
    """A notification that reports no attack: proves that a sink is configured and reachable."""
    alert = AlertSnapshot(
        id=0,
        dedup_key="mia-detector|test|test",
        model="mia-detector-test",
        client_ids=["mia-detector-test"],
        kind=AlertKind.ANOMALOUS_SESSION,
        severity=Severity.LOW,
        status=AlertStatus.OPEN,
        rule_id="TEST",
        score=0.0,
        threshold=1.0,
        reasons=[AlertReason(feature="test", value=1.0)],
        evidence=[],
        atlas_technique=DEFAULT_ATLAS_TECHNIQUE,
        triage="A test notification sent by `mia-detector alerts test`: no action needed.",
        first_seen=now,
        last_seen=now,
        raised_at=now,
        queries=0,
    )
    return Notification(
        idempotency_key=uuid.uuid4().hex,
        event=NotificationEvent.TEST,
        created_at=now,
        alert=alert,
        dashboard_url=dashboard_url,
    )
