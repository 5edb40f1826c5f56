"""Derived facts are derived: ready / draining / live follow the state, active_leases and slots_free are
counted from the leases table. The five stored copies are dropped and the pool_registry view computes them, with
the same column names and meanings as before (docs/registry.md)."""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_DERIVED = ("live", "ready", "draining", "active_leases", "slots_free")

# The read contract for orchestratord (docs/registry.md): the columns of 0001, now computed.
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
    p.heartbeat_at,
    p.vram_total_bytes,
    p.vram_free_bytes,
    p.compute_capability,
    p.version AS registry_version,
    p.updated_at
FROM pools p
LEFT JOIN (SELECT pool_id, COUNT(*) AS n FROM leases GROUP BY pool_id) l ON l.pool_id = p.id
"""


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS pool_registry")
    # SQLite rebuilds the table from its reflected definition, named CHECKs included (env.py turns foreign
    # keys off around it, so no lease is cascaded away); PostgreSQL drops the columns in place.
    with op.batch_alter_table("pools") as batch:
        batch.drop_constraint("ck_pools_slots", type_="check")
        batch.drop_constraint("ck_pools_leases", type_="check")
        for column in _DERIVED:
            batch.drop_column(column)
    op.execute(POOL_REGISTRY_VIEW)


def downgrade() -> None:
    raise NotImplementedError("0002 drops derived columns; restore from a backup to go back to 0001")
