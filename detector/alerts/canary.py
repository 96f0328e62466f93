"""Detection canaries, checked: each canary injected is watched until the alert its attack must raise is
stored (passed, its latency recorded) or its deadline passes without it (missed: `canary_missed` is queued
in the outbox for every sink, as an alert change would be, and delivered by the dispatcher). The first
canary to pass after a miss queues `canary_recovered`, which resolves the miss at every receiver.

The alert is looked up in the database rather than heard of in this process: in a consumer group the
canary's records may land on a partition another member reads, and only a stored alert has been raised.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from detector.domain import (
    Alert,
    Canary,
    Notification,
    NotificationEvent,
    Reason,
    Severity,
    rfc3339,
    utc,
)
from detector.metrics import Metrics
from detector.storage import OutboxStore, StorageError, Store
from detector.storage.errors import describe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CanaryResult:
    """How one canary settled: `latency_seconds` from its injection to its alert being raised (None when
    no alert was found), passed when that is within the deadline."""

    canary: Canary
    latency_seconds: float | None
    passed: bool


class CanaryMonitor:
    """Watches canaries (`watch`) and settles them (`check`, called every second or so).

    A canary passes when the alert of its client and kind is stored no later than `deadline_seconds`
    after its injection; otherwise, once that time has passed, it is missed and `canary_missed` is queued
    for `sinks` (`wake` tells the dispatcher). A canary that passes while a miss is outstanding (the last
    canary notification queued is a `canary_missed`) queues `canary_recovered` for `sinks`. The outbox is
    read for that once, when the first canary passes, so that a miss queued before a restart is recovered
    too; from then on the monitor follows the misses and recoveries it queues itself.

    A database that cannot be read or written delays nothing: a canary not confirmed by its deadline is
    missed, and a `canary_missed` that cannot be queued is logged (the metrics still say it); a recovery
    that cannot be read or queued is logged and tried again when the next canary passes. `clock` returns the
    wall time in epoch seconds.
    """

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        deadline_seconds: float,
        *,
        sinks: Sequence[str] = (),
        wake: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._deadline = deadline_seconds
        self._sinks = tuple(sinks)
        self._wake = wake
        self._clock = clock
        self._watched: list[Canary] = []
        self._outbox = OutboxStore(store.engine)
        # The alert of the miss no recovery followed yet (None: none), once known: the outbox tells at the
        # first canary that passes, unless a miss raised here told before.
        self._outstanding: Alert | None = None
        self._outstanding_known = False

    @property
    def watched(self) -> list[Canary]:
        """The canaries not settled yet, oldest first."""
        return list(self._watched)

    def watch(self, canary: Canary) -> None:
        """Watch `canary` from now on (its deadline runs from its injection)."""
        self._watched.append(canary)
        self._metrics.canary_last_run.set(canary.injected_at)

    def check(self) -> list[CanaryResult]:
        """Settle every canary whose alert is stored or whose deadline has passed; return those results."""
        settled = []
        for canary in self.watched:
            raised = self._raised_at(canary)
            overdue = self._clock() >= canary.injected_at + self._deadline
            if raised is None and not overdue:
                continue
            latency = max(0.0, raised - canary.injected_at) if raised is not None else None
            result = CanaryResult(canary, latency, latency is not None and latency <= self._deadline)
            self._watched.remove(canary)
            self._settle(result)
            settled.append(result)
        return settled

    # -- internals ---------------------------------------------------------------------------------------

    def _raised_at(self, canary: Canary) -> float | None:
        """When the alert of `canary` was raised (epoch seconds), or None when none is stored (or the
        database cannot say now)."""
        try:
            found = self._store.alerts.list_alerts(client_id=canary.client_id, kind=canary.kind, limit=1)
        except SQLAlchemyError as error:
            log.warning("canary %s: alerts unreadable (%s)", canary.client_id, describe(error))
            return None
        return found[0].raised_at.timestamp() if found else None

    def _settle(self, result: CanaryResult) -> None:
        canary = result.canary
        self._metrics.canary_last_outcome.set(1.0 if result.passed else 0.0)
        if result.latency_seconds is not None:
            self._metrics.canary_last_latency.set(result.latency_seconds)
        if result.passed:
            log.info(
                "canary %s passed: alert raised %.2f s after injection",
                canary.client_id,
                result.latency_seconds,
            )
            self._recover(canary)
            return
        if result.latency_seconds is None:
            log.error(
                "canary %s missed: no %s alert within %g s of its injection",
                canary.client_id,
                canary.kind,
                self._deadline,
            )
        else:
            log.error(
                "canary %s missed: its %s alert came %.1f s after its injection, past the %g s deadline",
                canary.client_id,
                canary.kind,
                result.latency_seconds,
                self._deadline,
            )
        self._raise_missed(canary)

    def _raise_missed(self, canary: Canary) -> None:
        if not self._sinks:
            return
        missed = canary_missed(canary, self._deadline, self._clock())
        if self._queue(missed):
            self._outstanding, self._outstanding_known = missed.alert, True

    def _recover(self, canary: Canary) -> None:
        """Queue `canary_recovered` when a miss is outstanding: `canary` passed, so detection works again."""
        if not self._sinks:
            return
        missed = self._outstanding_miss()
        if missed is None:
            return
        recovered = canary_recovered(missed, canary, self._deadline, self._clock())
        if self._queue(recovered):
            log.info("canary_recovered queued: canaries pass again since %s missed", missed.client_id)
            self._outstanding = None

    def _outstanding_miss(self) -> Alert | None:
        """The alert of the miss no recovery followed yet; None when there is none, or when the outbox cannot
        say now (logged: the next canary that passes asks again)."""
        if not self._outstanding_known:
            events = (NotificationEvent.CANARY_MISSED, NotificationEvent.CANARY_RECOVERED)
            try:
                newest = self._outbox.newest_of(events)
            except StorageError as error:
                log.error("canary notifications unreadable, no recovery for now: %s", error)
                return None
            if newest is not None and newest.event is NotificationEvent.CANARY_MISSED:
                self._outstanding = newest.alert
            self._outstanding_known = True
        return self._outstanding

    def _queue(self, notification: Notification) -> bool:
        """Queue `notification` for every sink in a transaction of its own and wake the dispatcher; False
        (logged) when it could not be queued."""
        event = notification.event
        try:
            with self._store.transaction(f"queueing {event}") as transaction:
                transaction.alerts.enqueue([notification], self._sinks, notification.created_at)
        except StorageError as error:
            log.error("%s for %s not queued: %s", event, notification.alert.client_id, error)
            return False
        if self._wake is not None:
            self._wake()
        return True


def canary_missed(canary: Canary, deadline_seconds: float, now: float) -> Notification:
    """The notification that `canary`'s attack raised no alert within `deadline_seconds`: it carries the
    alert that was expected (never stored: id 0), named so that every miss of one kind on the canary model
    is one incident at the receivers that fold alerts by key (PagerDuty)."""
    alert = Alert.notice(
        dedup_key=f"{canary.model}|canary|{canary.kind}",
        model=canary.model,
        client_id=canary.client_id,
        kind=canary.kind,
        severity=Severity.HIGH,
        rule_id="CANARY",
        reason=Reason(feature="canary.deadline_seconds", value=deadline_seconds),
        triage=(
            f"The detector's own canary, {canary.queries} queries of {canary.kind.value.replace('_', ' ')} "
            f"injected into its input topic at {rfc3339(canary.injected_at)}, raised no alert within "
            f"{deadline_seconds:g} s: detection may be blind. Check the daemon's log and metrics (consumer "
            "lag, broker connection, database, outbox back-pressure) and that the rules in force still "
            "detect this attack. Not an attack; once a canary passes again, canary_recovered resolves this "
            "and mia_detector_canary_last_outcome returns to 1."
        ),
        seen_at=utc(canary.injected_at),
        raised_at=utc(now),
        queries=canary.queries,
    )
    return _notification(NotificationEvent.CANARY_MISSED, alert)


def canary_recovered(missed: Alert, canary: Canary, deadline_seconds: float, now: float) -> Notification:
    """The notification that detection works again: `canary` raised its alert within `deadline_seconds`
    after the miss whose alert is `missed`. It carries that alert resolved at `now`, with the miss's dedup
    key and client, so that each receiver closes what the miss opened (PagerDuty's incident, Alertmanager's
    alert, the OCSF finding, the Grafana annotation)."""
    alert = Alert.notice(
        dedup_key=missed.dedup_key,
        model=missed.model,
        client_id=missed.client_id,
        kind=missed.kind,
        severity=missed.severity,
        rule_id=missed.rule_id,
        reason=Reason(feature="canary.deadline_seconds", value=deadline_seconds),
        triage=(
            f"The detector's own canary {canary.client_id}, injected at {rfc3339(canary.injected_at)}, "
            f"raised its alert within {deadline_seconds:g} s: detection works again after the canary that "
            f"missed at {rfc3339(missed.raised_at.timestamp())}. Not an attack; nothing to do."
        ),
        seen_at=missed.first_seen,
        raised_at=missed.raised_at,
        queries=missed.queries,
        resolved_at=utc(now),
    )
    return _notification(NotificationEvent.CANARY_RECOVERED, alert)


def _notification(event: NotificationEvent, alert: Alert) -> Notification:
    """A notification of `event` carrying `alert`, written when the alert last changed, with an idempotency
    key of its own."""
    return Notification(
        idempotency_key=uuid.uuid4().hex, event=event, created_at=alert.updated_at, alert=alert
    )
