"""Seen-event ledger: the digest of each event's record, and forgetting by processing time.

A re-delivered event has the same bytes; another record reusing an event id does not, and is then
dead-lettered instead of dropped as a duplicate. Event ids are forgotten a retention period after they
were processed (`seen_at`), whatever their event time, so neither a forged timestamp nor a replay of old
records can empty the ledger.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("seen_events") as seen_events:
        seen_events.add_column(sa.Column("digest", sa.LargeBinary(), nullable=True))
    op.create_index(op.f("ix_seen_events_seen_at"), "seen_events", ["seen_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_seen_events_seen_at"), table_name="seen_events")
    with op.batch_alter_table("seen_events") as seen_events:
        seen_events.drop_column("digest")
