"""Deleting stored data past its retention: sessions, client states, dead letters, the seen-event ledger,
resolved alerts (with their evidence) and delivered notifications.

Deletion goes in chunks of `RetentionPolicy.chunk_rows`, each chunk a short transaction of its own, so that
the pipeline's commit never waits long behind it. It runs outside the pipeline's transaction, from its own
connection: `mia-detector retention run`, or the daemon's scheduled run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Engine, delete, exists, select, tuple_
from sqlalchemy.orm import InstrumentedAttribute

from detector.domain import AlertStatus
from detector.settings import Settings
from detector.storage.base import Repository
from detector.storage.database import open_engine
from detector.storage.errors import storage_errors
from detector.storage.outbox import DeliveryStatus
from detector.storage.tables import (
    AlertRow,
    Base,
    ClientStateRow,
    CoordinationPoolRow,
    DeadLetterRow,
    ModelScaleRow,
    NotificationRow,
    RiskAuditRow,
    RiskDecisionRow,
    SeenEventRow,
    SessionRow,
)

DAY = 86_400.0
# On SQLite a chunk holds the one write lock, which a waiting writer (the pipeline) polls for every few
# milliseconds: a pause between chunks lets it in. PostgreSQL locks rows, and needs none.
SQLITE_PAUSE_SECONDS = 0.1


@dataclass(frozen=True)
class RetentionPolicy:
    """How long each kind of stored data is kept (seconds; None: for good), and how many rows one delete
    statement removes at most."""

    sessions: float | None
    client_states: float | None
    dead_letters: float | None
    seen_events: float | None
    alerts: float | None
    notifications: float | None
    risk: float | None
    chunk_rows: int = 1000

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        """The policy of `settings.retention`, with the seen-event ledger kept as long as
        `settings.database.seen_events_retention_hours` says (the pipeline forgets by the same measure)."""
        retention = settings.retention

        def seconds(days: float | None) -> float | None:
            return None if days is None else days * DAY

        return cls(
            sessions=seconds(retention.sessions_days),
            client_states=seconds(retention.client_states_days),
            dead_letters=seconds(retention.dead_letters_days),
            seen_events=settings.database.seen_events_retention_hours * 3600.0,
            alerts=seconds(retention.alerts_days),
            notifications=seconds(retention.notifications_days),
            risk=seconds(retention.risk_days),
        )


class Purge(NamedTuple):
    """What one table lost: rows stored before `before` (None: that table is kept for good), `deleted`."""

    table: str
    before: datetime | None
    deleted: int


def open_retention(settings: Settings, migrate: bool | None = None) -> Retention:
    """Retention on the configured database, migrated to the latest schema unless told otherwise (see
    `open_engine`)."""
    return Retention(open_engine(settings, migrate))


class Retention(Repository):
    """Deletes rows past their retention, one table at a time, in chunks.

    What counts as the age of a row: a session's last write (`updated_at`: a session is written a last
    time when it closes), a client state's last write (`updated_at`: written at each commit that changed
    it, so about the time its client's latest query reached the detector), a dead letter's storing
    (`created_at`), an event id's processing (`seen_at`), an alert's resolution (`resolved_at`; open and
    acknowledged alerts are never deleted), a notification's delivery (`delivered_at`; pending and failed
    ones are never deleted), a risk audit entry's making (`at`) and a risk decision's expiry (`expires_at`;
    decisions without one, or not yet expired, are never deleted). All are wall-clock times of this
    detector, never a record's own timestamp, which its sender controls.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], float] = time.time,
        pause_seconds: float | None = None,
    ) -> None:
        super().__init__(engine, clock=clock)
        if pause_seconds is None:
            pause_seconds = SQLITE_PAUSE_SECONDS if engine.dialect.name == "sqlite" else 0.0
        self._pause = pause_seconds

    def apply(self, policy: RetentionPolicy, stop: threading.Event | None = None) -> list[Purge]:
        """Delete from every table what `policy` no longer keeps, measured from now; one `Purge` a table,
        in the order of `detector.metrics.RETENTION_TABLES`.

        Setting `stop` ends the work after the chunk in progress (the tables not reached count 0 deleted).
        Raises `StorageUnavailable` or `StorageFailed` (rows deleted by earlier chunks stay deleted).
        """
        stop = stop or threading.Event()
        now = self._clock()
        steps: list[tuple[str, float | None, Callable[[datetime, int, threading.Event], int]]] = [
            ("sessions", policy.sessions, self.delete_sessions),
            ("client_states", policy.client_states, self.delete_client_states),
            ("dead_letters", policy.dead_letters, self.delete_dead_letters),
            ("seen_events", policy.seen_events, self.delete_seen_events),
            ("alerts", policy.alerts, self.delete_resolved_alerts),
            ("notifications", policy.notifications, self.delete_delivered_notifications),
            ("risk_audit", policy.risk, self.delete_risk_history),
        ]
        purges = []
        for table, keep, delete_before in steps:
            if keep is None:
                purges.append(Purge(table, None, 0))
                continue
            before = datetime.fromtimestamp(now - keep, UTC)
            deleted = 0 if stop.is_set() else delete_before(before, policy.chunk_rows, stop)
            purges.append(Purge(table, before, deleted))
        return purges

    def delete_sessions(self, before: datetime, chunk_rows: int, stop: threading.Event | None = None) -> int:
        """Delete sessions last written before `before`; return how many."""
        return self._delete(
            SessionRow, (SessionRow.id,), SessionRow.updated_at < before, "sessions", chunk_rows, stop
        )

    def delete_client_states(
        self, before: datetime, chunk_rows: int, stop: threading.Event | None = None
    ) -> int:
        """Delete the client states last written before `before` (idle clients) and the coordination pools
        too, then the input scales learned before `before` that no client state is built on any more; return
        how many client states."""
        keys = (ClientStateRow.model, ClientStateRow.client_id)
        condition = ClientStateRow.updated_at < before
        deleted = self._delete(ClientStateRow, keys, condition, "client states", chunk_rows, stop)
        pools = (CoordinationPoolRow.model, CoordinationPoolRow.network)
        idle = CoordinationPoolRow.updated_at < before
        self._delete(CoordinationPoolRow, pools, idle, "coordination pools", chunk_rows, stop)
        unused = (ModelScaleRow.updated_at < before) & ~exists().where(
            ClientStateRow.model == ModelScaleRow.model
        )
        self._delete(ModelScaleRow, (ModelScaleRow.model,), unused, "input scales", chunk_rows, stop)
        return deleted

    def delete_dead_letters(
        self, before: datetime, chunk_rows: int, stop: threading.Event | None = None
    ) -> int:
        """Delete dead letters stored before `before`; return how many."""
        condition = DeadLetterRow.created_at < before
        return self._delete(DeadLetterRow, (DeadLetterRow.id,), condition, "dead letters", chunk_rows, stop)

    def delete_seen_events(
        self, before: datetime, chunk_rows: int, stop: threading.Event | None = None
    ) -> int:
        """Forget event ids processed before `before`; return how many."""
        condition = SeenEventRow.seen_at < before
        return self._delete(
            SeenEventRow, (SeenEventRow.event_id,), condition, "seen events", chunk_rows, stop
        )

    def delete_resolved_alerts(
        self, before: datetime, chunk_rows: int, stop: threading.Event | None = None
    ) -> int:
        """Delete alerts resolved before `before`, with their reasons and evidence; return how many."""
        condition = (AlertRow.status == AlertStatus.RESOLVED.value) & (AlertRow.resolved_at < before)
        return self._delete(AlertRow, (AlertRow.id,), condition, "resolved alerts", chunk_rows, stop)

    def delete_delivered_notifications(
        self, before: datetime, chunk_rows: int, stop: threading.Event | None = None
    ) -> int:
        """Delete notifications delivered before `before`; return how many."""
        condition = (NotificationRow.status == DeliveryStatus.DELIVERED.value) & (
            NotificationRow.delivered_at < before
        )
        what = "delivered notifications"
        return self._delete(NotificationRow, (NotificationRow.id,), condition, what, chunk_rows, stop)

    def delete_risk_history(
        self, before: datetime, chunk_rows: int, stop: threading.Event | None = None
    ) -> int:
        """Delete the risk audit entries made before `before`, and the risk decisions that expired before
        it (in force no longer, kept meanwhile to be listed); return how many audit entries."""
        expired = RiskDecisionRow.expires_at < before
        keys = (RiskDecisionRow.model, RiskDecisionRow.client_id, RiskDecisionRow.origin)
        self._delete(RiskDecisionRow, keys, expired, "expired risk decisions", chunk_rows, stop)
        condition = RiskAuditRow.at < before
        return self._delete(RiskAuditRow, (RiskAuditRow.id,), condition, "risk audit", chunk_rows, stop)

    def _delete(
        self,
        table: type[Base],
        key: tuple[InstrumentedAttribute[Any], ...],
        condition: ColumnElement[bool],
        what: str,
        chunk_rows: int,
        stop: threading.Event | None,
    ) -> int:
        """Delete the rows of `table` matching `condition`, at most `chunk_rows` (by their primary `key`
        columns) a transaction, until none is left or `stop` is set."""
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows}")
        stop = stop or threading.Event()
        chunk = select(*key).where(condition).limit(chunk_rows)
        statement = delete(table).where(
            key[0].in_(chunk.scalar_subquery()) if len(key) == 1 else tuple_(*key).in_(chunk)
        )
        total = 0
        while True:
            with storage_errors(f"deleting old {what}"), self._engine.begin() as connection:
                deleted = connection.execute(statement).rowcount
            total += deleted
            if deleted < chunk_rows or stop.wait(self._pause):
                return total
