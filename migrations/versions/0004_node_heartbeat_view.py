"""An idle pool writes nothing: while its engine serves (ready or draining), the pool_registry view's
`heartbeat_at` is its node's heartbeat (one row per node, written every second), not a per-pool write. The
column keeps its meaning for readers: when poolmgr last knew the pool's engine to be up."""

from __future__ import annotations

from alembic import op

from poolmgr.store._db import migration_module

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

POOL_REGISTRY_VIEW = """
CREATE VIEW pool_registry AS
SELECT
    p.id AS pool_id,
    p.node_id,
    p.state,
    p.state IN ('preloading', 'ready', 'draining') AS live,
    p.state = 'ready' AS ready,
    p.state = 'draining' AS draining,
    p.engine,
    p.engine_version,
    p.model,
    p.device_mask,
    p.slots_total,
    CASE WHEN p.state = 'ready' THEN
        CASE WHEN p.slots_total > COALESCE(l.n, 0) THEN p.slots_total - COALESCE(l.n, 0) ELSE 0 END
    ELSE 0 END AS slots_free,
    COALESCE(l.n, 0) AS active_leases,
    p.restart_count,
    p.endpoint_url,
    p.last_error,
    CASE WHEN p.state IN ('ready', 'draining') AND n.heartbeat_at IS NOT NULL
              AND (p.heartbeat_at IS NULL OR n.heartbeat_at > p.heartbeat_at)
         THEN n.heartbeat_at ELSE p.heartbeat_at END AS heartbeat_at,
    p.vram_total_bytes,
    p.vram_free_bytes,
    p.compute_capability,
    p.version AS registry_version,
    p.updated_at
FROM pools p
LEFT JOIN (SELECT pool_id, COUNT(*) AS n FROM leases GROUP BY pool_id) l ON l.pool_id = p.id
LEFT JOIN nodes n ON n.id = p.node_id
"""


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS pool_registry")
    op.execute(POOL_REGISTRY_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS pool_registry")
    op.execute(migration_module("0002_derived_facts").POOL_REGISTRY_VIEW)
