"""Alerts say when in the stream they were detected: `detected_at` (event time of the query on which the rule
first crossed its threshold) and `detected_after_queries` (the client's queries by then). Alerts stored before
were raised on their latest query when they were opened: they get their `last_seen` and `queries`, the
closest that is known, and so do the alerts inside queued notifications.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NOTIFICATIONS = sa.table("notifications", sa.column("id", sa.BigInteger()), sa.column("payload", sa.JSON()))


def upgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name == "sqlite":
        # SQLite adds a NOT NULL column only with a default, and cannot drop one without copying the table
        # (which would also have to re-create the partial unique index): every insert sets both anyway.
        op.add_column(
            "alerts",
            sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False, server_default="1970-01-01"),
        )
        op.add_column(
            "alerts", sa.Column("detected_after_queries", sa.BigInteger(), nullable=False, server_default="0")
        )
        op.execute("UPDATE alerts SET detected_at = last_seen, detected_after_queries = queries")
    else:
        op.add_column("alerts", sa.Column("detected_at", sa.DateTime(timezone=True), nullable=True))
        op.add_column("alerts", sa.Column("detected_after_queries", sa.BigInteger(), nullable=True))
        op.execute("UPDATE alerts SET detected_at = last_seen, detected_after_queries = queries")
        op.alter_column("alerts", "detected_at", nullable=False)
        op.alter_column("alerts", "detected_after_queries", nullable=False)
    rows = connection.execute(sa.select(_NOTIFICATIONS.c.id, _NOTIFICATIONS.c.payload)).all()
    for row_id, payload in rows:
        alert = payload["alert"]
        if "detected_at" in alert:
            continue
        upgraded = {
            **payload,
            "alert": {**alert, "detected_at": alert["last_seen"], "detected_after_queries": alert["queries"]},
        }
        connection.execute(
            sa.update(_NOTIFICATIONS).where(_NOTIFICATIONS.c.id == row_id).values(payload=upgraded)
        )


def downgrade() -> None:
    op.drop_column("alerts", "detected_after_queries")
    op.drop_column("alerts", "detected_at")
