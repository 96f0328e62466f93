"""Risk decisions in the database: persistence only. `RiskRepository` reads and writes the decisions and
their audit inside a transaction someone else owns (the alert lifecycle's); `RiskStore` reads them (the
risk endpoint, the CLI) and stores an operator's decisions, each in a transaction of its own. What the
policy decides comes from `detector.alerts.risk`."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select, tuple_
from sqlalchemy.engine import Connection, Row

from detector.domain import RiskAction, RiskDecision, RiskParameters, utc
from detector.settings import Settings
from detector.storage.base import Repository, dialect_insert, lock_sqlite
from detector.storage.database import open_engine
from detector.storage.tables import RiskAuditRow, RiskDecisionRow

_CHUNK = 500
OPERATOR_ORIGIN = "operator"


def origin_of(decision: RiskDecision) -> str:
    """The row key of a decision beside its (model, client): `alert:<id>` for the policy's, `operator`."""
    return OPERATOR_ORIGIN if decision.alert_id is None else f"alert:{decision.alert_id}"


class RiskRepository:
    """The risk decisions and their audit as seen from inside one transaction (`connection`'s: the caller
    commits)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def decisions(self, model: str | None = None, client_id: str | None = None) -> list[RiskDecision]:
        """The stored decisions, of one model and client when given, oldest first."""
        query = select(RiskDecisionRow.__table__)
        if model is not None:
            query = query.where(RiskDecisionRow.model == model)
        if client_id is not None:
            query = query.where(RiskDecisionRow.client_id == client_id)
        query = query.order_by(RiskDecisionRow.decided_at, RiskDecisionRow.origin)
        return [_decision(row) for row in self._connection.execute(query)]

    def of_alerts(self, alert_ids: Iterable[int]) -> list[RiskDecision]:
        """The policy's decisions for the alerts `alert_ids`."""
        ids = sorted(set(alert_ids))
        found = []
        for start in range(0, len(ids), _CHUNK):
            query = select(RiskDecisionRow.__table__).where(
                RiskDecisionRow.alert_id.in_(ids[start : start + _CHUNK])
            )
            found += [_decision(row) for row in self._connection.execute(query)]
        return found

    def put(self, decision: RiskDecision) -> None:
        """Store `decision` in place of the one of its client and origin, if any (one statement)."""
        values = _values(decision)
        statement = dialect_insert(self._connection, RiskDecisionRow).values(values)
        statement = statement.on_conflict_do_update(
            index_elements=["model", "client_id", "origin"],
            set_={
                name: value for name, value in values.items() if name not in ("model", "client_id", "origin")
            },
        )
        self._connection.execute(statement)

    def remove(self, decisions: Iterable[RiskDecision]) -> None:
        """Delete `decisions` (by client and origin)."""
        keys = sorted({(d.model, d.client_id, origin_of(d)) for d in decisions})
        columns = tuple_(RiskDecisionRow.model, RiskDecisionRow.client_id, RiskDecisionRow.origin)
        for start in range(0, len(keys), _CHUNK):
            self._connection.execute(delete(RiskDecisionRow).where(columns.in_(keys[start : start + _CHUNK])))

    def audit(self, change: str, decision: RiskDecision, at: datetime, actor: str, reason: str) -> None:
        """Record that `actor` made `change` to `decision` at `at`, and why."""
        self._connection.execute(
            insert(RiskAuditRow).values(
                at=at,
                model=decision.model,
                client_id=decision.client_id,
                change=change,
                action=decision.action.value,
                parameters=decision.parameters.model_dump(mode="json", exclude_none=True),
                source=decision.source,
                alert_id=decision.alert_id,
                actor=actor,
                reason=reason,
                expires_at=decision.expires_at,
            )
        )

    def audit_log(
        self, model: str | None = None, client_id: str | None = None, limit: int | None = 100
    ) -> list[dict[str, Any]]:
        """The latest audited changes (of one model and client when given), newest first."""
        query = select(RiskAuditRow.__table__)
        if model is not None:
            query = query.where(RiskAuditRow.model == model)
        if client_id is not None:
            query = query.where(RiskAuditRow.client_id == client_id)
        query = query.order_by(RiskAuditRow.id.desc()).limit(limit)
        return [dict(row._mapping) for row in self._connection.execute(query)]

    def get(self, model: str, client_id: str, origin: str) -> RiskDecision | None:
        """The decision of one client and origin (`origin_of`), locked until the transaction ends."""
        query = select(RiskDecisionRow.__table__).where(
            RiskDecisionRow.model == model,
            RiskDecisionRow.client_id == client_id,
            RiskDecisionRow.origin == origin,
        )
        row = self._connection.execute(query.with_for_update()).first()
        return _decision(row) if row is not None else None


def open_risk_store(settings: Settings, migrate: bool | None = None) -> RiskStore:
    """The risk store at the configured database URL, migrated to the latest schema unless told otherwise
    (see `open_engine`)."""
    return RiskStore(open_engine(settings, migrate))


class RiskStore(Repository):
    """The stored risk decisions and their audit, read (each call a transaction of its own), and the
    operators' decisions, written with their audit."""

    def decisions(self, model: str | None = None, client_id: str | None = None) -> list[RiskDecision]:
        """See `RiskRepository.decisions`."""
        with self._engine.connect() as connection:
            return RiskRepository(connection).decisions(model, client_id)

    def audit_log(
        self, model: str | None = None, client_id: str | None = None, limit: int | None = 100
    ) -> list[dict[str, Any]]:
        """See `RiskRepository.audit_log`."""
        with self._engine.connect() as connection:
            return RiskRepository(connection).audit_log(model, client_id, limit)

    def override(self, decision: RiskDecision) -> RiskDecision | None:
        """Store an operator's `decision` on its client in place of the previous one (returned, if any),
        audited as `overridden` by its actor for its reason."""
        with self._engine.begin() as connection:
            lock_sqlite(connection)
            repository = RiskRepository(connection)
            previous = repository.get(decision.model, decision.client_id, OPERATOR_ORIGIN)
            repository.put(decision)
            repository.audit("overridden", decision, decision.decided_at, decision.actor, decision.reason)
            return previous

    def clear(self, model: str, client_id: str, actor: str, reason: str) -> RiskDecision | None:
        """Remove the operator's decision on (`model`, `client_id`), audited as `cleared` by `actor` for
        `reason`; returns it, or None (nothing changed) when there was none."""
        with self._engine.begin() as connection:
            lock_sqlite(connection)
            repository = RiskRepository(connection)
            found = repository.get(model, client_id, OPERATOR_ORIGIN)
            if found is None:
                return None
            repository.remove([found])
            repository.audit("cleared", found, utc(self._clock()), actor, reason)
            return found


def _values(decision: RiskDecision) -> dict[str, Any]:
    return {
        "model": decision.model,
        "client_id": decision.client_id,
        "origin": origin_of(decision),
        "alert_id": decision.alert_id,
        "action": decision.action.value,
        "parameters": decision.parameters.model_dump(mode="json", exclude_none=True),
        "source": decision.source,
        "actor": decision.actor,
        "reason": decision.reason,
        "decided_at": decision.decided_at,
        "expires_at": decision.expires_at,
    }


def _decision(row: Row[Any]) -> RiskDecision:
    return RiskDecision(
        model=row.model,
        client_id=row.client_id,
        action=RiskAction(row.action),
        parameters=RiskParameters.model_validate(row.parameters),
        source=row.source,
        alert_id=row.alert_id,
        actor=row.actor,
        reason=row.reason,
        decided_at=row.decided_at,
        expires_at=row.expires_at,
    )
