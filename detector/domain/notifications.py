"""What the outbox holds and every sink receives: one state change of one alert, as a `Notification`.

The payload is a snapshot of the alert when it changed, so a notification delivered an hour late (its sink
was down) still says what was true then. Its JSON Schema is exported to `schemas/` for webhook consumers.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field, field_serializer

from detector.domain.alerts import Alert, Reason, Severity, display_name
from detector.domain.times import rfc3339
from detector.text import shorten, visible

PRODUCT = "mia-detector"
MAX_SUMMARY_CHARS = 1024


class NotificationEvent(StrEnum):
    """The state change a notification reports."""

    OPENED = "opened"  # a new alert
    UPDATED = "updated"  # new evidence on an open alert (at most once per renotify interval)
    ESCALATED = "escalated"  # its severity was raised
    ACKNOWLEDGED = "acknowledged"  # a responder took it (`mia-detector alerts acknowledge`)
    RESOLVED = "resolved"  # quiet for the configured period, or resolved by hand
    TEST = "test"  # `mia-detector alerts test`: proves the sink works, reports no attack
    # A detection canary's attack raised no alert within its deadline: detection may be blind
    # (`detector.alerts.canary`); the alert is the one that was expected, never stored.
    CANARY_MISSED = "canary_missed"
    # A canary passed after a miss: detection works again. The alert is the last miss's, resolved, so that
    # receivers close what the miss opened.
    CANARY_RECOVERED = "canary_recovered"

    @property
    def is_canary(self) -> bool:
        """True for the detection canaries' events, whose alert (id 0, never stored) is the one a canary's
        attack was to raise."""
        return self in _CANARY_EVENTS

    @property
    def ends_alert(self) -> bool:
        """True for the events after which their alert is over (resolved, canary_recovered): receivers
        close what the earlier notifications of the alert opened."""
        return self in _ENDING_EVENTS


_CANARY_EVENTS = frozenset({NotificationEvent.CANARY_MISSED, NotificationEvent.CANARY_RECOVERED})
_ENDING_EVENTS = frozenset({NotificationEvent.RESOLVED, NotificationEvent.CANARY_RECOVERED})

# Notifications that report no attack say so first.
_TITLE_PREFIXES = {
    NotificationEvent.TEST: "[TEST] ",
    NotificationEvent.CANARY_MISSED: "[CANARY MISSED] ",
    NotificationEvent.CANARY_RECOVERED: "[CANARY RECOVERED] ",
}


class Notification(BaseModel):
    """One state change of one alert, to be delivered to every configured sink exactly once.

    `idempotency_key` is the same on every delivery attempt of this notification, and different for every
    other notification: receivers use it to drop a retry of a request they already took.
    """

    model_config = ConfigDict(frozen=True)
    idempotency_key: str
    event: NotificationEvent
    created_at: datetime
    alert: Alert
    previous_severity: Severity | None = Field(
        default=None, description="the severity before an escalation, else null"
    )
    dashboard_url: str | None = Field(default=None, description="where to investigate this alert")

    @field_serializer("created_at")
    def _rfc3339(self, moment: datetime) -> str:
        return rfc3339(moment.timestamp())  # as the alert's times: one form for every time written

    @property
    def title(self) -> str:
        """A short headline on one line: `[HIGH] training set targeting on credit-risk by client-17`; the
        model and client as `display_name` shows them."""
        alert = self.alert
        if len(alert.client_ids) == 1:
            clients = display_name(alert.client_id)
        else:
            clients = f"{len(alert.client_ids)} clients"
        kind = alert.kind.value.replace("_", " ")
        prefix = _TITLE_PREFIXES.get(self.event, "")
        return f"{prefix}[{alert.severity.value.upper()}] {kind} on {display_name(alert.model)} by {clients}"

    @property
    def summary(self) -> str:
        """The title with what happened and why, on one line of at most `MAX_SUMMARY_CHARS` characters
        (PagerDuty's limit)."""
        alert = self.alert
        why = f"rule {visible(alert.rule_id)} scored {alert.score:.3g} (threshold {alert.threshold:.3g})"
        text = f"{self.title}: {self.event.value}; {why}; {alert.queries} queries"
        return shorten(text, MAX_SUMMARY_CHARS)

    def top_reasons(self, count: int = 3) -> list[Reason]:
        """The first `count` reasons, as detection ordered them (most telling first)."""
        return list(self.alert.reasons[:count])


def dashboard_link(base_url: str | None, model: str, client_id: str) -> str | None:
    """A link to the client-investigation dashboard at `base_url` for one model and client, or None."""
    if not base_url:
        return None
    separator = "&" if "?" in base_url else "?"
    return f"{base_url}{separator}{urlencode({'var-model': model, 'var-client': client_id})}"
