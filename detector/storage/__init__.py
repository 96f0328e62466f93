"""Durable state: sessions, dead letters, consumer checkpoints and seen events, on SQLite or PostgreSQL."""

from detector.storage.database import create_engine_for, current_revision, head_revision, upgrade
from detector.storage.repository import Checkpoint, DurableBatch, Store, StoredDeadLetter

__all__ = [
    "Checkpoint",
    "DurableBatch",
    "Store",
    "StoredDeadLetter",
    "create_engine_for",
    "current_revision",
    "head_revision",
    "upgrade",
]
