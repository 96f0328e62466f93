"""Alerts in the database: detections become open alerts, one per dedup key, updated while they stay open,
resolved when quiet; every change that calls for a notification queues it in the outbox, atomically.

`AlertStore.upsert` can join the caller's transaction, so the pipeline stores alerts atomically with the
results they were derived from.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import Engine, bindparam, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Row

from detector.alerts.lifecycle import (
    NotificationPolicy,
    NotificationState,
    build_notification,
    change_event,
    silenced_by,
)
from detector.alerts.model import AlertKind, AlertStatus, Detection, Reason, Severity
from detector.alerts.notification import AlertReason, AlertSnapshot, Notification, NotificationEvent
from detector.storage.base import Repository
from detector.storage.outbox import enqueue
from detector.storage.silences import active_silences
from detector.storage.tables import OPEN_ALERT_CONDITION, AlertRow

# Keys per IN list: far below every backend's bound-parameter limit, large enough to need few statements.
_CHUNK = 500

_ALERTS = AlertRow.__table__
# Lookup-and-insert rounds per upsert: a conflict means a concurrent writer opened the alert, which the second
# round updates; a third covers that alert being resolved in between. More means the schema is wrong.
_ROUNDS = 3


class Change(StrEnum):
    """What an upsert did to the alert of a detection."""

    OPENED = "opened"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class AlertChange:
    """The alert a detection went to, and what happened to it."""

    alert_id: int
    dedup_key: str
    change: Change


@dataclass
class AlertUpdate:
    """What one transaction did to the alerts: the detections' changes, the alerts resolved, and the
    notifications queued in the outbox for them."""

    changes: list[AlertChange] = field(default_factory=list)
    resolved: list[StoredAlert] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)


@dataclass(frozen=True)
class StoredAlert:
    """An alert as stored. `first_seen` and `last_seen` are event time; every datetime is aware UTC."""

    id: int
    dedup_key: str
    model: str
    client_id: str
    client_ids: tuple[str, ...]
    kind: AlertKind
    severity: Severity
    status: AlertStatus
    rule_id: str
    score: float
    threshold: float
    reasons: list[Reason]
    evidence: list[str]
    atlas_technique: str
    triage: str
    first_seen: datetime
    last_seen: datetime
    raised_at: datetime
    updated_at: datetime
    resolved_at: datetime | None
    queries: int
    updates: int
    acknowledged_at: datetime | None = None
    notified_at: datetime | None = None
    notified_severity: Severity | None = None

    def snapshot(self) -> AlertSnapshot:
        """The alert as a notification carries it."""
        return AlertSnapshot(
            id=self.id,
            dedup_key=self.dedup_key,
            model=self.model,
            client_ids=list(self.client_ids),
            kind=self.kind,
            severity=self.severity,
            status=self.status,
            rule_id=self.rule_id,
            score=self.score,
            threshold=self.threshold,
            reasons=[AlertReason(**vars(reason)) for reason in self.reasons],
            evidence=list(self.evidence),
            atlas_technique=self.atlas_technique,
            triage=self.triage,
            first_seen=self.first_seen,
            last_seen=self.last_seen,
            raised_at=self.raised_at,
            resolved_at=self.resolved_at,
            acknowledged_at=self.acknowledged_at,
            queries=self.queries,
        )

    def as_detection(self) -> Detection:
        """The alert as the one detection that all its detections combine into."""
        return Detection(
            model=self.model,
            client_ids=self.client_ids,
            kind=self.kind,
            severity=self.severity,
            rule_id=self.rule_id,
            score=self.score,
            threshold=self.threshold,
            reasons=list(self.reasons),
            evidence=list(self.evidence),
            first_seen=self.first_seen.timestamp(),
            last_seen=self.last_seen.timestamp(),
            queries=self.queries,
            atlas_technique=self.atlas_technique,
            triage=self.triage,
        )


class AlertStore(Repository):
    """Reads and writes the `alerts` table on SQLite or PostgreSQL (migrated to head beforehand).

    `clock` returns the current time in epoch seconds; it stamps `raised_at`, `updated_at` and `resolved_at`.
    `policy` says which sinks alert changes notify (none by default) and when an alert is quiet.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], float] = time.time,
        policy: NotificationPolicy | None = None,
    ) -> None:
        super().__init__(engine, clock=clock)
        self._policy = policy or NotificationPolicy()

    def upsert(
        self, detections: Sequence[Detection], connection: Connection | None = None
    ) -> list[AlertChange]:
        """Record `detections`: update the open alert of each dedup key, or open one.

        Returns one change per detection, in order; detections sharing a dedup key are combined first
        (`Detection.combined`) and share one change. An alert is "unchanged" when combining changed none of
        its values: it is then not written at all. Otherwise `updates` counts one more and `updated_at` is
        now. Everything happens in one transaction: `connection`'s when given (the caller commits), else a
        new one. Concurrent writers never open a second alert for one key: they update the alert the first
        one opened.
        """
        pending: dict[str, Detection] = {}
        for detection in detections:
            key = detection.dedup_key
            pending[key] = pending[key].combined(detection) if key in pending else detection
        if not pending:
            return []
        now = _utc(self._clock())
        with self._transaction(connection) as transaction:
            lock_sqlite(transaction)
            changes = self._apply(transaction, pending, now)
        return [changes[detection.dedup_key] for detection in detections]

    def open_alert_count(self) -> int:
        """How many alerts are open."""
        query = select(func.count()).select_from(AlertRow).where(AlertRow.status == AlertStatus.OPEN)
        with self._engine.connect() as connection:
            return connection.execute(query).scalar_one()

    def list_alerts(
        self,
        status: str | None = None,
        client_id: str | None = None,
        kind: str | None = None,
        limit: int | None = 1000,
    ) -> list[StoredAlert]:
        """Up to `limit` alerts (None: all), optionally of one status, client and kind, newest raised first.

        `client_id` matches an alert's primary client only.
        """
        query = select(_ALERTS).order_by(AlertRow.raised_at.desc(), AlertRow.id.desc()).limit(limit)
        if status is not None:
            query = query.where(AlertRow.status == status)
        if client_id is not None:
            query = query.where(AlertRow.client_id == client_id)
        if kind is not None:
            query = query.where(AlertRow.kind == kind)
        with self._engine.connect() as connection:
            return [_stored_alert(row) for row in connection.execute(query)]

    def record(
        self,
        connection: Connection,
        detections: Sequence[Detection],
        watermark: float | None = None,
    ) -> AlertUpdate:
        """In the caller's transaction: upsert `detections`, resolve quiet alerts, queue notifications.

        An alert is quiet when its last detection is the quiet period older than the `watermark` (event
        time, epoch seconds; the newest event time of the stream), or when it has not changed for the
        quiet period of wall time. Notifications follow `detector.alerts.lifecycle` and the policy's sinks.
        """
        update_ = AlertUpdate(changes=self.upsert(detections, connection) if detections else [])
        now = _utc(self._clock())
        changed = [change.alert_id for change in update_.changes if change.change != Change.UNCHANGED]
        notify = bool(self._policy.sinks)
        if notify and changed:
            silences = active_silences(connection, now)
            for alert in _alerts_by_id(connection, changed):
                snapshot = alert.snapshot()
                state = NotificationState(alert.notified_at, alert.notified_severity)
                event = change_event(snapshot, state, now, self._policy)
                if event is None or silenced_by(snapshot, silences) is not None:
                    continue
                update_.notifications.append(
                    build_notification(event, snapshot, now, self._policy, alert.notified_severity)
                )
        update_.resolved = self._resolve_quiet(connection, now, watermark)
        if notify:
            update_.notifications.extend(
                build_notification(NotificationEvent.RESOLVED, alert.snapshot(), now, self._policy)
                for alert in update_.resolved
                if alert.notified_at is not None
            )
            self._queue(connection, update_.notifications, now)
        return update_

    def resolve_quiet(self, watermark: float | None = None) -> AlertUpdate:
        """`record` without detections, in a transaction of its own: resolves the quiet alerts."""
        with self._engine.begin() as connection:
            lock_sqlite(connection)
            return self.record(connection, [], watermark)

    def acknowledge(self, alert_id: int) -> AlertUpdate:
        """Mark open alert `alert_id` acknowledged and notify it (if it was notified); raises `LookupError`
        when there is no such open alert."""
        return self._operate(alert_id, NotificationEvent.ACKNOWLEDGED, {"acknowledged_at": ...})

    def resolve(self, alert_id: int) -> AlertUpdate:
        """Resolve open alert `alert_id` now and notify it (if it was notified); raises `LookupError` when
        there is no such open alert."""
        return self._operate(
            alert_id,
            NotificationEvent.RESOLVED,
            {"status": AlertStatus.RESOLVED.value, "resolved_at": ...},
        )

    # -- internals ---------------------------------------------------------------------------------------

    def _operate(self, alert_id: int, event: NotificationEvent, values: dict[str, Any]) -> AlertUpdate:
        """Set `values` (`...` standing for now) on open alert `alert_id` and notify `event` if notified."""
        now = _utc(self._clock())
        stamped = {name: now if value is ... else value for name, value in values.items()}
        with self._engine.begin() as connection:
            lock_sqlite(connection)
            found = connection.execute(
                update(AlertRow)
                .where(AlertRow.id == alert_id, AlertRow.status == AlertStatus.OPEN)
                .values(**stamped, updated_at=now)
                .returning(AlertRow.id)
            ).first()
            if found is None:
                raise LookupError(f"no open alert with id {alert_id}")
            (alert,) = _alerts_by_id(connection, [alert_id])
            outcome = AlertUpdate(resolved=[alert] if event is NotificationEvent.RESOLVED else [])
            if self._policy.sinks and alert.notified_at is not None:
                outcome.notifications.append(build_notification(event, alert.snapshot(), now, self._policy))
                self._queue(connection, outcome.notifications, now)
        return outcome

    def _resolve_quiet(
        self, connection: Connection, now: datetime, watermark: float | None
    ) -> list[StoredAlert]:
        quiet_period = self._policy.resolve_after_seconds
        quiet = AlertRow.updated_at < now - timedelta(seconds=quiet_period)
        if watermark is not None:
            quiet = or_(quiet, AlertRow.last_seen < _utc(watermark - quiet_period))
        resolved_ids = list(
            connection.execute(
                update(AlertRow)
                .where(AlertRow.status == AlertStatus.OPEN, quiet)
                .values(status=AlertStatus.RESOLVED.value, resolved_at=now, updated_at=now)
                .returning(AlertRow.id)
            ).scalars()
        )
        return _alerts_by_id(connection, resolved_ids)

    def _queue(self, connection: Connection, notifications: list[Notification], now: datetime) -> None:
        """Put `notifications` in the outbox and remember, per alert, what was last notified."""
        if not notifications:
            return
        enqueue(connection, notifications, self._policy.sinks, now)
        latest = {notification.alert.id: notification.alert.severity for notification in notifications}
        connection.execute(
            update(AlertRow).where(AlertRow.id == bindparam("alert_id")),
            [
                {"alert_id": alert_id, "notified_at": now, "notified_severity": severity.value}
                for alert_id, severity in latest.items()
            ],
        )

    @contextmanager
    def _transaction(self, connection: Connection | None) -> Iterator[Connection]:
        if connection is not None:
            yield connection
            return
        with self._engine.begin() as owned:
            yield owned

    def _apply(
        self, connection: Connection, pending: dict[str, Detection], now: datetime
    ) -> dict[str, AlertChange]:
        changes: dict[str, AlertChange] = {}
        for _ in range(_ROUNDS):
            open_alerts = _lock_open_alerts(connection, sorted(pending))
            changes.update(_update(connection, open_alerts, pending, now))
            new = {key: detection for key, detection in pending.items() if key not in open_alerts}
            opened = self._insert(connection, new, now)
            changes.update(
                (key, AlertChange(alert_id, key, Change.OPENED)) for key, alert_id in opened.items()
            )
            # An insert that conflicted lost the race to a concurrent writer that opened the alert after the
            # lookup: the next round finds that alert and updates it.
            pending = {key: detection for key, detection in new.items() if key not in opened}
            if not pending:
                return changes
        raise RuntimeError(
            f"alerts table: neither an open alert nor room for one for {len(pending)} dedup keys,"
            f" such as {next(iter(pending))!r}; is uq_alerts_open_dedup_key a partial index?"
        )

    def _insert(self, connection: Connection, new: dict[str, Detection], now: datetime) -> dict[str, int]:
        """Open an alert per detection unless one is open already; the ids of those opened, by key."""
        if not new:
            return {}
        insert = (
            sqlite.insert(AlertRow) if connection.dialect.name == "sqlite" else postgresql.insert(AlertRow)
        )
        statement = insert.on_conflict_do_nothing(
            index_elements=["dedup_key"], index_where=text(OPEN_ALERT_CONDITION)
        ).returning(AlertRow.dedup_key, AlertRow.id)
        # In key order, as `_lock_open_alerts` locks: two writers of overlapping keys queue, not deadlock.
        rows = [_new_row(key, new[key], now) for key in sorted(new)]
        return {key: alert_id for key, alert_id in connection.execute(statement, rows)}


