"""The alert lifecycle, a step of the chain: which detection opens or updates which alert, which alerts
resolve, and which of those changes notify.

An alert is opened by its first detection, updated by later ones and resolved once quiet for the configured
period. Every change that matters to a responder is one notification: opened, escalated (severity raised),
updated (new evidence, at most once per renotify interval, so that a running attack does not page on every
commit), acknowledged and resolved. The operators' allow-list drops the detections it covers; silences keep
matching alerts from notifying, but a resolution is still sent for an alert whose opening was, so that no
receiver keeps an incident open forever.

The lifecycle works on values: it reads and writes through an `AlertRecords` inside the transaction the
caller owns (the pipeline's commit point, or an operator's command), so alerts, notifications and the
results they were derived from are stored together or not at all. With a risk policy, the risk decisions on
the alerts' clients change in the same transaction (`detector.alerts.risk`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from detector.alerts.risk import RiskPolicy, RiskRecords
from detector.alerts.sinks import configured_sink_names
from detector.domain import (
    Alert,
    AlertKind,
    AlertStatus,
    AllowList,
    CanaryClients,
    Detection,
    Notification,
    NotificationEvent,
    NotificationState,
    Reason,
    Severity,
    Silence,
    TrackedAlert,
    add_to_incidents,
    dashboard_link,
    utc,
)
from detector.settings import ConfigError, Settings

# Lookup-and-insert rounds per commit: a conflict means a concurrent writer opened the alert, which the second
# round updates; a third covers that alert being resolved in between. More means the schema is wrong.
_ROUNDS = 3


class AlertRecords(Protocol):
    """What the lifecycle needs of storage, within one transaction (`detector.storage.AlertRepository`)."""

    def lock_open(self, keys: Sequence[str]) -> dict[str, TrackedAlert]: ...

    def lock_open_by_id(self, alert_id: int) -> TrackedAlert | None: ...

    def lock_quiet(
        self, changed_before: datetime | None, seen_before: datetime | None
    ) -> list[TrackedAlert]: ...

    def insert(self, alerts: Sequence[Alert]) -> dict[str, Alert]: ...

    def insert_resolved(self, alerts: Sequence[Alert]) -> list[Alert]: ...

    def save(self, alerts: Sequence[Alert]) -> None: ...

    def silences(self, now: datetime) -> list[Silence]: ...

    def enqueue(self, notifications: Sequence[Notification], sinks: Sequence[str], now: datetime) -> None: ...

    @property
    def risk(self) -> RiskRecords: ...


@dataclass(frozen=True)
class NotificationPolicy:
    """Where notifications go and how often: the configured sinks (none: no notification is written)."""

    sinks: tuple[str, ...] = ()
    renotify_seconds: float = 900.0
    resolve_after_seconds: float = 1800.0
    dashboard_url: str | None = None
    min_severity: Severity = Severity.MEDIUM
    canaries: CanaryClients | None = None

    def pages(self, alert: Alert) -> bool:
        """True when `alert` is severe enough to be delivered (below `min_severity` it is only recorded) and
        not a canary's (`is_canary`)."""
        return alert.severity.reaches(self.min_severity) and not self.is_canary(alert)

    def is_canary(self, alert: Alert) -> bool:
        """True when every client of `alert` is a detection canary: recorded, never an incident."""
        return self.canaries is not None and self.canaries.covers(alert)

    @classmethod
    def from_settings(cls, settings: Settings, sinks: Sequence[str]) -> NotificationPolicy:
        """The policy of `settings`, notifying `sinks`."""
        return cls(
            sinks=tuple(sinks),
            renotify_seconds=settings.alerts.renotify_seconds,
            resolve_after_seconds=settings.alerts.resolve_after_seconds,
            dashboard_url=settings.dashboard.url,
            min_severity=settings.alerts.min_severity,
            canaries=settings.canary.clients(),
        )


class Change(StrEnum):
    """What a detection did to its alert."""

    OPENED = "opened"
    ESCALATED = "escalated"  # updated to a higher severity
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class AlertChange:
    """The alert a detection went to, as it is now, what happened to it, and what had been notified of it
    before."""

    alert: Alert
    change: Change
    notified: NotificationState = field(default_factory=NotificationState)
    severity_before: Severity | None = None  # of an updated alert, before the update


