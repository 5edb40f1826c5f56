"""NVML's run-time view of engines (B-DEVICE-010/011, OC-POOL-3012, GPU lost): spillover onto a foreign GPU,
CPU fallback, and a lost GPU crash the pool with a distinct reason. NVML is the recorded-snapshot fake; the
engine is a real process."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from poolmgr.devices import FakeNvmlBackend, discover
from poolmgr.lifecycle.placing import gpu_problem
from poolmgr.lifecycle.reconciler import Reconciler
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig
from poolmgr.states import PoolState
from poolmgr.store import Registry
from tests.e2e.conftest import engine_pids, kill_engines
from tests.lifecycle.conftest import MakeEngineDir

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gpu"
H100 = FIXTURES / "h100-80gb-hbm3" / "nvml-snapshot.json"
HETERO = FIXTURES / "hetero-3gpu-synthetic" / "nvml-snapshot.json"
H100_UUID = "GPU-ce457ed6-3363-954f-622b-78199190f4f2"
GiB = 1 << 30


def _hetero() -> tuple[FakeNvmlBackend, list[str]]:
    fake = FakeNvmlBackend(HETERO)
    return fake, [d.uuid for d in discover(fake, warn=False).devices if not d.mig_enabled and not d.is_mig]


def test_an_engine_on_its_own_gpu_is_fine() -> None:
    fake, uuids = _hetero()
    fake.set_processes(uuids[0], [(os.getpid(), GiB)])
    assert gpu_problem(PoolSpec(id="p", model="/m", device_mask="0"), [uuids[0]], os.getpid(),
                       discover(fake, warn=False)) is None  # fmt: skip


def test_an_engine_found_on_a_gpu_outside_its_mask_is_gpu_spillover() -> None:
    fake, uuids = _hetero()
    fake.set_processes(uuids[0], [(os.getpid(), GiB)])
    fake.set_processes(uuids[1], [(os.getpid(), GiB)])
    problem = gpu_problem(PoolSpec(id="p", model="/m", device_mask="0"), [uuids[0]], os.getpid(),
                          discover(fake, warn=False))  # fmt: skip
    assert problem is not None and problem.reason == "gpu_spillover"
    assert f"pid {os.getpid()} on {uuids[1]}" in problem.message


def test_a_gpu_engine_nvml_does_not_see_is_cpu_spillover() -> None:
    fake, uuids = _hetero()
    problem = gpu_problem(PoolSpec(id="p", model="/m", device_mask="0"), [uuids[0]], os.getpid(),
                          discover(fake, warn=False))  # fmt: skip
    assert problem is not None and problem.reason == "cpu_spillover"


def test_a_cpu_pool_found_on_a_gpu_is_gpu_spillover() -> None:
    fake, uuids = _hetero()
    fake.set_processes(uuids[-1], [(os.getpid(), GiB)])
    problem = gpu_problem(PoolSpec(id="p", model="/m"), [], os.getpid(), discover(fake, warn=False))
    assert problem is not None and problem.reason == "gpu_spillover"


def test_a_lost_gpu_is_a_driver_error() -> None:
    fake, uuids = _hetero()
    fake.set_processes(uuids[0], [(os.getpid(), GiB)])
    fake.fail_device(uuids[0])
    problem = gpu_problem(PoolSpec(id="p", model="/m", device_mask="0"), [uuids[0]], os.getpid(),
                          discover(fake, warn=False))  # fmt: skip
    assert problem is not None and problem.reason == "driver_error"
    assert uuids[0] in problem.message


class LiveNvml(FakeNvmlBackend):
    """The recorded H100, where NVML lists this pool's engine on the GPU (as a real CUDA engine would be)."""

    def __init__(self, pool_id: str) -> None:
        super().__init__(H100)
        self.pool_id = pool_id

    def compute_running_processes(self, handle: Any) -> list[tuple[int, int]]:
        if handle.device.get("uuid") == H100_UUID and H100_UUID not in self._failed:
            return [(pid, 530 << 20) for pid in engine_pids(self.pool_id)]
        return super().compute_running_processes(handle)


@pytest.fixture
def engine_dir(make_engine_dir: MakeEngineDir) -> Path:
    return make_engine_dir()


def test_a_gpu_pool_serves_while_nvml_sees_it_and_crashes_with_driver_error_when_its_gpu_is_lost(
    sqlite_url: str, engine_dir: Path
) -> None:
    nvml = LiveNvml("gpu")
    cfg = PoolManagerConfig(
        state_dir=engine_dir / "state", llama_server=str(engine_dir / "llama-server"), health_check_interval_ms=50,
        backoff_initial_ms=60_000, backoff_max_ms=60_000, stop_grace_ms=1000, vram_refresh_secs=1,
    )  # fmt: skip
    registry = Registry(sqlite_url, node_id=cfg.node_id)
    spec = PoolSpec(id="gpu", model=str(engine_dir / "tiny.gguf"), device_mask="0")

    async def scenario() -> None:
        rec = Reconciler(cfg, registry, inventory=lambda: discover(nvml, warn=False))
        await rec.start([spec])
        try:
            for _ in range(400):
                if registry.get("gpu").state is PoolState.READY:
                    break
                await asyncio.sleep(0.05)
            ready = registry.get("gpu")
            assert ready.state is PoolState.READY, ready
            assert ready.split_plan is not None and ready.split_plan["device_uuids"] == [H100_UUID]
            await asyncio.sleep(0.3)  # several health rounds with NVML checks: still ready
            assert registry.get("gpu").state is PoolState.READY
            # the periodic VRAM refresh carries a device's new free memory into the devices table and the pool
            nvml._data["devices"][0]["memory_info_v2"]["free"] = 12 * GiB
            for _ in range(100):
                if registry.get("gpu").vram_free_bytes == 12 * GiB:
                    break
                await asyncio.sleep(0.05)
            assert registry.get("gpu").vram_free_bytes == 12 * GiB
            assert [d["vram_free_bytes"] for d in registry.devices()] == [12 * GiB]
            nvml.fail_device(H100_UUID)
            for _ in range(200):
                if any(e.kind == "crashed" for e in registry.events(pool_id="gpu")):
                    break
                await asyncio.sleep(0.05)
        finally:
            await rec.shutdown(keep_engines=False)

    try:
        asyncio.run(scenario())
        crashed = [e for e in registry.events(pool_id="gpu") if e.kind == "crashed"]
        assert len(crashed) == 1 and crashed[0].reason == "driver_error"
        assert H100_UUID in (crashed[0].detail or {}).get("message", "")
        assert engine_pids("gpu") == []
    finally:
        registry.close()
        kill_engines(["gpu"])