def _alerts_by_id(connection: Connection, alert_ids: list[int]) -> list[StoredAlert]:
    """The alerts of `alert_ids`, in id order."""
    found: list[StoredAlert] = []
    for start in range(0, len(alert_ids), _CHUNK):
        chunk = alert_ids[start : start + _CHUNK]
        query = select(_ALERTS).where(AlertRow.id.in_(chunk))
        found.extend(_stored_alert(row) for row in connection.execute(query))
    return sorted(found, key=lambda alert: alert.id)


def lock_sqlite(connection: Connection) -> None:
    """On SQLite, take the database's write lock now, at the start of the transaction."""
    # pysqlite begins a transaction only at the first write, so another writer could change an alert between
    # this transaction reading it and writing it back: take SQLite's write lock before reading. (PostgreSQL
    # locks the rows read instead, with FOR UPDATE.)
    if connection.dialect.name != "sqlite":
        return
    if not cast(sqlite3.Connection, connection.connection.dbapi_connection).in_transaction:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _lock_open_alerts(connection: Connection, keys: list[str]) -> dict[str, Row[Any]]:
    """The open alerts of `keys` (sorted), locked in key order until the transaction ends, by key."""
    found: dict[str, Row[Any]] = {}
    for start in range(0, len(keys), _CHUNK):
        query = (
            select(_ALERTS)
            .where(AlertRow.status == AlertStatus.OPEN, AlertRow.dedup_key.in_(keys[start : start + _CHUNK]))
            .order_by(AlertRow.dedup_key)
            .with_for_update()
        )
        found.update((row.dedup_key, row) for row in connection.execute(query))
    return found


