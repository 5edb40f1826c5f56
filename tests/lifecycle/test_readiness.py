"""The preload's readiness wait (issue 19, item 3): the engine's ready line, seen through LogWatch when it is
written, ends the wait; /health is not polled while the model loads (on 2 cores that polling slowed the engine's
own start). An engine whose log does not say it is still found, by the fallback looks."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from poolmgr.engines import HealthResult, LlamaCppAdapter
from poolmgr.lifecycle.placing import CPU_PLACEMENT
from poolmgr.lifecycle.runtime import EngineRuntime
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig
from tests.e2e.conftest import kill_engines
from tests.lifecycle.conftest import MakeEngineDir

MARKERS = LlamaCppAdapter.ready_markers


class _CountingAdapter(LlamaCppAdapter):
    def __init__(self, markers: tuple[bytes, ...]) -> None:
        self.ready_markers = markers
        self.probes = 0

    async def probe_health(self, client: httpx.AsyncClient, base_url: str, timeout: float) -> HealthResult:
        self.probes += 1
        return await super().probe_health(client, base_url, timeout)


@pytest.mark.parametrize("markers", [MARKERS, ()], ids=["ready-line", "no-ready-line"])
def test_a_preload_does_not_poll_the_engine_while_its_model_loads(
    make_engine_dir: MakeEngineDir, markers: tuple[bytes, ...]
) -> None:
    """The fake llama-server loads for 600 ms, then logs `model loaded`. With its ready line the wait looks at
    /health a handful of times (fallback looks every 50 ms); an adapter without one polls (and is ready too)."""
    engine_dir = make_engine_dir(env="FAKE_ENGINE_LOAD_MS=600")
    cfg = PoolManagerConfig(state_dir=engine_dir / "state", llama_server=str(engine_dir / "llama-server"))
    spec = PoolSpec(id=f"logwatch-{len(markers)}", model=str(engine_dir / "tiny.gguf"))
    adapter = _CountingAdapter(markers)

    async def scenario() -> int:
        runtime = EngineRuntime(cfg, adapter=adapter, isolate=False)
        eng = runtime.spawn(spec, CPU_PLACEMENT)
        try:
            ready = await runtime.wait_ready(spec, eng, expect_gpu=False)
            assert ready.slots_total == 1
        finally:
            await runtime.stop(eng.pid, eng.start_time)
        return adapter.probes

    try:
        probes = asyncio.run(scenario())
    finally:
        kill_engines([spec.id])
    if markers:  # 600 ms / 50 ms fallback looks + the one at the line; polled every 2 ms: ~200 here
        assert 2 <= probes <= 25, probes
