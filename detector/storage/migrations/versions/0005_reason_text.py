"""Alert reasons carry their written form (`text`), as every output shows them: the dashboards read it
instead of formatting reasons in SQL. Alerts stored before get it now, and so do the alerts inside queued
notifications, which also get `updated_at` (the one alert shape has it; their payload did not).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from detector.domain import Reason

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ALERTS = sa.table("alerts", sa.column("id", sa.BigInteger()), sa.column("reasons", sa.JSON()))
_NOTIFICATIONS = sa.table("notifications", sa.column("id", sa.BigInteger()), sa.column("payload", sa.JSON()))


def _bare(reasons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: value for key, value in reason.items() if key != "text"} for reason in reasons]


def _written(reasons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [Reason(**reason).model_dump(mode="json") for reason in _bare(reasons)]


def upgrade() -> None:
    connection = op.get_bind()
    for alert_id, reasons in connection.execute(sa.select(_ALERTS.c.id, _ALERTS.c.reasons)).all():
        if (written := _written(reasons)) != reasons:
            connection.execute(sa.update(_ALERTS).where(_ALERTS.c.id == alert_id).values(reasons=written))
    rows = connection.execute(sa.select(_NOTIFICATIONS.c.id, _NOTIFICATIONS.c.payload)).all()
    for row_id, payload in rows:
        alert = payload["alert"]
        upgraded = {
            **payload,
            "alert": {
                **alert,
                "updated_at": alert.get("updated_at", alert["raised_at"]),
                "reasons": _written(alert["reasons"]),
            },
        }
        if upgraded != payload:
            statement = (
                sa.update(_NOTIFICATIONS).where(_NOTIFICATIONS.c.id == row_id).values(payload=upgraded)
            )
            connection.execute(statement)


def downgrade() -> None:
    connection = op.get_bind()
    for alert_id, reasons in connection.execute(sa.select(_ALERTS.c.id, _ALERTS.c.reasons)).all():
        connection.execute(sa.update(_ALERTS).where(_ALERTS.c.id == alert_id).values(reasons=_bare(reasons)))