@dataclass
class AlertOutcome:
    """What one transaction did to the alerts: per detection (allow-listed ones left out), the change of its
    alert; the alerts resolved; the notifications queued."""

    changes: list[tuple[Detection, AlertChange]] = field(default_factory=list)
    resolved: list[Alert] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)

    @property
    def opened(self) -> list[tuple[Detection, AlertChange]]:
        """The detections that opened an alert, with it."""
        return [(detection, change) for detection, change in self.changes if change.change is Change.OPENED]

    @property
    def escalated(self) -> list[tuple[Detection, AlertChange]]:
        """The detections that raised an open alert's severity, with it."""
        return [
            (detection, change) for detection, change in self.changes if change.change is Change.ESCALATED
        ]


class AlertLifecycle:
    """Applies detections, quiet periods and responders' actions to alerts (see the module docstring).

    `clock` returns the wall time in epoch seconds; it stamps `raised_at`, `updated_at` and `resolved_at`.
    """

    def __init__(
        self,
        policy: NotificationPolicy | None = None,
        allowlist: AllowList | None = None,
        clock: Callable[[], float] = time.time,
        risk: RiskPolicy | None = None,
    ) -> None:
        self.policy = policy or NotificationPolicy()
        self.allowlist = allowlist or AllowList()
        self._clock = clock
        self.risk = risk

    @classmethod
    def from_settings(cls, settings: Settings, sinks: Sequence[str] | None = None) -> AlertLifecycle:
        """The lifecycle of `settings` (allow-list, quiet period, renotify interval, dashboard link),
        notifying `sinks` (by default every configured sink)."""
        names = configured_sink_names(settings) if sinks is None else sinks
        return cls(
            NotificationPolicy.from_settings(settings, names),
            settings.detection.allow_list(),
            risk=load_risk_policy(settings),
        )

    def apply(
        self,
        records: AlertRecords,
        detections: Sequence[Detection],
        watermark: float | None = None,
        *,
        wall_clock: bool = True,
        alert_watermark: Callable[[Alert], float | None] | None = None,
    ) -> AlertOutcome:
        """Open, update or resolve the alert of every incident in `detections`, resolve the quiet alerts,
        queue the notifications.

        The detections (in the order they were taken) are first gathered into incidents per dedup key
        (`add_to_incidents`): a detection more than the quiet period of event time after the previous one of
        its key starts a new incident, the one before having gone quiet in between. So one transaction over a
        whole backlog decides exactly what many small ones over the same stream decide. Every incident but the
        latest of its key ended within the transaction: its alert is stored resolved (opened and resolved
        both notified). The latest updates the open alert of its key when it continues it, else it resolves
        that alert and opens its own; an incident of detections that only hold (none fired) opens nothing.
        An alert is "unchanged" when combining changed none of its values: it is then not written at all;
        otherwise `updates` counts one more. An alert is quiet when its last detection is the quiet period
        older than the `watermark` (event time, epoch seconds; `alert_watermark`, when given, tells how far
        the stream has got for each alert, at most `watermark`), or (with `wall_clock`: the stream is idle
        and its event time stands still) when it has not changed for the quiet period of wall time.
        """
        now = utc(self._clock())
        quiet = self.policy.resolve_after_seconds
        incidents: dict[str, list[Detection]] = {}
        for detection in detections:
            if not self.allowlisted(detection):
                add_to_incidents(incidents.setdefault(detection.dedup_key, []), detection, quiet)
        outcome = AlertOutcome()
        silences = records.silences(now) if self.policy.sinks and incidents else []
        latest = self._close_ended(records, incidents, now, silences, outcome)
        changes = self._upsert(records, latest, now)
        outcome.changes += [(latest[key], change) for key, change in changes.items()]
        notifications = []
        if self.policy.sinks:
            for change in changes.values():
                if change.change is Change.UNCHANGED:
                    continue
                alert, previous = change.alert, change.notified
                event = change_event(alert, previous, now, self.policy)
                if event is not None and silenced_by(alert, silences) is None:
                    notifications.append(
                        build_notification(event, alert, now, self.policy, previous.notified_severity)
                    )
        # Queued before the quiet alerts are looked up: an alert opened and gone quiet within this one
        # transaction (a backlog read in one batch) is then known as notified, and its resolution is sent.
        records.enqueue(notifications, self.policy.sinks, now)
        outcome.notifications += notifications
        resolved, resolutions = self._resolve_quiet(records, now, watermark, wall_clock, alert_watermark)
        outcome.resolved += resolved
        records.enqueue(resolutions, self.policy.sinks, now)
        outcome.notifications += resolutions
        self._respond(records, outcome, now)
        return outcome

    def acknowledge(self, records: AlertRecords, alert_id: int) -> AlertOutcome:
        """Mark open alert `alert_id` acknowledged and notify it (if its opening was notified); raises
        `LookupError` when there is no such open alert."""
        return self._operate(records, alert_id, NotificationEvent.ACKNOWLEDGED)

    def resolve(self, records: AlertRecords, alert_id: int) -> AlertOutcome:
        """Resolve open alert `alert_id` now and notify it (if its opening was notified); raises
        `LookupError` when there is no such open alert."""
        return self._operate(records, alert_id, NotificationEvent.RESOLVED)

    # -- internals ---------------------------------------------------------------------------------------

    def allowlisted(self, detection: Detection) -> bool:
        """True when the operators' allow-list covers every client of `detection` for its kind, none of
        them departed from its own baseline profile (`AllowList.excuses`): it is dropped, it never opens or
        changes an alert."""
        return self.allowlist.excuses(detection)

    def _close_ended(
        self,
        records: AlertRecords,
        incidents: dict[str, list[Detection]],
        now: datetime,
        silences: list[Silence],
        outcome: AlertOutcome,
    ) -> dict[str, Detection]:
        """Resolve each open alert that the latest incident of its key does not continue (updated first
        with the key's first incident when that one continues it), store every other incident that ended
        within the transaction as a resolved alert, and return the latest incident of each key (for
        `_upsert`)."""
        quiet = self.policy.resolve_after_seconds
        open_alerts = records.lock_open(list(incidents))
        resolved: list[Alert] = []
        notifications: list[Notification] = []
        ended: list[Detection] = []
        for key, found in incidents.items():
            tracked = open_alerts.get(key)
            if tracked is not None and (len(found) > 1 or not _continues(found[0], tracked.alert, quiet)):
                alert = tracked.alert
                if _continues(found[0], alert, quiet):
                    alert = _updated(alert, found[0], now) or alert
                    found = found[1:]
                resolved.append(_resolved(alert, now))
                if self.policy.sinks and tracked.notified.notified_at is not None:
                    notifications.append(
                        build_notification(NotificationEvent.RESOLVED, resolved[-1], now, self.policy)
                    )
            ended += [incident for incident in found[:-1] if incident.fired]
        records.save(resolved)
        closed = records.insert_resolved([_resolved(_opened(incident, now), now) for incident in ended])
        for alert, incident in zip(closed, ended, strict=True):
            outcome.changes.append((incident, AlertChange(alert, Change.OPENED)))
            if self.policy.sinks and self.policy.pages(alert) and silenced_by(alert, silences) is None:
                notifications += [
                    build_notification(event, alert, now, self.policy)
                    for event in (NotificationEvent.OPENED, NotificationEvent.RESOLVED)
                ]
        records.enqueue(notifications, self.policy.sinks, now)
        outcome.resolved += [*resolved, *closed]
        outcome.notifications += notifications
        return {key: found[-1] for key, found in incidents.items()}

    def _upsert(
        self, records: AlertRecords, detections: dict[str, Detection], now: datetime
    ) -> dict[str, AlertChange]:
        pending = dict(detections)
        changes: dict[str, AlertChange] = {}
        for _ in range(_ROUNDS):
            if not pending:
                return changes
            open_alerts = records.lock_open(list(pending))
            updated: list[Alert] = []
            for key, tracked in open_alerts.items():
                alert = _updated(tracked.alert, pending[key], now)
                if alert is None:
                    changes[key] = AlertChange(tracked.alert, Change.UNCHANGED, tracked.notified)
                else:
                    before = tracked.alert.severity
                    change = Change.ESCALATED if alert.severity.rank > before.rank else Change.UPDATED
                    changes[key] = AlertChange(alert, change, tracked.notified, before)
                    updated.append(alert)
            records.save(updated)
            # Detections that only hold keep an open alert alive; they open none.
            new = {
                key: detection
                for key, detection in pending.items()
                if key not in open_alerts and detection.fired
            }
            opened = records.insert([_opened(detection, now) for detection in new.values()])
            changes.update((key, AlertChange(alert, Change.OPENED)) for key, alert in opened.items())
            # An insert that conflicted lost the race to a concurrent writer that opened the alert after the
            # lookup: the next round finds that alert and updates it.
            pending = {key: detection for key, detection in new.items() if key not in opened}
        if pending:
            raise RuntimeError(
                f"alerts: neither an open alert nor room for one for {len(pending)} dedup keys,"
                f" such as {next(iter(pending))!r}; is uq_alerts_open_dedup_key a partial index?"
            )
        return changes

    def _resolve_quiet(
        self,
        records: AlertRecords,
        now: datetime,
        watermark: float | None,
        wall_clock: bool,
        alert_watermark: Callable[[Alert], float | None] | None,
    ) -> tuple[list[Alert], list[Notification]]:
        quiet = timedelta(seconds=self.policy.resolve_after_seconds)
        seen_before = utc(watermark) - quiet if watermark is not None else None
        tracked = records.lock_quiet(now - quiet if wall_clock else None, seen_before)
        if alert_watermark is not None:
            tracked = [
                entry
                for entry in tracked
                if (wall_clock and entry.alert.updated_at < now - quiet)
                or _quiet_at(entry.alert, alert_watermark(entry.alert), quiet)
            ]
        resolved = [_resolved(entry.alert, now) for entry in tracked]
        records.save(resolved)
        notifications = [
            build_notification(NotificationEvent.RESOLVED, alert, now, self.policy)
            for alert, entry in zip(resolved, tracked, strict=True)
            if self.policy.sinks and entry.notified.notified_at is not None
        ]
        return resolved, notifications

    def _operate(self, records: AlertRecords, alert_id: int, event: NotificationEvent) -> AlertOutcome:
        now = utc(self._clock())
        tracked = records.lock_open_by_id(alert_id)
        if tracked is None:
            raise LookupError(f"no open alert with id {alert_id}")
        if event is NotificationEvent.RESOLVED:
            alert = _resolved(tracked.alert, now)
            outcome = AlertOutcome(resolved=[alert])
        else:
            alert = tracked.alert.model_copy(update={"acknowledged_at": now, "updated_at": now})
            outcome = AlertOutcome()
        records.save([alert])
        if self.policy.sinks and tracked.notified.notified_at is not None:
            outcome.notifications.append(build_notification(event, alert, now, self.policy))
            records.enqueue(outcome.notifications, self.policy.sinks, now)
        self._respond(records, outcome, now)
        return outcome

    def _respond(self, records: AlertRecords, outcome: AlertOutcome, now: datetime) -> None:
        """Bring the risk decisions in step with what `outcome` did to the alerts (with a risk policy); a
        canary's alert takes none: gateways must let canaries through (allow)."""
        if self.risk is None:
            return
        changed = [
            change.alert
            for _, change in outcome.changes
            if change.change is not Change.UNCHANGED and not self.policy.is_canary(change.alert)
        ]
        self.risk.apply(records.risk, changed, outcome.resolved, now)


