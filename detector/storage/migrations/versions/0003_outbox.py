"""Alert lifecycle: acknowledgement and notification bookkeeping, silences, the notification outbox.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("alerts") as alerts:
        alerts.add_column(sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True))
        alerts.add_column(sa.Column("notified_at", sa.DateTime(timezone=True), nullable=True))
        alerts.add_column(sa.Column("notified_severity", sa.String(length=16), nullable=True))
    op.create_table(
        "silences",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("client_id", sa.String(length=256), nullable=True),
        sa.Column("model", sa.String(length=256), nullable=True),
        sa.Column("kind", sa.String(length=64), nullable=True),
        sa.Column("rule_id", sa.String(length=256), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_silences")),
    )
    op.create_index(op.f("ix_silences_expires_at"), "silences", ["expires_at"])
    op.create_table(
        "notifications",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("alert_id", sa.BigInteger(), nullable=False),
        sa.Column("sink", sa.String(length=32), nullable=False),
        sa.Column("idempotency_key", sa.String(length=64), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
    )
    op.create_index(op.f("ix_notifications_alert_id"), "notifications", ["alert_id"])
    op.create_index(
        op.f("ix_notifications_idempotency_key_sink"),
        "notifications",
        ["idempotency_key", "sink"],
        unique=True,
    )
    op.create_index(op.f("ix_notifications_sink_status_id"), "notifications", ["sink", "status", "id"])


def downgrade() -> None:
    op.drop_table("notifications")
    op.drop_table("silences")
    with op.batch_alter_table("alerts") as alerts:
        alerts.drop_column("notified_severity")
        alerts.drop_column("notified_at")
        alerts.drop_column("acknowledged_at")
