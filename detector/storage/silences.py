"""Silences in the database: created and ended by operators, read at every commit that notifies."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Row

from detector.domain import Silence
from detector.storage.base import Repository
from detector.storage.tables import SilenceRow


def active_silences(connection: Connection, now: datetime) -> list[Silence]:
    """The silences not yet expired at `now`, oldest first."""
    query = select(SilenceRow.__table__).where(SilenceRow.expires_at > now).order_by(SilenceRow.id)
    return [_silence(row) for row in connection.execute(query)]


class SilenceStore(Repository):
    """Creates, lists and ends silences."""

    def add(
        self,
        *,
        duration_seconds: float,
        reason: str,
        created_by: str,
        client_id: str | None = None,
        model: str | None = None,
        kind: str | None = None,
        rule_id: str | None = None,
    ) -> Silence:
        """Silence alerts matching every given criterion for `duration_seconds` from now.

        Raises `ValueError` without any criterion (that would silence everything) or with a duration that
        is not positive.
        """
        if client_id is None and model is None and kind is None and rule_id is None:
            raise ValueError("a silence needs a client, model, kind or rule to match")
        if duration_seconds <= 0:
            raise ValueError(f"a silence must last a positive time, got {duration_seconds} s")
        now = self._clock()
        created_at = datetime.fromtimestamp(now, UTC)
        expires_at = datetime.fromtimestamp(now + duration_seconds, UTC)
        statement = (
            insert(SilenceRow)
            .values(
                client_id=client_id,
                model=model,
                kind=kind,
                rule_id=rule_id,
                reason=reason,
                created_by=created_by,
                created_at=created_at,
                expires_at=expires_at,
            )
            .returning(SilenceRow.id)
        )
        with self._engine.begin() as connection:
            silence_id = connection.execute(statement).scalar_one()
        return Silence(
            silence_id, client_id, model, kind, rule_id, reason, created_by, created_at, expires_at
        )

    def list(self, include_expired: bool = False) -> list[Silence]:
        """The active silences (or all), newest first."""
        query = select(SilenceRow.__table__).order_by(SilenceRow.id.desc())
        if not include_expired:
            query = query.where(SilenceRow.expires_at > datetime.fromtimestamp(self._clock(), UTC))
        with self._engine.connect() as connection:
            return [_silence(row) for row in connection.execute(query)]

    def expire(self, silence_id: int) -> bool:
        """End silence `silence_id` now; False when there is no such active silence."""
        now = datetime.fromtimestamp(self._clock(), UTC)
        statement = (
            update(SilenceRow)
            .where(SilenceRow.id == silence_id, SilenceRow.expires_at > now)
            .values(expires_at=now)
        )
        with self._engine.begin() as connection:
            return connection.execute(statement).rowcount == 1


def _silence(row: Row[Any]) -> Silence:
    return Silence(
        id=row.id,
        client_id=row.client_id,
        model=row.model,
        kind=row.kind,
        rule_id=row.rule_id,
        reason=row.reason,
        created_by=row.created_by,
        created_at=row.created_at,
        expires_at=row.expires_at,
    )
