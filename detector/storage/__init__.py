"""Durable state (sessions, dead letters, checkpoints, seen events, alerts) on SQLite or PostgreSQL."""

from detector.storage.alerts import AlertChange, AlertStore, Change, StoredAlert
from detector.storage.database import create_engine_for, current_revision, head_revision, upgrade
from detector.storage.repository import Checkpoint, DurableBatch, Store, StoredDeadLetter

__all__ = [
    "AlertChange",
    "AlertStore",
    "Change",
    "Checkpoint",
    "DurableBatch",
    "Store",
    "StoredAlert",
    "StoredDeadLetter",
    "create_engine_for",
    "current_revision",
    "head_revision",
    "upgrade",
]