def _update(
    connection: Connection, open_alerts: dict[str, Row[Any]], pending: dict[str, Detection], now: datetime
) -> dict[str, AlertChange]:
    changes: dict[str, AlertChange] = {}
    rows: list[dict[str, Any]] = []
    for key, row in open_alerts.items():
        combined = _stored_alert(row).as_detection().combined(pending[key])
        # Compared as stored (microsecond datetimes, JSON values), not as floats: a detection sent again
        # must come out unchanged although its epoch seconds do not survive the round trip exactly.
        values = _merged_values(combined)
        if all(getattr(row, name) == value for name, value in values.items()):
            changes[key] = AlertChange(row.id, key, Change.UNCHANGED)
            continue
        changes[key] = AlertChange(row.id, key, Change.UPDATED)
        rows.append({"alert_id": row.id, **values, "updates": row.updates + 1, "updated_at": now})
    if rows:
        connection.execute(update(AlertRow).where(AlertRow.id == bindparam("alert_id")), rows)
    return changes


def _merged_values(detection: Detection) -> dict[str, Any]:
    """The columns that combining detections can change."""
    return {
        "severity": detection.severity.value,
        "rule_id": detection.rule_id,
        "score": detection.score,
        "threshold": detection.threshold,
        "reasons": [
            {"feature": r.feature, "value": r.value, "baseline_percentile": r.baseline_percentile}
            for r in detection.reasons
        ],
        "evidence": detection.evidence,
        "atlas_technique": detection.atlas_technique,
        "triage": detection.triage,
        "first_seen": _utc(detection.first_seen),
        "last_seen": _utc(detection.last_seen),
        "queries": detection.queries,
    }


