"""Steps of features/placement/device_masks.feature (B-DEVICE-001..005, 010..013).

Engines are modelled at the NVML seam with what was recorded on real GPUs: with a UUID mask NVML listed the
llama-server pid on that GPU (528 MiB of CUDA context), with an empty mask it listed nothing while the engine
served on the CPU (shared/fixtures/gpu/h200-llama-server-b11434-cuda/probe.json). The verdicts come from the
product: `poolmgr.lifecycle.placing.gpu_problem` (what serve's watch loop asks about a running engine), the
pools file check of `poolmgr.validation`, and the registry. A child process that must be found through /proc
is a real one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pytest_bdd import given, parsers, scenarios, then, when
from sqlalchemy import text as text_sql

from poolmgr.devices import (
    DeviceMask,
    DeviceSnapshot,
    FakeNvmlBackend,
    descendant_pids,
    discover,
    engine_env,
    engine_on_gpus,
    stderr_shows_cpu_spillover,
)
from poolmgr.errors import DeviceError
from poolmgr.lifecycle.placing import gpu_problem
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig
from poolmgr.store import Registry
from poolmgr.validation import check_pools_file, validate_pools

from .gpu_fixtures import H100, HETERO, LLAMA_DIR, LLAMA_PROBE, load_json

scenarios("placement/device_masks.feature")

MIB = 1024**2
# Engine pids and NVML process lists recorded for llama-server runs with a UUID mask.
_RECORDED_GPU_RUNS = ("cuda_uuid_mask", "tensor_split_one_gpu", "nonroot_nocaps")


@dataclass
class World:
    backend: FakeNvmlBackend
    mask: DeviceMask | None = None
    error: Exception | None = None
    pools: dict[str, DeviceMask] = field(default_factory=dict)
    pids: dict[str, set[int]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    stderr: str = ""
    child: int = 0
    specs: dict[str, PoolSpec] = field(default_factory=dict)
    engine: dict[str, int] = field(default_factory=dict)  # pool → the engine pid gpu_problem is asked about
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    db_url: str = ""
    stored: dict[str, str] = field(default_factory=dict)  # pool → the mask its registry row holds
    validated: dict[str, list[DeviceSnapshot]] = field(default_factory=dict)  # pool → devices validation found

    @property
    def devices(self) -> list[DeviceSnapshot]:
        return discover(self.backend).devices

    def only_pool(self) -> tuple[str, DeviceMask]:
        assert len(self.pools) == 1
        return next(iter(self.pools.items()))


def _recorded_run(case: str) -> tuple[int, list[tuple[int, int]]]:
    run = load_json(LLAMA_PROBE)[case]
    return int(run["engine_pid"]), [(p["pid"], p["used_mib"] * MIB) for p in run["nvml_procs"]]


def _start_on_mask(world: World, pool: str, case: str, *, pid: int | None = None) -> int:
    """CUDA puts the engine on the GPUs named in CUDA_VISIBLE_DEVICES; NVML then lists it there (as recorded,
    or with the pid of a real process standing in for the engine)."""
    env = engine_env(world.pools[pool], world.devices)
    recorded, procs = _recorded_run(case)
    assert procs and procs[0][0] == recorded
    pid = recorded if pid is None else pid
    procs = [(pid, used) for _p, used in procs]
    for uuid in env["CUDA_VISIBLE_DEVICES"].split(","):
        others = [p for p in world.backend.compute_processes_of(uuid) if p[0] != pid]
        world.backend.set_processes(uuid, others + procs)
    world.pids[pool] = {pid}
    world.engine[pool] = pid
    return pid


def _real_engine(world: World) -> tuple[int, int]:
    """A real process with a real child (pid, child pid): what /proc shows of an engine that forked."""
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], start_new_session=True)
    world.processes.append(proc)
    deadline = time.monotonic() + 5
    while not (children := descendant_pids(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(children) == 1, children
    return proc.pid, children.pop()


def _uuid_of(world: World, index: int) -> str:
    return next(d.uuid for d in world.devices if d.index == index and not d.is_mig)


def _gpu_check(world: World, pool: str) -> object:
    """What serve's watch loop would conclude about the pool's running engine from a fresh NVML snapshot."""
    return gpu_problem(world.specs[pool], world.pools[pool].uuids(world.devices), world.engine[pool],
                       discover(world.backend, warn=False))  # fmt: skip


# -- given -------------------------------------------------------------------------------------------------


@given(
    "the GPUs of the synthetic host with an RTX 4090, an RTX 3060 and an A100 split into 2 MIG instances",
    target_fixture="world",
)
def synthetic_host(_processes: list[subprocess.Popen[bytes]]) -> World:
    world = World(FakeNvmlBackend(HETERO), processes=_processes)
    names = [d.name for d in world.devices]
    assert names[:3] == ["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3060", "NVIDIA A100-SXM4-80GB"]
    assert sum(d.is_mig for d in world.devices) == 2
    return world


@pytest.fixture
def _processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Real processes a scenario starts; killed (with their process group) afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@given("the GPUs recorded on the real one-GPU H100 host")
def h100_host(world: World) -> None:
    world.backend = FakeNvmlBackend(H100)
    assert [d.name for d in world.devices] == ["NVIDIA H100 80GB HBM3"]


def _add_pool(world: World, pool: str, mask: str) -> None:
    """A pool as the product checks it: the pools file's validation against the discovered devices."""
    spec = PoolSpec(id=pool, model=f"/models/{pool}.gguf", device_mask=mask)
    others = list(world.specs.values())
    checked = validate_pools([*others, spec], discover(world.backend, warn=False), source="pools.toml")
    world.specs[pool] = spec
    world.pools[pool] = DeviceMask.parse(mask)
    assert checked.devices[pool] == world.pools[pool].resolve(world.devices)


