"""A pool removed from the pools file is stopped on the next start: its engine does not run on unsupervised."""

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
from poolmgr.states import DesiredState, PoolState, Trigger
from poolmgr.store import Registry
from tests.pool_steps import step


def test_a_pool_no_longer_in_the_file_is_stopped_and_its_engine_ended(sqlite_url: str, tmp_path: Path) -> None:
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
        await rec.shutdown(keep_engines=True)

    try:
        asyncio.run(scenario())
        assert engine.wait(timeout=5) is not None
        view = registry.get("gone")
        assert (view.state, view.desired_state, view.pid) == (PoolState.STOPPED, DesiredState.STOPPED, None)
        last = registry.events(pool_id="gone")[-1]
        assert (last.trigger, last.reason) == ("stop", "pool removed from the pools file")
    finally:
        if engine.poll() is None:
            engine.kill()
        registry.close()
