"""The notification outbox: written in the transaction of the alert change, drained by the dispatcher.

Each sink has its own queue (the rows of that sink, by id). A sink's notifications are delivered strictly in
order: while its oldest pending row waits for a retry, the rows behind it wait too, so a receiver never sees
an alert resolved before it was opened.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection, Row

from detector.domain import Notification, NotificationEvent
from detector.storage.base import Repository
from detector.storage.errors import storage_errors
from detector.storage.tables import NotificationRow


class DeliveryStatus(StrEnum):
    """Where one notification stands with one sink."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # the receiver rejected it as invalid: retrying cannot help


@dataclass(frozen=True)
class QueuedNotification:
    """One notification for one sink, as the outbox holds it."""

    id: int
    sink: str
    notification: Notification
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


@dataclass(frozen=True)
class SinkBacklog:
    """A sink's undelivered notifications: how many, and when the oldest was written."""

    pending: int
    oldest: datetime | None


def enqueue(
    connection: Connection, notifications: Sequence[Notification], sinks: Sequence[str], now: datetime
) -> int:
    """Queue every notification for every sink in the caller's transaction; return the rows written."""
    rows = [
        {
            "alert_id": notification.alert.id,
            "sink": sink,
            "idempotency_key": notification.idempotency_key,
            "event": notification.event.value,
            "payload": notification.model_dump(mode="json"),
            "status": DeliveryStatus.PENDING.value,
            "attempts": 0,
            "next_attempt_at": now,
            "last_error": None,
            "created_at": now,
            "delivered_at": None,
        }
        for notification in notifications
        for sink in sinks
    ]
    if rows:
        connection.execute(insert(NotificationRow), rows)
    return len(rows)


class OutboxStore(Repository):
    """The dispatcher's and the operator's view of the outbox."""

    def head(self, sink: str, limit: int) -> list[QueuedNotification]:
        """Up to `limit` of `sink`'s pending notifications, oldest first (due or not: the caller stops at
        the first that is not due, to keep the order)."""
        query = (
            select(NotificationRow.__table__)
            .where(NotificationRow.sink == sink, NotificationRow.status == DeliveryStatus.PENDING)
            .order_by(NotificationRow.id)
            .limit(limit)
        )
        with self._engine.connect() as connection:
            return [_queued(row) for row in connection.execute(query)]

    def mark_delivered(self, row_id: int) -> None:
        """Record that the sink accepted notification `row_id`."""
        self._set(row_id, status=DeliveryStatus.DELIVERED.value, delivered_at=self._now(), last_error=None)

    def mark_retry(self, row_id: int, attempts: int, next_attempt_at: datetime, error: str) -> None:
        """Record a failed attempt of `row_id`; it is tried again at `next_attempt_at`."""
        self._set(row_id, attempts=attempts, next_attempt_at=next_attempt_at, last_error=error)

    def mark_failed(self, row_id: int, attempts: int, error: str) -> None:
        """Record that the sink rejected `row_id` for good; it leaves the queue."""
        self._set(row_id, status=DeliveryStatus.FAILED.value, attempts=attempts, last_error=error)

    def backlog(self) -> dict[str, SinkBacklog]:
        """Every sink with pending notifications, by name."""
        query = (
            select(NotificationRow.sink, func.count(), func.min(NotificationRow.created_at))
            .where(NotificationRow.status == DeliveryStatus.PENDING)
            .group_by(NotificationRow.sink)
        )
        with self._engine.connect() as connection:
            return {
                sink: SinkBacklog(count, _aware(oldest)) for sink, count, oldest in connection.execute(query)
            }

    def list(
        self, status: str | None = None, sink: str | None = None, limit: int = 1000
    ) -> list[QueuedNotification]:
        """Up to `limit` queued notifications, optionally of one status and sink, newest first."""
        query = select(NotificationRow.__table__).order_by(NotificationRow.id.desc()).limit(limit)
        if status is not None:
            query = query.where(NotificationRow.status == status)
        if sink is not None:
            query = query.where(NotificationRow.sink == sink)
        with self._engine.connect() as connection:
            return [_queued(row) for row in connection.execute(query)]

    def newest_of(self, events: Collection[NotificationEvent]) -> Notification | None:
        """The notification queued last (for whichever sink, whatever its delivery status) whose event is
        one of `events`; None when none is held. Raises `StorageError`."""
        query = (
            select(NotificationRow.payload)
            .where(NotificationRow.event.in_([event.value for event in events]))
            .order_by(NotificationRow.id.desc())
            .limit(1)
        )
        with storage_errors("reading the outbox"), self._engine.connect() as connection:
            payload = connection.execute(query).scalar()
        return Notification.model_validate(payload) if payload is not None else None

    def retry_failed(self, sink: str | None = None) -> int:
        """Put failed notifications (of one sink, or all) back in their queue; return how many.

        They rejoin in their original order: a sink's queue is ordered by id.
        """
        statement = (
            update(NotificationRow)
            .where(NotificationRow.status == DeliveryStatus.FAILED)
            .values(status=DeliveryStatus.PENDING.value, next_attempt_at=self._now())
        )
        if sink is not None:
            statement = statement.where(NotificationRow.sink == sink)
        with self._engine.begin() as connection:
            return connection.execute(statement).rowcount

    def _set(self, row_id: int, **values: Any) -> None:
        with self._engine.begin() as connection:
            connection.execute(update(NotificationRow).where(NotificationRow.id == row_id).values(**values))

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)


def _aware(value: datetime | str | None) -> datetime | None:
    # An aggregate bypasses the column type: SQLite returns its stored UTC text, PostgreSQL an aware datetime.
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def _queued(row: Row[Any]) -> QueuedNotification:
    return QueuedNotification(
        id=row.id,
        sink=row.sink,
        notification=Notification.model_validate(row.payload),
        status=DeliveryStatus(row.status),
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_error=row.last_error,
        created_at=row.created_at,
        delivered_at=row.delivered_at,
    )
