"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import uuid
from typing import Any

from detector.broker import EmbeddedBroker
from detector.settings import Settings, load_settings


def unique(prefix: str) -> str:
    """A name no other test uses (topics and groups outlive a test on the shared broker)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_settings(
    database_url: str, broker: EmbeddedBroker | None = None, **groups: dict[str, Any]
) -> Settings:
    """Settings for a test: the given database, the test broker, a fresh topic and group, quick commits."""
    kafka: dict[str, Any] = {
        "topics": [unique("logs")],
        "group_id": unique("group"),
        "session_timeout_ms": 6000,
    }
    if broker is not None:
        kafka["bootstrap_servers"] = broker.bootstrap_servers
    kafka.update(groups.pop("kafka", {}))
    commit = {"min_records": 500, "min_interval_seconds": 0.5} | groups.pop("commit", {})
    return load_settings(None, database={"url": database_url}, kafka=kafka, commit=commit, **groups)
