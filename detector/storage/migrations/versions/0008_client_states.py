"""Client states: each (model, client) key's streaming features as of the last commit that changed them, and
the input scales learned online that they were built on, so that a restart, a partition move or an eviction
no longer forgets the evidence gathered toward an alert.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "client_states",
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("client_id", sa.String(256), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model", "client_id", name=op.f("pk_client_states")),
    )
    op.create_index(op.f("ix_client_states_updated_at"), "client_states", ["updated_at"])
    op.create_table(
        "model_scales",
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model", name=op.f("pk_model_scales")),
    )
    op.create_index(op.f("ix_model_scales_updated_at"), "model_scales", ["updated_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_model_scales_updated_at"), table_name="model_scales")
    op.drop_table("model_scales")
    op.drop_index(op.f("ix_client_states_updated_at"), table_name="client_states")
    op.drop_table("client_states")
