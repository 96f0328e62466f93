"""Coordination pools: the keys of one model and one network pooled by the training-set hits they sent, shared
by every member of a consumer group, so that a campaign split over partitions owned by different members is
judged whole.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "coordination_pools",
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("network", sa.String(64), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model", "network", name=op.f("pk_coordination_pools")),
    )
    op.create_index(op.f("ix_coordination_pools_updated_at"), "coordination_pools", ["updated_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_coordination_pools_updated_at"), table_name="coordination_pools")
    op.drop_table("coordination_pools")