@given(parsers.parse('a pool "{pool}" with the device mask "{mask}"'))
def pool_with_mask(world: World, pool: str, mask: str) -> None:
    _add_pool(world, pool, mask)


@given(parsers.parse('a pool "{pool}" with the device mask of the first MIG instance'))
def pool_on_mig(world: World, pool: str) -> None:
    mig = next(d for d in world.devices if d.is_mig)
    _add_pool(world, pool, mig.uuid)
    assert world.pools[pool].resolve(world.devices) == [mig]


# -- when --------------------------------------------------------------------------------------------------


@when(parsers.parse('the device mask "{text}" is parsed'))
def parse_mask(world: World, text: str) -> None:
    world.mask = DeviceMask.parse(text)
    assert world.mask.text == text


@when(parsers.parse('the device mask "{text}" is validated'))
def validate_mask(world: World, text: str) -> None:
    try:
        DeviceMask.parse(text).validate_against(world.devices)
    except DeviceError as exc:
        world.error = exc


@when("its engine runs with the pool's engine environment and NVML attributes it as recorded for a UUID mask")
def engine_runs(world: World) -> None:
    pool, _mask = world.only_pool()
    pid = _start_on_mask(world, pool, "cuda_uuid_mask")
    assert any(pid in dict(d.processes) for d in world.devices)


@when(parsers.parse('NVML also lists the engine of "{pool}" on GPU {index:d}'))
def engine_also_on(world: World, pool: str, index: int) -> None:
    uuid = _uuid_of(world, index)
    pid = world.engine[pool]
    assert uuid not in world.pools[pool].uuids(world.devices)
    world.backend.set_processes(uuid, [*world.backend.compute_processes_of(uuid), (pid, 528 * MIB)])


