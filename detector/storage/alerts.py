"""Alerts in the database: persistence only. `AlertRepository` reads and writes alerts, silences and the
outbox inside a transaction someone else owns (the pipeline's commit point, or an operator's command);
`AlertStore` lists them. What happens to an alert is decided by `detector.alerts.lifecycle`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, bindparam, exists, func, insert, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Row

from detector.domain import (
    Alert,
    AlertKind,
    AlertStatus,
    Exposure,
    Notification,
    NotificationState,
    Reason,
    Severity,
    Silence,
    TrackedAlert,
)
from detector.settings import Settings
from detector.storage.base import Repository
from detector.storage.database import open_engine
from detector.storage.outbox import enqueue
from detector.storage.risk import RiskRepository
from detector.storage.silences import active_silences
from detector.storage.tables import OPEN_ALERT_CONDITION, AlertRow

# Keys per IN list: far below every backend's bound-parameter limit, large enough to need few statements.
_CHUNK = 500

_ALERTS = AlertRow.__table__

# What a later detection or an operator may change on an alert; the rest is fixed when it opens.
_MUTABLE = (
    "client_id",
    "client_ids",
    "severity",
    "status",
    "rule_id",
    "score",
    "threshold",
    "reasons",
    "evidence",
    "atlas_technique",
    "triage",
    "first_seen",
    "last_seen",
    "updated_at",
    "resolved_at",
    "acknowledged_at",
    "queries",
    "detected_at",
    "detected_after_queries",
    "updates",
    "exposure",
)


class AlertRepository:
    """The alerts, silences and outbox as seen from inside one transaction (`connection`'s: the caller
    commits). Open alerts read here are locked until it ends, so concurrent writers queue, never clash."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.risk = RiskRepository(connection)

    def lock_open(self, keys: Sequence[str]) -> dict[str, TrackedAlert]:
        """The open alerts of the dedup `keys`, by key, locked in key order (two writers of overlapping keys
        queue rather than deadlock)."""
        found: dict[str, TrackedAlert] = {}
        ordered = sorted(keys)
        for start in range(0, len(ordered), _CHUNK):
            query = (
                select(_ALERTS)
                .where(
                    AlertRow.status == AlertStatus.OPEN,
                    AlertRow.dedup_key.in_(ordered[start : start + _CHUNK]),
                )
                .order_by(AlertRow.dedup_key)
                .with_for_update()
            )
            found.update((row.dedup_key, _tracked(row)) for row in self._connection.execute(query))
        return found

    def lock_open_by_id(self, alert_id: int) -> TrackedAlert | None:
        """Open alert `alert_id`, locked; None when there is no such open alert."""
        query = (
            select(_ALERTS)
            .where(AlertRow.id == alert_id, AlertRow.status == AlertStatus.OPEN)
            .with_for_update()
        )
        row = self._connection.execute(query).first()
        return _tracked(row) if row is not None else None

    def lock_quiet(self, changed_before: datetime | None, seen_before: datetime | None) -> list[TrackedAlert]:
        """The open alerts unchanged since before `changed_before` (wall time) or whose last query is before
        `seen_before` (event time), locked, in id order; a bound that is None holds for none."""
        conditions = []
        if changed_before is not None:
            conditions.append(AlertRow.updated_at < changed_before)
        if seen_before is not None:
            conditions.append(AlertRow.last_seen < seen_before)
        if not conditions:
            return []
        quiet = or_(*conditions)
        query = (
            select(_ALERTS)
            .where(AlertRow.status == AlertStatus.OPEN, quiet)
            .order_by(AlertRow.id)
            .with_for_update()
        )
        return [_tracked(row) for row in self._connection.execute(query)]

    def insert(self, alerts: Sequence[Alert]) -> dict[str, Alert]:
        """Open each of `alerts` (their `id` is ignored) unless an alert of its key is open already: returns
        those written, with their ids, by key. A key left out lost a race with a concurrent writer."""
        if not alerts:
            return {}
        unless_open = (
            sqlite.insert(AlertRow)
            if self._connection.dialect.name == "sqlite"
            else postgresql.insert(AlertRow)
        )
        statement = unless_open.on_conflict_do_nothing(
            index_elements=["dedup_key"], index_where=text(OPEN_ALERT_CONDITION)
        ).returning(AlertRow.dedup_key, AlertRow.id)
        by_key = {alert.dedup_key: alert for alert in alerts}
        # In key order, as `lock_open` locks.
        rows = [_row(by_key[key]) for key in sorted(by_key)]
        return {
            key: by_key[key].model_copy(update={"id": alert_id})
            for key, alert_id in self._connection.execute(statement, rows)
        }

    def insert_resolved(self, alerts: Sequence[Alert]) -> list[Alert]:
        """Store `alerts`, resolved already (incidents that began and ended within one transaction), in
        order; returns them with their ids. Several may share a dedup key: only open alerts are unique."""
        stored = []
        for alert in alerts:
            if alert.status is AlertStatus.OPEN:
                raise ValueError(f"alert {alert.dedup_key!r} is open: use insert")
            statement = insert(AlertRow).values(_row(alert)).returning(AlertRow.id)
            stored.append(alert.model_copy(update={"id": self._connection.execute(statement).scalar_one()}))
        return stored

    def save(self, alerts: Sequence[Alert]) -> None:
        """Write the changeable values (`_MUTABLE`) of `alerts`, each by id."""
        if alerts:
            self._connection.execute(
                update(AlertRow).where(AlertRow.id == bindparam("alert_id")),
                [{"alert_id": alert.id, **_values(alert, _MUTABLE)} for alert in alerts],
            )

    def silences(self, now: datetime) -> list[Silence]:
        """The silences in force at `now`, oldest first."""
        return active_silences(self._connection, now)

    def enqueue(self, notifications: Sequence[Notification], sinks: Sequence[str], now: datetime) -> None:
        """Queue `notifications` for every one of `sinks` and remember, per alert, the last one notified."""
        if not notifications:
            return
        enqueue(self._connection, notifications, sinks, now)
        latest = {notification.alert.id: notification.alert.severity for notification in notifications}
        self._connection.execute(
            update(AlertRow).where(AlertRow.id == bindparam("alert_id")),
            [
                {"alert_id": alert_id, "notified_at": now, "notified_severity": severity.value}
                for alert_id, severity in latest.items()
            ],
        )


