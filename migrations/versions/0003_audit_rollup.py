"""The audit keeps lifecycle history, not every lease, and is pruned: `audit_rollup` holds, per node, the
metric totals folded from the audit rows that retention deleted (counters per metric and labels, histogram
bucket counts and sums, and the per-pool context the next rows are folded with), so that a metric total is
always rollup + the remaining rows. Indexes for the incremental metrics read, the retention prune and the
queries of docs/registry.md.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# name -> columns of pool_events (docs/registry.md says which query each one serves)
_INDEXES = {
    "ix_pool_events_node_id": ["node_id", "id"],  # /metrics reads rows after a cursor; retention prunes oldest first
    "ix_pool_events_pool_trigger_at": ["pool_id", "trigger", "at"],  # a pool's restarts in the last hour
    "ix_pool_events_kind_at": ["kind", "at"],  # crashes (or any kind) by time
    "ix_pool_events_correlation_id": ["correlation_id"],  # everything one request caused
}


def upgrade() -> None:
    op.create_table(
        "audit_rollup",
        sa.Column("node_id", sa.String(255), primary_key=True),
        sa.Column("pool_id", sa.String(255), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("labels", sa.Text(), primary_key=True),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("data", sa.JSON()),
    )
    for name, columns in _INDEXES.items():
        op.create_index(name, "pool_events", columns)


def downgrade() -> None:
    for name in _INDEXES:
        op.drop_index(name, "pool_events")
    op.drop_table("audit_rollup")