@when(parsers.parse('both engines run and a child process of the engine of "{pool}" appears on GPU {index:d} in NVML'))
def child_spills(world: World, pool: str, index: int) -> None:
    engine, world.child = _real_engine(world)
    for name, case in zip(world.pools, _RECORDED_GPU_RUNS, strict=False):
        _start_on_mask(world, name, case, pid=engine if name == pool else None)
    assert world.child in descendant_pids(world.engine[pool])
    uuid = _uuid_of(world, index)
    world.backend.set_processes(uuid, [*world.backend.compute_processes_of(uuid), (world.child, 528 * MIB)])


@when(parsers.parse('the engine environment for the mask "{text}" is built'))
def build_env(world: World, text: str) -> None:
    world.mask = DeviceMask.parse(text)
    world.env = engine_env(world.mask, world.devices)


@when("its engine logged the recorded no-GPU stderr and NVML lists no process of it")
def engine_fell_back(world: World) -> None:
    pool, mask = world.only_pool()
    pid, procs = _recorded_run("no_gpu_visible_ngl99")
    assert procs == []
    for uuid in mask.uuids(world.devices):
        world.backend.set_processes(uuid, procs)
    world.pids[pool] = {pid}
    world.engine[pool] = pid
    world.stderr = (LLAMA_DIR / "no-gpu-visible-stderr.txt").read_text(encoding="utf-8")


@when(parsers.parse('the pools file gives pool "{pool}" the device mask "{text}" and poolmgr registers it'))
def register_pool(world: World, tmp_path: Path, sqlite_url: str, pool: str, text: str) -> None:
    """What serve does: the pools file check (against the recorded devices), then Registry.register."""
    pools = tmp_path / "pools.toml"
    pools.write_text(f'[[pool]]\nid = "{pool}"\nmodel = "/models/m.gguf"\ndevice_mask = "{text}"\n')
    checked = check_pools_file(pools, PoolManagerConfig(fake_nvml=str(HETERO)))
    [spec] = checked.specs
    world.validated[pool] = checked.devices.get(pool, [])
    reg = Registry(sqlite_url, node_id="node-a")
    try:
        reg.register(spec)
    finally:
        reg.close()
    world.mask = DeviceMask.parse(text)
    world.db_url = sqlite_url


# -- then --------------------------------------------------------------------------------------------------


def _mask(world: World) -> DeviceMask:
    assert world.mask is not None
    return world.mask


@then(parsers.parse("the mask names the GPU indices {a:d} and {b:d}"))
def mask_indices(world: World, a: int, b: int) -> None:
    assert _mask(world).refs == (a, b)


@then(parsers.parse('it resolves to the "{first}" and the "{second}" in that order'))
def resolves_to(world: World, first: str, second: str) -> None:
    assert [d.name for d in _mask(world).resolve(world.devices)] == [first, second]


@then(parsers.parse('it equals the mask "{other}"'))
def equals_mask(world: World, other: str) -> None:
    assert _mask(world) == DeviceMask.parse(other)
    assert _mask(world).resolve(world.devices) == DeviceMask.parse(other).resolve(world.devices)


@then(parsers.parse('it is rejected with an error that names the device "{device}"'))
def rejected_naming(world: World, device: str) -> None:
    assert isinstance(world.error, DeviceError)
    assert f"unknown device {device!r}" in str(world.error)


@then('the error lists the valid ids "0", "GPU0" and the H100\'s uuid')
def error_lists_valid(world: World) -> None:
    message = str(world.error)
    assert f"0 = GPU0 = {world.devices[0].uuid}" in message
    assert "\n" not in message


@then(parsers.parse('it is rejected with an error containing "{why}"'))
def rejected_with(world: World, why: str) -> None:
    assert isinstance(world.error, DeviceError), "the mask was accepted"
    assert why in str(world.error) and "\n" not in str(world.error)


@then("CUDA_VISIBLE_DEVICES for it is the uuids of GPU 1 and GPU 0, comma-joined in mask order")
def cvd_in_order(world: World) -> None:
    by_index = {d.index: d.uuid for d in world.devices if not d.is_mig}
    assert _mask(world).to_cuda_visible_devices(world.devices) == f"{by_index[1]},{by_index[0]}"


