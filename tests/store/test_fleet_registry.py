"""The registry of a fleet: node liveness in the view (read-time, the database's clock), ownership of pool ids,
desired state written by apply / put / remove, and a rolling upgrade (a node still at 0004 against 0005). Each
test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text

from poolmgr.clock import FakeClock, utcnow
from poolmgr.errors import OwnedElsewhere
from poolmgr.inflight import Reload
from poolmgr.lifecycle.desired import apply_pools, put_pool, remove_pool
from poolmgr.lifecycle.fsm import fire
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import PoolState
from poolmgr.store import Registry
from poolmgr.store._db import make_engine, migrate
from tests.conftest import pg_schema_url
from tests.store.test_registry import _drain, _ready_pool


def _row(registry: Registry, pool_id: str) -> dict[str, Any]:
    with registry.engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM pool_registry WHERE pool_id = :p"), {"p": pool_id}).one()
    return dict(row._mapping)


def test_a_pool_is_routable_while_ready_and_its_node_alive(registry: Registry) -> None:
    """`node_alive` is computed when the view is read: the node's heartbeat plus its grace against the
    database's own clock. A node that stops beating makes its pools unroutable with nobody writing for them."""
    _ready_pool(registry)
    registry.heartbeat_node("host", grace_ms=600)
    row = _row(registry, "p1")
    assert bool(row["node_alive"]) and bool(row["routable"]) and row["node_heartbeat_at"] is not None
    time.sleep(0.9)  # past the grace, on the database's clock
    row = _row(registry, "p1")
    assert not row["node_alive"] and not row["routable"]
    assert (row["state"], bool(row["ready"])) == ("ready", True)  # earlier columns keep their meaning
    registry.heartbeat_node("host", grace_ms=600)  # back: routable again
    assert bool(_row(registry, "p1")["routable"])
    fire(registry, "p1", _drain())
    assert not _row(registry, "p1")["routable"]  # draining: alive, not routable


def test_an_id_of_another_node_is_refused_naming_the_owner(db_url: str, clock: FakeClock) -> None:
    node_a = Registry(db_url, node_id="node-a", clock=clock)
    node_b = Registry(db_url, node_id="node-b", clock=clock)
    try:
        node_a.register(PoolSpec(id="shared", model="/a.gguf"))
        for attempt in (
            lambda: node_b.register(PoolSpec(id="shared", model="/b.gguf")),
            lambda: apply_pools(node_b, [PoolSpec(id="mine", model="/m.gguf"), PoolSpec(id="shared", model="/b")]),
            lambda: put_pool(node_b, PoolSpec(id="shared", model="/b.gguf")),
            lambda: remove_pool(node_b, "shared"),
            lambda: node_b.deregister("shared"),
        ):
            with pytest.raises(OwnedElsewhere, match="belongs to node 'node-a'"):
                attempt()
        assert node_b.find("mine") is None  # a refused apply writes nothing
        view = node_a.get("shared")
        assert (view.node_id, view.model, view.removed_at) == ("node-a", "/a.gguf", None)  # untouched
    finally:
        node_a.close()
        node_b.close()


def test_apply_adds_changes_and_removes_the_file_pools_and_leaves_api_pools(registry: Registry) -> None:
    registry.heartbeat_node("host")
    gen0 = registry.heartbeat_node("host").desired_generation
    done = apply_pools(registry, [PoolSpec(id="a", model="/a.gguf"), PoolSpec(id="b", model="/b.gguf")])
    assert (done.added, done.changed, done.removed) == (["a", "b"], [], [])
    put_pool(registry, PoolSpec(id="api", model="/api.gguf"))
    _ready_pool(registry, "r")  # a file pool (registered by the test) that is ready
    done = apply_pools(registry, [PoolSpec(id="a", model="/a2.gguf"), PoolSpec(id="r", model="/r2.gguf", slots=2)])
    assert (done.added, sorted(done.changed), done.removed) == ([], ["a", "r"], ["b"])
    assert done.lines() == ["change a", "change r", "remove b"]
    assert registry.get("a").model == "/a2.gguf" and registry.get("a").generation == 2  # not ready: stored
    ready = registry.get("r")  # ready: a reload to the whole new spec (the data plane keeps its address)
    assert ready.state is PoolState.DRAINING and isinstance(ready.pending_op, Reload)
    assert ready.pending_op.new_spec == PoolSpec(id="r", model="/r2.gguf", slots=2)
    assert registry.get("b").removed_at is not None and registry.get("api").removed_at is None
    assert registry.heartbeat_node("host").desired_generation > gen0  # a running serve sees the change
    again = apply_pools(registry, [PoolSpec(id="a", model="/a2.gguf"), PoolSpec(id="r", model="/r2.gguf", slots=2)])
    assert (again.added, again.changed, again.removed) == ([], [], [])  # the reload in flight is no new change


