"""Retention: indexes on the times rows are deleted by, so that each chunk `mia-detector retention run`
deletes finds its rows without scanning the table while it holds the lock (a session's last write, an
alert's resolution, a notification's delivery; dead letters and seen events have theirs already).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_sessions_updated_at"), "sessions", ["updated_at"])
    op.create_index(op.f("ix_alerts_status_resolved_at"), "alerts", ["status", "resolved_at"])
    op.create_index(op.f("ix_notifications_status_delivered_at"), "notifications", ["status", "delivered_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_notifications_status_delivered_at"), table_name="notifications")
    op.drop_index(op.f("ix_alerts_status_resolved_at"), table_name="alerts")
    op.drop_index(op.f("ix_sessions_updated_at"), table_name="sessions")
