"""Partition leases: the epoch of each consumer-group member's claim on a partition, so that a member that
lost a partition (and does not know it yet) can no longer commit state or positions over the new owner's.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "partition_leases",
        sa.Column("group_id", sa.String(256), nullable=False),
        sa.Column("topic", sa.String(256), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("committed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("group_id", "topic", "partition", name=op.f("pk_partition_leases")),
    )


def downgrade() -> None:
    op.drop_table("partition_leases")