def open_alert_store(settings: Settings, migrate: bool | None = None) -> AlertStore:
    """The alert store at the configured database URL, migrated to the latest schema unless told otherwise
    (see `open_engine`)."""
    return AlertStore(open_engine(settings, migrate))


class AlertStore(Repository):
    """Lists the alerts (the CLI's view); writes go through `AlertRepository` in a transaction."""

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
    ) -> list[Alert]:
        """Up to `limit` alerts (None: all), optionally of one status, kind and client (alone, or among the
        clients of a coordinated alert), newest raised first."""
        query = select(_ALERTS).order_by(AlertRow.raised_at.desc(), AlertRow.id.desc()).limit(limit)
        if status is not None:
            query = query.where(AlertRow.status == status)
        if client_id is not None:
            query = query.where(or_(AlertRow.client_id == client_id, self._names(client_id)))
        if kind is not None:
            query = query.where(AlertRow.kind == kind)
        with self._engine.connect() as connection:
            return [_alert(row) for row in connection.execute(query)]

    def _names(self, client_id: str) -> ColumnElement[bool]:
        """True for an alert whose `client_ids` hold `client_id` (a JSON array: unindexed, read row by row;
        the primary client, indexed, is matched apart)."""
        elements = "json_each" if self._engine.dialect.name == "sqlite" else "json_array_elements_text"
        ids = getattr(func, elements)(AlertRow.client_ids).table_valued("value")
        return exists().select_from(ids).where(ids.c.value == client_id)


def _values(alert: Alert, columns: Sequence[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in columns:
        value = getattr(alert, name)
        if name == "reasons":
            value = [reason.model_dump(mode="json") for reason in alert.reasons]
        elif name == "exposure":
            value = alert.exposure.model_dump() if alert.exposure is not None else None
        elif name in ("severity", "status", "kind"):
            value = value.value
        values[name] = value
    return values


def _row(alert: Alert) -> dict[str, Any]:
    return {
        "dedup_key": alert.dedup_key,
        "model": alert.model,
        "kind": alert.kind.value,
        "raised_at": alert.raised_at,
        "notified_at": None,
        "notified_severity": None,
        **_values(alert, _MUTABLE),
    }


def _alert(row: Row[Any]) -> Alert:
    return Alert(
        id=row.id,
        dedup_key=row.dedup_key,
        model=row.model,
        client_ids=list(row.client_ids),
        kind=AlertKind(row.kind),
        severity=Severity(row.severity),
        status=AlertStatus(row.status),
        rule_id=row.rule_id,
        score=row.score,
        threshold=row.threshold,
        reasons=[_reason(stored) for stored in row.reasons],
        evidence=list(row.evidence),
        atlas_technique=row.atlas_technique,
        triage=row.triage,
        first_seen=row.first_seen,
        last_seen=row.last_seen,
        raised_at=row.raised_at,
        updated_at=row.updated_at,
        resolved_at=row.resolved_at,
        acknowledged_at=row.acknowledged_at,
        queries=row.queries,
        detected_at=row.detected_at,
        detected_after_queries=row.detected_after_queries,
        updates=row.updates,
        exposure=Exposure(**row.exposure) if row.exposure is not None else None,
    )


def _reason(stored: dict[str, Any]) -> Reason:
    # `text` is derived: the copy stored for the dashboards' SQL is not read back.
    return Reason(**{key: value for key, value in stored.items() if key != "text"})


def _tracked(row: Row[Any]) -> TrackedAlert:
    severity = Severity(row.notified_severity) if row.notified_severity else None
    return TrackedAlert(_alert(row), NotificationState(row.notified_at, severity))