def load_risk_policy(settings: Settings) -> RiskPolicy:
    """The risk policy `settings` name; raises `ConfigError` (one line, naming the setting) on a bad one."""
    try:
        return RiskPolicy.load(settings.risk.policy_path)
    except ValueError as error:
        raise ConfigError(f"risk policy (MIA_RISK_POLICY_PATH): {error}") from None


def _opened(detection: Detection, now: datetime) -> Alert:
    """A new alert for `detection` (its id is given by storage)."""
    return Alert(
        id=0,
        dedup_key=detection.dedup_key,
        model=detection.model,
        kind=detection.kind,
        status=AlertStatus.OPEN,
        raised_at=now,
        updated_at=now,
        **_evidence_values(detection),
    )


def _updated(alert: Alert, detection: Detection, now: datetime) -> Alert | None:
    """`alert` with `detection` combined into it, or None when that changes none of its values."""
    values = _evidence_values(alert.as_detection().combined(detection))
    if all(getattr(alert, name) == value for name, value in values.items()):
        return None
    return alert.model_copy(update={**values, "updates": alert.updates + 1, "updated_at": now})


def _quiet_at(alert: Alert, watermark: float | None, quiet: timedelta) -> bool:
    """True when `alert`'s last query is the `quiet` period older than `watermark` (event time)."""
    return watermark is not None and alert.last_seen < utc(watermark) - quiet


