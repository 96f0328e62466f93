"""Durable state (sessions, dead letters, checkpoints, seen events, alerts, silences, the notification
outbox) on SQLite or PostgreSQL."""

from detector.storage.alerts import AlertChange, AlertStore, AlertUpdate, Change, StoredAlert
from detector.storage.database import create_engine_for, current_revision, head_revision, upgrade
from detector.storage.outbox import DeliveryStatus, OutboxStore, QueuedNotification, SinkBacklog
from detector.storage.repository import Checkpoint, DurableBatch, Store, StoredDeadLetter
from detector.storage.silences import SilenceStore

__all__ = [
    "AlertChange",
    "AlertStore",
    "AlertUpdate",
    "Change",
    "Checkpoint",
    "DeliveryStatus",
    "DurableBatch",
    "OutboxStore",
    "QueuedNotification",
    "SilenceStore",
    "SinkBacklog",
    "Store",
    "StoredAlert",
    "StoredDeadLetter",
    "create_engine_for",
    "current_revision",
    "head_revision",
    "upgrade",
]