def _new_row(key: str, detection: Detection, now: datetime) -> dict[str, Any]:
    return {
        "dedup_key": key,
        "model": detection.model,
        "client_id": detection.client_id,
        "client_ids": list(detection.client_ids),
        "kind": detection.kind.value,
        "status": AlertStatus.OPEN.value,
        **_merged_values(detection),
        "raised_at": now,
        "updated_at": now,
        "resolved_at": None,
        "updates": 0,
        "acknowledged_at": None,
        "notified_at": None,
        "notified_severity": None,
    }


def _stored_alert(row: Row[Any]) -> StoredAlert:
    return StoredAlert(
        id=row.id,
        dedup_key=row.dedup_key,
        model=row.model,
        client_id=row.client_id,
        client_ids=tuple(row.client_ids),
        kind=AlertKind(row.kind),
        severity=Severity(row.severity),
        status=AlertStatus(row.status),
        rule_id=row.rule_id,
        score=row.score,
        threshold=row.threshold,
        reasons=[Reason(**reason) for reason in row.reasons],
        evidence=list(row.evidence),
        atlas_technique=row.atlas_technique,
        triage=row.triage,
        first_seen=row.first_seen,
        last_seen=row.last_seen,
        raised_at=row.raised_at,
        updated_at=row.updated_at,
        resolved_at=row.resolved_at,
        queries=row.queries,
        updates=row.updates,
        acknowledged_at=row.acknowledged_at,
        notified_at=row.notified_at,
        notified_severity=Severity(row.notified_severity) if row.notified_severity else None,
    )


def _utc(epoch_seconds: float) -> datetime:
    return datetime.fromtimestamp(epoch_seconds, UTC)