def _continues(incident: Detection, alert: Alert, quiet_seconds: float) -> bool:
    """True when `incident` continues open `alert`: it began within the quiet period of its last query."""
    return incident.continues(alert.last_seen.timestamp(), quiet_seconds)


def _resolved(alert: Alert, now: datetime) -> Alert:
    return alert.model_copy(update={"status": AlertStatus.RESOLVED, "resolved_at": now, "updated_at": now})


def _evidence_values(detection: Detection) -> dict[str, object]:
    """The alert values a detection sets: what combining detections can change."""
    return {
        "client_ids": list(detection.client_ids),  # a group's alert names the clients of every detection
        "severity": detection.severity,
        "rule_id": detection.rule_id,
        "score": detection.score,
        "threshold": detection.threshold,
        "reasons": list(detection.reasons),
        "evidence": list(detection.evidence),
        "atlas_technique": detection.atlas_technique,
        "triage": detection.triage,
        # Compared as stored (microsecond datetimes): a detection sent again comes out unchanged although
        # its epoch seconds do not survive the round trip exactly.
        "first_seen": utc(detection.first_seen),
        "last_seen": utc(detection.last_seen),
        "queries": detection.queries,
        "detected_at": utc(detection.detected_at),
        "detected_after_queries": detection.detected_after_queries,
        "exposure": detection.exposure,
    }