def test_put_creates_then_changes_and_a_removal_can_be_called_off(registry: Registry) -> None:
    created, view = put_pool(registry, PoolSpec(id="p", model="/one.gguf"))
    assert created and view.source == "api" and view.state is PoolState.DISCOVERED
    created, view = put_pool(registry, PoolSpec(id="p", model="/two.gguf"))
    assert not created and view.model == "/two.gguf"
    assert remove_pool(registry, "p").removed_at is not None
    assert put_pool(registry, PoolSpec(id="p", model="/two.gguf"))[1].removed_at is None  # put again: kept
    kinds = [e.kind for e in registry.events(pool_id="p")]
    assert kinds == ["registered", "spec_updated", "remove_requested", "spec_updated"]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database (no schema yet)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'upgrade.db'}"
        return
    gen = pg_schema_url()
    yield next(gen)
    gen.close()


def test_a_node_at_0004_keeps_working_against_the_0005_schema(fresh_url: str) -> None:
    """Migrations only add: every 0004 column stays as it was, a 0004 node's writes (which name none of the new
    columns) still work, and its pools are alive in the view from its heartbeat alone."""
    migrate(fresh_url, "0004")
    engine = make_engine(fresh_url)
    try:
        before = _columns(engine)
        migrate(fresh_url, "head")
        after = _columns(engine)
        for table, cols in before.items():
            assert {c: after[table][c] for c in cols} == cols, f"{table}: a 0004 column changed"
        now = utcnow() if fresh_url.startswith("postgresql") else utcnow().replace(tzinfo=None)  # as 0004 stored it
        with engine.begin() as conn:  # what a 0004 node writes: no alive_until, no generation, no source
            conn.execute(text("INSERT INTO nodes (id, hostname, version, started_at, heartbeat_at) "
                              "VALUES ('old', 'h', '0.0.4', :t, :t)"), {"t": now})  # fmt: skip
        old = Registry(fresh_url, node_id="old")
        try:
            _ready_pool(old, "legacy")
            row = _row(old, "legacy")
            assert bool(row["node_alive"]) and bool(row["routable"])  # alive from heartbeat_at alone (5 s)
            assert (old.get("legacy").generation, old.get("legacy").source) == (1, "file")
        finally:
            old.close()
    finally:
        engine.dispose()


def _columns(engine: Any) -> dict[str, dict[str, tuple[str, bool]]]:
    insp = inspect(engine)
    return {
        table: {c["name"]: (str(c["type"]), bool(c["nullable"])) for c in insp.get_columns(table)}
        for table in ("pools", "nodes", "leases", "pool_events")
    }


def test_the_fleet_migration_goes_down_to_0004_and_up_again(fresh_url: str) -> None:
    """0005's downgrade restores 0004's view (loaded by path: an installed wheel has no importable migrations
    package), and the upgrade after it gives the fleet columns back."""
    from alembic import command

    from poolmgr.store._db import alembic_config

    migrate(fresh_url, "head")
    command.downgrade(alembic_config(fresh_url), "0003")
    migrate(fresh_url, "head")
    engine = make_engine(fresh_url)
    try:
        view_cols = {c["name"] for c in inspect(engine).get_columns("pool_registry")}
        assert {"node_alive", "routable", "node_heartbeat_at", "heartbeat_at"} <= view_cols
    finally:
        engine.dispose()
