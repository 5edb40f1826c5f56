"""The audit keeps lifecycle history only, is pruned by age into a rollup, and is read through indexes (issue 14),
on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select, text

from poolmgr.clock import FakeClock, utcnow
from poolmgr.errors import ConfigError
from poolmgr.lifecycle.effects import Placed, PreloadStarted, PreloadSucceeded, ReadyInfo
from poolmgr.lifecycle.fsm import fire
from poolmgr.lifecycle.placing import CPU_PLACEMENT
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig
from poolmgr.store import Registry
from poolmgr.store import _retention as retention
from poolmgr.store._audit_read import _rows_query
from poolmgr.store._models import AuditRollup, Base, PoolEvent


def _ready(registry: Registry, pool_id: str = "p1") -> None:
    registry.register(PoolSpec(id=pool_id, model="/m.gguf", slots=2))
    fire(registry, pool_id, Placed())
    fire(registry, pool_id, PreloadStarted(CPU_PLACEMENT))
    fire(registry, pool_id, PreloadSucceeded(ReadyInfo("http://127.0.0.1:9", None, 2)))


def _count(registry: Registry, table: Any) -> int:
    with registry.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_leases_leave_no_audit_rows(registry: Registry, clock: FakeClock) -> None:
    _ready(registry)
    rows = len(registry.events())
    lease = registry.allocate_lease("p1", ttl_s=10, correlation_id="req-1")
    registry.allocate_lease("p1", ttl_s=100)
    assert registry.release_lease("p1", lease.id) is True
    clock.advance(11)
    registry.allocate_lease("p1", ttl_s=1)
    clock.advance(2)
    assert registry.reap_expired_leases() == 1
    assert len(registry.events()) == rows  # the leases table is the record of leases
    assert registry.get("p1").active_leases == 1


def test_a_prune_deletes_old_rows_in_batches_and_rolls_them_up(registry: Registry, clock: FakeClock) -> None:
    for pool_id in ("a", "b"):
        _ready(registry, pool_id)
    clock.advance(86_400)
    _ready(registry, "c")  # a day younger
    old = [e for e in registry.events() if e.pool_id in ("a", "b")]
    assert registry.prune_audit(clock.now() - timedelta(hours=1), batch=3) == len(old) == 8
    assert {e.pool_id for e in registry.events()} == {"c"}
    with registry.engine.connect() as conn:
        rolled = [tuple(r) for r in conn.execute(select(AuditRollup.name, AuditRollup.pool_id, AuditRollup.value))]
    assert sorted(rolled) == [("pool_preload_success_total", "a", 1.0), ("pool_preload_success_total", "b", 1.0)]
    assert registry.prune_audit(clock.now() - timedelta(hours=1)) == 0  # nothing left that old


def test_a_prune_stops_at_the_first_young_row_and_honours_max_rows(registry: Registry, clock: FakeClock) -> None:
    _ready(registry, "a")
    clock.advance(3600)
    _ready(registry, "b")
    clock.advance(-7200)  # a clock stepped back: this row is "older" than the ones before it
    _ready(registry, "c")
    clock.advance(7200)
    cutoff = clock.now() - timedelta(minutes=30)
    assert registry.prune_audit(cutoff, batch=2, max_rows=3) == 3
    assert registry.prune_audit(cutoff, batch=2) == 1  # the rest of a, then b's first row is not old: stop
    assert [e.pool_id for e in registry.events()][:1] == ["b"] and len(registry.events()) == 8


def test_only_this_nodes_rows_are_pruned(db_url: str, clock: FakeClock) -> None:
    a, b = Registry(db_url, node_id="node-a", clock=clock), Registry(db_url, node_id="node-b", clock=clock)
    try:
        _ready(a, "on-a")
        _ready(b, "on-b")
        clock.advance(3600)
        assert a.prune_audit(clock.now()) == 4
        assert {e.pool_id for e in a.events()} == {"on-b"}
    finally:
        a.close()
        b.close()


def test_a_prune_that_dies_halfway_loses_and_doubles_nothing(
    registry: Registry, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    for pool_id in ("a", "b", "c"):
        _ready(registry, pool_id)
    clock.advance(3600)
    real, calls = retention._write_changes, []

    def dies_on_the_third_batch(*args: Any) -> None:  # the batches with a preload_ok row change the rollup
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        real(*args)

    monkeypatch.setattr(retention, "_write_changes", dies_on_the_third_batch)
    with pytest.raises(RuntimeError, match="killed"):
        registry.prune_audit(clock.now(), batch=2)
    assert [e.pool_id for e in registry.events()] == ["c", "c"]  # its last batch was rolled back, rows and all
    assert _rolled(registry) == {"a": 1.0, "b": 1.0}
    monkeypatch.setattr(retention, "_write_changes", real)
    assert registry.prune_audit(clock.now(), batch=2) == 2
    assert _rolled(registry) == {"a": 1.0, "b": 1.0, "c": 1.0}  # each pool's one preload_ok, once


def _rolled(registry: Registry) -> dict[str, float]:
    with registry.engine.connect() as conn:
        return {pool_id: value for pool_id, value in conn.execute(select(AuditRollup.pool_id, AuditRollup.value))}


def test_the_retention_setting_defaults_to_90_days_and_is_validated() -> None:
    assert PoolManagerConfig.from_env({}).audit_retention_days == 90
    assert PoolManagerConfig.from_env({"POOL_MANAGERD_AUDIT_RETENTION_DAYS": "7"}).audit_retention_days == 7
    for bad, message in (("0", "must be a positive integer"), ("soon", "must be an integer")):
        with pytest.raises(ConfigError, match=f"POOL_MANAGERD_AUDIT_RETENTION_DAYS=.*{message}"):
            PoolManagerConfig.from_env({"POOL_MANAGERD_AUDIT_RETENTION_DAYS": bad})


def test_the_models_match_the_migrations(registry: Registry) -> None:
    with registry.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


# -- the queries use their indexes ---------------------------------------------------------------------------
@pytest.fixture
def many_rows(registry: Registry) -> Iterator[Registry]:
    """20,000 audit rows, a second apart: node-a's first, then node-b's; 1 % crashes, 5 % restarts (the planner's
    statistics taken on PostgreSQL)."""
    with registry.engine.begin() as conn:
        if registry.engine.dialect.name == "sqlite":
            conn.execute(PoolEvent.__table__.insert(), [_row(i) for i in range(20_000)])
        else:
            conn.execute(text(
                "INSERT INTO pool_events (pool_id, at, kind, trigger, restart_count, node_id, correlation_id) "
                "SELECT 'p' || (g % 50), now() - (20000 - g) * interval '1 second', "
                "CASE WHEN g % 100 = 0 THEN 'crashed' ELSE 'retry' END, "
                "CASE WHEN g % 20 = 0 THEN 'retry' ELSE 'preload_ok' END, 0, "
                "CASE WHEN g < 10000 THEN 'node-a' ELSE 'node-b' END, 'req-' || g FROM generate_series(0, 19999) g"
            ))  # fmt: skip
    if registry.engine.dialect.name != "sqlite":
        with registry.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE pool_events"))
    yield registry


def _row(i: int) -> dict[str, Any]:
    kind, trigger = "crashed" if i % 100 == 0 else "retry", "retry" if i % 20 == 0 else "preload_ok"
    node = "node-a" if i < 10_000 else "node-b"
    return {"pool_id": f"p{i % 50}", "at": utcnow() - timedelta(seconds=20_000 - i), "kind": kind, "trigger": trigger,
            "restart_count": 0, "node_id": node, "correlation_id": f"req-{i}"}  # fmt: skip


def _plan(registry: Registry, sql: str, params: dict[str, Any]) -> str:
    explain = "EXPLAIN QUERY PLAN " if registry.engine.dialect.name == "sqlite" else "EXPLAIN "
    with registry.engine.connect() as conn:
        return "\n".join(str(r[-1] if len(r) > 1 else r[0]) for r in conn.execute(text(explain + sql), params))


def test_a_scrape_reads_new_audit_rows_through_an_index_never_the_whole_table(many_rows: Registry) -> None:
    q = _rows_query(True, limited=True).params(node="node-a", after=9990)  # node-a's last 10, node-b's 10,000 after
    sql = str(q.compile(dialect=many_rows.engine.dialect, compile_kwargs={"literal_binds": True}))
    plan = _plan(many_rows, sql, {})
    if many_rows.engine.dialect.name == "sqlite":
        assert "USING INDEX ix_pool_events_node_id (node_id=? AND id>?)" in plan, plan
    else:  # PostgreSQL picks this index or the primary key's: either way a range from the cursor
        assert "Index Scan using" in plan and "Index Cond: (id > 9990)" in plan, plan
    assert "SCAN pool_events\n" not in plan + "\n" and "Seq Scan" not in plan, plan  # no full scan
    assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan  # read in index order: no sort


@pytest.mark.parametrize(
    ("sql", "index"),
    [
        # docs/registry.md: restarts of one pool in the last hour
        ("SELECT at, restart_count, reason FROM pool_events WHERE pool_id = 'p7' AND trigger = 'retry' "
         "AND at > :since ORDER BY id", "ix_pool_events_pool_trigger_at"),
        # crashes by reason
        ("SELECT pool_id, reason, count(*) FROM pool_events WHERE kind = 'crashed' AND at > :since "
         "GROUP BY pool_id, reason", "ix_pool_events_kind_at"),
        # everything one request caused
        ("SELECT at, pool_id, kind FROM pool_events WHERE correlation_id = 'req-42' ORDER BY id",
         "ix_pool_events_correlation_id"),
    ],
)  # fmt: skip
def test_the_documented_queries_use_an_index(many_rows: Registry, sql: str, index: str) -> None:
    since = utcnow() - timedelta(hours=1)
    assert index in _plan(many_rows, sql, {"since": since})
