"""Initial registry: nodes, pools (FSM state + registry fields), pool_events (audit), leases, devices,
and the pool_registry view that orchestratord reads.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from poolmgr.store._models import DESIRED_CHECK, STATE_CHECK, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# The read contract for orchestratord (docs/registry.md). Migrations only ADD columns to it.
POOL_REGISTRY_VIEW = """
CREATE VIEW pool_registry AS
SELECT
    p.id AS pool_id,
    p.node_id,
    p.state,
    p.live,
    p.ready,
    p.draining,
    p.engine,
    p.engine_version,
    p.model,
    p.device_mask,
    p.slots_total,
    p.slots_free,
    p.active_leases,
    p.restart_count,
    p.endpoint_url,
    p.last_error,
    p.heartbeat_at,
    p.vram_total_bytes,
    p.vram_free_bytes,
    p.compute_capability,
    p.version AS registry_version,
    p.updated_at
FROM pools p
"""


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "pools",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("node_id", sa.String(255), nullable=False, index=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("engine", sa.String(64), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("device_mask", sa.Text(), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("desired_state", sa.String(16), nullable=False),
        sa.Column("live", sa.Boolean(), nullable=False),
        sa.Column("ready", sa.Boolean(), nullable=False),
        sa.Column("draining", sa.Boolean(), nullable=False),
        sa.Column("last_error", sa.Text()),
        sa.Column("heartbeat_at", UTCDateTime()),
        sa.Column("engine_version", sa.String(128)),
        sa.Column("slots_total", sa.Integer(), nullable=False),
        sa.Column("slots_free", sa.Integer(), nullable=False),
        sa.Column("active_leases", sa.Integer(), nullable=False),
        sa.Column("restart_count", sa.Integer(), nullable=False),
        sa.Column("endpoint_url", sa.Text()),
        sa.Column("pid", sa.Integer()),
        sa.Column("pid_start_time", sa.BigInteger()),
        sa.Column("spawn_intent_at", UTCDateTime()),
        sa.Column("ready_since", UTCDateTime()),
        sa.Column("backoff_step", sa.Integer(), nullable=False),
        sa.Column("next_restart_at", UTCDateTime()),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("breaker_timeout_s", sa.Float(), nullable=False),
        sa.Column("breaker_until", UTCDateTime()),
        sa.Column("breaker_trial", sa.Boolean(), nullable=False),
        sa.Column("vram_total_bytes", sa.BigInteger()),
        sa.Column("vram_free_bytes", sa.BigInteger()),
        sa.Column("compute_capability", sa.String(16)),
        sa.Column("split_plan", sa.JSON()),
        sa.Column("pending_op", sa.JSON()),
        sa.Column("drain_deadline_at", UTCDateTime()),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint(STATE_CHECK, name="ck_pools_state"),
        sa.CheckConstraint(DESIRED_CHECK, name="ck_pools_desired_state"),
        sa.CheckConstraint("slots_free >= 0 AND slots_free <= slots_total", name="ck_pools_slots"),
        sa.CheckConstraint("active_leases >= 0", name="ck_pools_leases"),
    )
    op.create_table(
        "pool_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("pool_id", sa.String(255), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("from_state", sa.String(32)),
        sa.Column("to_state", sa.String(32)),
        sa.Column("trigger", sa.String(64)),
        sa.Column("reason", sa.Text()),
        sa.Column("restart_count", sa.Integer(), nullable=False),
        sa.Column("backoff_ms", sa.Integer()),
        sa.Column("exit_code", sa.Integer()),
        sa.Column("signal", sa.Integer()),
        sa.Column("correlation_id", sa.String(128)),
        sa.Column("node_id", sa.String(255)),
        sa.Column("detail", sa.JSON()),
    )
    op.create_index("ix_pool_events_pool_at", "pool_events", ["pool_id", "at"])
    op.create_table(
        "leases",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("pool_id", sa.String(255), sa.ForeignKey("pools.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_leases_pool_id", "leases", ["pool_id"])
    op.create_table(
        "devices",
        sa.Column("node_id", sa.String(255), primary_key=True),
        sa.Column("uuid", sa.String(128), primary_key=True),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("pci_bus_id", sa.String(64), nullable=False),
        sa.Column("compute_capability", sa.String(16), nullable=False),
        sa.Column("vram_total_bytes", sa.BigInteger(), nullable=False),
        sa.Column("vram_free_bytes", sa.BigInteger(), nullable=False),
        sa.Column("is_mig", sa.Boolean(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.execute(POOL_REGISTRY_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS pool_registry")
    op.drop_table("devices")
    op.drop_index("ix_leases_pool_id", "leases")
    op.drop_table("leases")
    op.drop_index("ix_pool_events_pool_at", "pool_events")
    op.drop_table("pool_events")
    op.drop_table("pools")
    op.drop_table("nodes")
