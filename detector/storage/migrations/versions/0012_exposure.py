"""Exposure accounting: what each client was given by the model (records answered with confidence vectors,
training records among them, label-only answers, probes), with the client's stored state and with each alert.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COUNTS = ("probability_records", "training_records", "label_only_answers", "probes")


def upgrade() -> None:
    with op.batch_alter_table("client_states") as table:
        table.add_column(sa.Column("first_seen", sa.DateTime(timezone=True), nullable=True))
        for name in COUNTS:
            table.add_column(sa.Column(name, sa.BigInteger(), server_default="0", nullable=False))
    with op.batch_alter_table("alerts") as table:
        table.add_column(sa.Column("exposure", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("alerts") as table:
        table.drop_column("exposure")
    with op.batch_alter_table("client_states") as table:
        for name in reversed(COUNTS):
            table.drop_column(name)
        table.drop_column("first_seen")