@then('the "cpu" mask converts to an empty CUDA_VISIBLE_DEVICES')
def cpu_cvd(world: World) -> None:
    assert DeviceMask.parse("cpu").to_cuda_visible_devices(world.devices) == ""


@then("NVML shows the engine on its masked GPU")
def on_masked_gpu(world: World) -> None:
    pool, mask = world.only_pool()
    assert engine_on_gpus(world.pids[pool], mask.uuids(world.devices), world.devices)


@then("CUDA_VISIBLE_DEVICES is exactly the H100's uuid")
def cvd_is_uuid(world: World) -> None:
    assert world.env["CUDA_VISIBLE_DEVICES"] == world.devices[0].uuid


@then(parsers.parse('CUDA_DEVICE_ORDER is "{order}"'))
def device_order(world: World, order: str) -> None:
    assert world.env["CUDA_DEVICE_ORDER"] == order


@then("CUDA_VISIBLE_DEVICES is set and empty")
def cvd_empty(world: World) -> None:
    assert world.env == {"CUDA_VISIBLE_DEVICES": ""}


@then("the engine is not on its masked GPUs")
def not_on_gpus(world: World) -> None:
    pool, mask = world.only_pool()
    assert not engine_on_gpus(world.pids[pool], mask.uuids(world.devices), world.devices)


@then("its stderr shows a CPU spillover")
def stderr_spillover(world: World) -> None:
    assert stderr_shows_cpu_spillover(world.stderr)


@then(parsers.parse('poolmgr\'s GPU check reports nothing for "{pool}"'))
def gpu_check_clean(world: World, pool: str) -> None:
    assert _gpu_check(world, pool) is None


@then(parsers.parse('poolmgr\'s GPU check reports "{reason}" for "{pool}"'))
def gpu_check_reports(world: World, reason: str, pool: str) -> None:
    problem = _gpu_check(world, pool)
    assert problem is not None and getattr(problem, "reason", None) == reason, problem


@then(parsers.parse('poolmgr\'s GPU check reports "{reason}" for "{pool}" naming its engine on GPU {index:d}'))
def gpu_check_names_engine(world: World, reason: str, pool: str, index: int) -> None:
    problem = _gpu_check(world, pool)
    assert problem is not None and getattr(problem, "reason", None) == reason, problem
    assert f"pid {world.engine[pool]} on {_uuid_of(world, index)}" in str(problem)


@then(parsers.parse('poolmgr\'s GPU check reports "{reason}" for "{pool}" naming that child on GPU {index:d}'))
def gpu_check_names_child(world: World, reason: str, pool: str, index: int) -> None:
    problem = _gpu_check(world, pool)
    assert problem is not None and getattr(problem, "reason", None) == reason, problem
    assert str(problem) == f"engine outside its device mask: pid {world.child} on {_uuid_of(world, index)}"


@then(parsers.parse('the registry row of "{pool}" and the pool_registry view hold the mask "{text}" as configured'))
def stored_mask(world: World, pool: str, text: str) -> None:
    reg = Registry(world.db_url, node_id="node-a")
    try:
        view = reg.get(pool)
        with reg.engine.connect() as conn:
            in_view = conn.execute(
                text_sql("SELECT device_mask FROM pool_registry WHERE pool_id = :p"), {"p": pool}
            ).scalar_one()
    finally:
        reg.close()
    assert (view.device_mask, view.spec.device_mask, in_view) == (text, text, text)
    world.stored[pool] = in_view


@then(parsers.parse("the stored mask resolves to {devices}, the devices validation found for it"))
def stored_round_trip(world: World, devices: str) -> None:
    [pool] = list(world.stored)
    resolved = DeviceMask.parse(world.stored[pool]).resolve(world.devices)
    expected = [] if devices == "no device" else devices.split(",")
    assert [d.uuid for d in resolved] == expected
    assert resolved == world.validated[pool] == _mask(world).resolve(world.devices)
