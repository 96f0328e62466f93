"""Risk decisions: what gateways are told to do with a client while an incident against it is open (the
policy's, one per open alert, and the operators' overrides), and the audit of every change to them.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "risk_decisions",
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("client_id", sa.String(256), nullable=False),
        sa.Column("origin", sa.String(32), nullable=False),
        sa.Column("alert_id", sa.BigInteger(), nullable=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("model", "client_id", "origin", name=op.f("pk_risk_decisions")),
    )
    op.create_index(op.f("ix_risk_decisions_alert_id"), "risk_decisions", ["alert_id"])
    op.create_table(
        "risk_audit",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("client_id", sa.String(256), nullable=False),
        sa.Column("change", sa.String(16), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("alert_id", sa.BigInteger(), nullable=True),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_risk_audit")),
    )
    op.create_index(op.f("ix_risk_audit_at"), "risk_audit", ["at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_risk_audit_at"), table_name="risk_audit")
    op.drop_table("risk_audit")
    op.drop_index(op.f("ix_risk_decisions_alert_id"), table_name="risk_decisions")
    op.drop_table("risk_decisions")
