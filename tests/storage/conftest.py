"""Fixtures of the storage tests: every test runs against SQLite and against a fresh PostgreSQL database."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from sqlalchemy import Engine

from detector.alerts.lifecycle import AlertChange, AlertLifecycle, AlertOutcome, NotificationPolicy
from detector.alerts.risk import RiskPolicy
from detector.domain import Alert, AllowList, Detection
from detector.storage import DurableBatch, Store, create_engine_for, upgrade

START = 1_700_000_000.0


class FakeClock:
    """A settable clock (epoch seconds) for the `updated_at` / `created_at` / `seen_at` stamps."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Alerts:
    """The alert lifecycle on `store`'s database, each call in a transaction of its own, as an operator's
    command runs it or a commit point with nothing else to store; `list_alerts` and `open_alert_count`
    read back what is stored."""

    def __init__(
        self,
        store: Store,
        policy: NotificationPolicy | None = None,
        allowlist: AllowList | None = None,
        clock: Callable[[], float] = time.time,
        risk: RiskPolicy | None = None,
    ) -> None:
        self.store = store
        self.lifecycle = AlertLifecycle(policy, allowlist, clock, risk)

    def record(self, detections: Sequence[Detection], watermark: float | None = None) -> AlertOutcome:
        """Apply `detections` and resolve what is quiet at `watermark`, in one transaction."""
        with self.store.transaction() as transaction:
            return self.lifecycle.apply(transaction.alerts, detections, watermark)

    def upsert(self, detections: Sequence[Detection]) -> list[AlertChange]:
        """`record`, reduced to the change of each detection's alert, in order."""
        return [change for _, change in self.record(detections).changes]

    def resolve_quiet(self, watermark: float | None = None) -> AlertOutcome:
        """`record` without detections."""
        return self.record([], watermark)

    def acknowledge(self, alert_id: int) -> AlertOutcome:
        with self.store.transaction() as transaction:
            return self.lifecycle.acknowledge(transaction.alerts, alert_id)

    def resolve(self, alert_id: int) -> AlertOutcome:
        with self.store.transaction() as transaction:
            return self.lifecycle.resolve(transaction.alerts, alert_id)

    def list_alerts(self, **filters: Any) -> list[Alert]:
        return self.store.alerts.list_alerts(**filters)

    def open_alert_count(self) -> int:
        return self.store.alerts.open_alert_count()


def write(store: Store, batch: DurableBatch) -> None:
    """Store `batch` in a transaction of its own (the commit point without alerts)."""
    with store.transaction() as transaction:
        transaction.write(batch)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on the empty database, not migrated."""
    engine = create_engine_for(database_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(engine: Engine, clock: FakeClock) -> Store:
    """A store on a database migrated to head."""
    upgrade(engine)
    return Store(engine, clock=clock)
