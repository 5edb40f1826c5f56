"""Steps of features/placement/device_masks.feature (B-DEVICE-001..005, 010..013).

Engines are modelled at the NVML seam with what was recorded on real GPUs: with a UUID mask NVML listed the
llama-server pid on that GPU (528 MiB of CUDA context), with an empty mask it listed nothing while the engine
served on the CPU (shared/fixtures/gpu/h200-llama-server-b11434-cuda/probe.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pytest_bdd import given, parsers, scenarios, then, when

from poolmgr.devices import (
    DeviceMask,
    DeviceSnapshot,
    FakeNvmlBackend,
    discover,
    engine_env,
    engine_on_gpus,
    find_foreign_gpus,
    stderr_shows_cpu_spillover,
)
from poolmgr.errors import DeviceError

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
    registry: dict[str, str] = field(default_factory=dict)

    @property
    def devices(self) -> list[DeviceSnapshot]:
        return discover(self.backend).devices

    def only_pool(self) -> tuple[str, DeviceMask]:
        assert len(self.pools) == 1
        return next(iter(self.pools.items()))


def _recorded_run(case: str) -> tuple[int, list[tuple[int, int]]]:
    run = load_json(LLAMA_PROBE)[case]
    return int(run["engine_pid"]), [(p["pid"], p["used_mib"] * MIB) for p in run["nvml_procs"]]


def _start_on_mask(world: World, pool: str, case: str) -> int:
    """CUDA puts the engine on the GPUs named in CUDA_VISIBLE_DEVICES; NVML then lists it there."""
    env = engine_env(world.pools[pool], world.devices)
    pid, procs = _recorded_run(case)
    assert procs and procs[0][0] == pid
    for uuid in env["CUDA_VISIBLE_DEVICES"].split(","):
        others = [p for p in world.backend.compute_processes_of(uuid) if p[0] != pid]
        world.backend.set_processes(uuid, others + procs)
    world.pids[pool] = {pid}
    return pid


# -- given -------------------------------------------------------------------------------------------------


@given(
    "the GPUs of the synthetic host with an RTX 4090, an RTX 3060 and an A100 split into 2 MIG instances",
    target_fixture="world",
)
def synthetic_host() -> World:
    world = World(FakeNvmlBackend(HETERO))
    names = [d.name for d in world.devices]
    assert names[:3] == ["NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3060", "NVIDIA A100-SXM4-80GB"]
    assert sum(d.is_mig for d in world.devices) == 2
    return world


@given("the GPUs recorded on the real one-GPU H100 host")
def h100_host(world: World) -> None:
    world.backend = FakeNvmlBackend(H100)
    assert [d.name for d in world.devices] == ["NVIDIA H100 80GB HBM3"]


@given(parsers.parse('a pool "{pool}" with the device mask "{mask}"'))
def pool_with_mask(world: World, pool: str, mask: str) -> None:
    world.pools[pool] = DeviceMask.parse(mask)
    world.pools[pool].validate_against(world.devices)


@given(parsers.parse('a pool "{pool}" with the device mask of the first MIG instance'))
def pool_on_mig(world: World, pool: str) -> None:
    mig = next(d for d in world.devices if d.is_mig)
    world.pools[pool] = DeviceMask.parse(mig.uuid)
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


@when(parsers.parse('a child process of the engine of "{pool}" appears on GPU {index:d} in NVML'))
def child_spills(world: World, pool: str, index: int) -> None:
    for name, case in zip(world.pools, _RECORDED_GPU_RUNS, strict=False):
        _start_on_mask(world, name, case)
    world.child = max(world.pids[pool]) + 1
    world.pids[pool].add(world.child)
    uuid = next(d.uuid for d in world.devices if d.index == index and not d.is_mig)
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
    world.stderr = (LLAMA_DIR / "no-gpu-visible-stderr.txt").read_text(encoding="utf-8")


@when(parsers.parse('the device mask "{text}" is stored in the registry as its canonical text'))
def store_mask_in_registry(world: World, text: str) -> None:
    # Registry stand-in until poolmgr.store lands: the value written is exactly mask.canonical(devices).
    world.mask = DeviceMask.parse(text)
    world.registry["pool"] = world.mask.canonical(world.devices)


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


@then("the engine is on no GPU outside its mask")
def no_foreign(world: World) -> None:
    pool, mask = world.only_pool()
    assert find_foreign_gpus(world.pids[pool], mask.uuids(world.devices), world.devices) == []


@then(parsers.parse('the spillover check reports that child of "{pool}" on GPU {index:d}'))
def reports_child(world: World, pool: str, index: int) -> None:
    uuid = next(d.uuid for d in world.devices if d.index == index and not d.is_mig)
    found = find_foreign_gpus(world.pids[pool], world.pools[pool].uuids(world.devices), world.devices)
    assert found == [(world.child, uuid)]


@then(parsers.parse('the spillover check reports nothing for "{pool}"'))
def reports_nothing(world: World, pool: str) -> None:
    uuids = world.pools[pool].uuids(world.devices)
    assert engine_on_gpus(world.pids[pool], uuids, world.devices)
    assert find_foreign_gpus(world.pids[pool], uuids, world.devices) == []


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


@then(parsers.parse('the stored text is "{stored}"'))
def stored_text(world: World, stored: str) -> None:
    assert world.registry["pool"] == stored


@then("parsing the stored text back resolves to the same devices")
def stored_round_trip(world: World) -> None:
    again = DeviceMask.parse(world.registry["pool"])
    assert again.resolve(world.devices) == _mask(world).resolve(world.devices)
