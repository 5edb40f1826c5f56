"""The fleet: node liveness in the registry view, and a generation for each pool's desired state.

Only additions (a node still at 0004 keeps working against this schema during a rolling upgrade):
- `nodes.alive_until`: the database's own clock plus the node's grace, written with each heartbeat (no skew
  between the nodes' clocks and the readers'); `nodes.grace_ms`: that grace.
- `nodes.desired_generation`: bumped by every change of the node's desired pools (apply, PUT, DELETE, pool rm),
  read by the node's heartbeat: a running serve notices a change within a heartbeat, at no extra cost.
- `pools.generation`: bumped when the pool's spec or desired state is changed by an operator; `pools.source`:
  who declared the pool (`file`: the pools file or `poolmgr apply`, which remove what they no longer name;
  `api`: PUT /pools/{id}, removed only by DELETE or `poolmgr pool rm`); `pools.removed_at`: set by a removal
  (the pool drains, stops, then its row is deleted; its audit stays).
- `pool_registry` gains `node_alive`, `node_heartbeat_at` and `routable` (ready, not draining, node alive),
  computed when the view is read. A node that writes no `alive_until` yet (still at 0004) counts as alive while
  its `heartbeat_at` is younger than 5 s (the default grace). Every earlier column keeps its meaning.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from poolmgr.store._db import migration_module

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_BODY = """
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
    p.updated_at,
    n.heartbeat_at AS node_heartbeat_at,
    {alive} AS node_alive,
    (p.state = 'ready' AND {alive}) AS routable
FROM pools p
LEFT JOIN (SELECT pool_id, COUNT(*) AS n FROM leases GROUP BY pool_id) l ON l.pool_id = p.id
LEFT JOIN nodes n ON n.id = p.node_id
"""

# A node is alive while the database's clock has not passed its `alive_until` (a 0004 node: heartbeat + 5 s).
_ALIVE = {
    "postgresql": "COALESCE(n.alive_until > now(), n.heartbeat_at > now() - interval '5 seconds', false)",
    "sqlite": (
        "COALESCE(n.alive_until > strftime('%Y-%m-%d %H:%M:%f', 'now'),"
        " n.heartbeat_at > strftime('%Y-%m-%d %H:%M:%f', 'now', '-5 seconds'), 0)"
    ),
}


def registry_view(dialect: str) -> str:
    return _BODY.format(alive=_ALIVE["postgresql" if dialect == "postgresql" else "sqlite"])


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS pool_registry")  # SQLite cannot alter a table a view reads
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("alive_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("grace_ms", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("desired_generation", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("generation", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("source", sa.String(16), nullable=False, server_default="file"))
        batch.add_column(sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(registry_view(op.get_bind().dialect.name))


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS pool_registry")
    with op.batch_alter_table("pools") as batch:
        batch.drop_column("removed_at")
        batch.drop_column("source")
        batch.drop_column("generation")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("desired_generation")
        batch.drop_column("grace_ms")
        batch.drop_column("alive_until")
    op.execute(migration_module("0004_node_heartbeat_view").POOL_REGISTRY_VIEW)
