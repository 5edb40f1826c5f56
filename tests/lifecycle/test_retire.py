"""A pool removed from the pools file is removed on the next start: drained, its engine stopped (it does not run on
unsupervised), then its row deleted; its audit stays."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from poolmgr.engines._procfs import read_start_time
from poolmgr.lifecycle.effects import EngineRecorded
from poolmgr.lifecycle.fsm import fire
from poolmgr.lifecycle.reconciler import Reconciler
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig
from poolmgr.states import PoolState, Trigger
from poolmgr.store import Registry
from tests.pool_steps import step


def test_a_pool_no_longer_in_the_file_is_drained_stopped_and_removed(sqlite_url: str, tmp_path: Path) -> None:
    cfg = PoolManagerConfig(state_dir=tmp_path / "state", stop_grace_ms=1000)
    registry = Registry(sqlite_url, node_id=cfg.node_id)
    registry.register(PoolSpec(id="gone", model="/m.gguf"))
    step(registry, "gone", Trigger.PLACE, Trigger.START_PRELOAD, Trigger.PRELOAD_OK)
    engine = subprocess.Popen(["sleep", "60"], start_new_session=True)  # an engine left by an earlier poolmgr
    start = read_start_time(engine.pid)
    assert start is not None
    fire(registry, "gone", EngineRecorded(engine.pid, start))

    async def scenario() -> None:
        rec = Reconciler(cfg, registry)
        await rec.start([])
        for _ in range(500):  # the worker drains it, stops the engine, deletes the row
            if registry.find("gone") is None:
                break
            await asyncio.sleep(0.01)
        await rec.shutdown(keep_engines=True)  # upgrade mode: it would leave a supervised engine running

    try:
        asyncio.run(scenario())
        assert engine.wait(timeout=5) is not None
        assert registry.find("gone") is None
        kinds = [(e.kind, e.to_state) for e in registry.events(pool_id="gone")]
        assert ("remove_requested", None) in kinds
        assert kinds[-1][0] == "deregistered"
        assert ("drained", PoolState.STOPPED.value) in kinds or ("stop", PoolState.STOPPED.value) in kinds
    finally:
        if engine.poll() is None:
            engine.kill()
        registry.close()
