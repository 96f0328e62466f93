"""Durable state (sessions, client states, dead letters, checkpoints, seen events, alerts, silences, the
notification outbox) on SQLite or PostgreSQL: persistence only, no decisions."""

from detector.storage.alerts import AlertRepository, AlertStore, open_alert_store
from detector.storage.database import create_engine_for, current_revision, head_revision, open_engine, upgrade
from detector.storage.errors import Fenced, StorageError, StorageFailed, StorageUnavailable
from detector.storage.outbox import DeliveryStatus, OutboxStore, QueuedNotification, SinkBacklog
from detector.storage.repository import (
    Checkpoint,
    Claim,
    ClientExposure,
    DurableBatch,
    SeenEvent,
    Store,
    StoredClientState,
    StoredDeadLetter,
    Transaction,
    open_store,
)
from detector.storage.retention import Purge, Retention, RetentionPolicy, open_retention
from detector.storage.risk import RiskRepository, RiskStore, open_risk_store
from detector.storage.silences import SilenceStore

__all__ = [
    "AlertRepository",
    "AlertStore",
    "Checkpoint",
    "Claim",
    "ClientExposure",
    "DeliveryStatus",
    "DurableBatch",
    "Fenced",
    "OutboxStore",
    "Purge",
    "QueuedNotification",
    "Retention",
    "RetentionPolicy",
    "RiskRepository",
    "RiskStore",
    "SeenEvent",
    "SilenceStore",
    "SinkBacklog",
    "StorageError",
    "StorageFailed",
    "StorageUnavailable",
    "Store",
    "StoredClientState",
    "StoredDeadLetter",
    "Transaction",
    "create_engine_for",
    "current_revision",
    "head_revision",
    "open_alert_store",
    "open_engine",
    "open_retention",
    "open_risk_store",
    "open_store",
    "upgrade",
]
