"""A running node follows its desired pools in the registry (lifecycle/desired.py, reconciler): a pool added by
another process (the CLI's apply, another API) runs within a heartbeat; a changed spec of a ready pool reloads
that pool only, to the whole new spec; a removed pool drains, stops and leaves the registry; nothing else
restarts. Real reconciler, real (fake llama-server) engines, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from poolmgr.lifecycle.desired import apply_pools, put_pool, remove_pool
from poolmgr.lifecycle.reconciler import Reconciler
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig
from poolmgr.states import PoolState
from poolmgr.store import Registry
from tests.e2e.conftest import kill_engines
from tests.lifecycle.conftest import MakeEngineDir


async def _until(pred: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.05)


def test_a_running_node_follows_its_desired_pools(db_url: str, make_engine_dir: MakeEngineDir) -> None:
    engine_dir = make_engine_dir()
    model, other = str(engine_dir / "tiny.gguf"), str(engine_dir / "other.gguf")
    Path(other).write_bytes(Path(model).read_bytes())
    cfg = PoolManagerConfig(
        state_dir=engine_dir / "state", llama_server=str(engine_dir / "llama-server"), node_id="node-a",
        node_heartbeat_ms=100, node_grace_ms=1000, stop_grace_ms=500,
    )  # fmt: skip
    registry = Registry(db_url, node_id="node-a")
    cli = Registry(db_url, node_id="node-a")  # another process of the same node (poolmgr apply, pool rm)
    ids = ["kept", "added", "api"]

    def state(pool_id: str) -> PoolState | None:
        view = registry.find(pool_id)
        return None if view is None else view.state

    async def scenario() -> None:
        rec = Reconciler(cfg, registry)
        await rec.start([PoolSpec(id="kept", model=model)])
        try:
            await _until(lambda: state("kept") is PoolState.READY, "kept ready")
            kept_pid = registry.get("kept").pid
            apply_pools(cli, [PoolSpec(id="kept", model=model), PoolSpec(id="added", model=model)])
            await _until(lambda: state("added") is PoolState.READY, "a pool applied by another process runs")
            put_pool(cli, PoolSpec(id="api", model=model))
            await _until(lambda: state("api") is PoolState.READY, "a pool put through the API runs")
            put_pool(cli, PoolSpec(id="api", model=other, slots=2))  # a changed spec: that pool reloads
            await _until(lambda: registry.get("api").model == other and state("api") is PoolState.READY, "reload")
            assert registry.get("api").slots_total == 2
            remove_pool(cli, "added")
            await _until(lambda: state("added") is None, "a removed pool leaves the registry")
            assert registry.get("kept").pid == kept_pid  # nothing else restarted
            assert "added" not in {p.id for p in registry.pools(node_id="node-a")}
        finally:
            await rec.shutdown(keep_engines=False)

    try:
        asyncio.run(scenario())
        kinds = [e.kind for e in registry.events(pool_id="added")]
        assert kinds[-1] == "deregistered" and "remove_requested" in kinds
        assert "reload_requested" in [e.kind for e in registry.events(pool_id="api")]
    finally:
        kill_engines(ids)
        registry.close()
        cli.close()