def change_event(
    alert: Alert, state: NotificationState, now: datetime, policy: NotificationPolicy
) -> NotificationEvent | None:
    """The notification an opened or updated `alert` calls for now, or None.

    Below the policy's minimum severity: nothing. Never notified: opened (also for an alert that was opened
    under a since expired silence, or below the minimum severity and since escalated). A severity above the
    notified one: escalated. Otherwise updated, once `renotify_seconds` have passed since the last
    notification.
    """
    if not policy.pages(alert):
        return None
    if state.notified_at is None or state.notified_severity is None:
        return NotificationEvent.OPENED
    if alert.severity.rank > state.notified_severity.rank:
        return NotificationEvent.ESCALATED
    if (now - state.notified_at).total_seconds() >= policy.renotify_seconds:
        return NotificationEvent.UPDATED
    return None


def silenced_by(alert: Alert, silences: list[Silence]) -> Silence | None:
    """The first of the active `silences` that matches `alert`, or None."""
    return next((silence for silence in silences if silence.matches(alert)), None)


def build_notification(
    event: NotificationEvent,
    alert: Alert,
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
    alert = Alert.notice(
        dedup_key="mia-detector|test|test",
        model="mia-detector-test",
        client_id="mia-detector-test",
        kind=AlertKind.ANOMALOUS_SESSION,
        severity=Severity.LOW,
        rule_id="TEST",
        reason=Reason(feature="test", value=1.0),
        triage="A test notification sent by `mia-detector alerts test`: no action needed.",
        seen_at=now,
        raised_at=now,
    )
    return Notification(
        idempotency_key=uuid.uuid4().hex,
        event=NotificationEvent.TEST,
        created_at=now,
        alert=alert,
        dashboard_url=dashboard_url,
    )
