"""Steps of features/placement/hetero_split.feature (B-HETERO-001..006).

Devices come from recorded NVML snapshots (memory_info_v2); the 70B-class model is a sparse GGUF whose header
and tensor infos describe a full-size Q4_K llama, the tiny model a real loadable GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from poolmgr.devices._snapshot import DeviceSnapshot
from poolmgr.engines.tiny_model import write_tiny_model
from poolmgr.errors import InsufficientVram
from poolmgr.placement import SplitPlan, VramNeed, estimate_vram, make_plan
from poolmgr.placement._layer_split import format_ratios, parse_ratios
from poolmgr.placement.hetero_split import layer_room
from poolmgr.placement.vram import SCHED_MAX_COPIES

from ._helpers import (
    GIB,
    H100_SNAPSHOT,
    HETERO_SNAPSHOT,
    LLAMA_70B,
    devices_from_snapshot,
    reference_layer_counts,
    write_sparse_llama_gguf,
)

scenarios("placement/hetero_split.feature")


@dataclass
class World:
    tmp: Path
    devices: list[DeviceSnapshot]
    model: Path | None = None
    ctx: int = 0
    slots: int = 1
    mask: list[DeviceSnapshot] | None = None
    need: VramNeed | None = None
    plan: SplitPlan | None = None
    error: Exception | None = None

    def planned(self) -> tuple[VramNeed, SplitPlan, list[DeviceSnapshot]]:
        assert self.need is not None and self.plan is not None and self.mask is not None, self.error
        return self.need, self.plan, self.mask

    def named(self, name: str) -> int:
        assert self.mask is not None
        return next(i for i, d in enumerate(self.mask) if name in d.name)


@pytest.fixture(scope="module")
def sparse_70b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sparse_llama_gguf(tmp_path_factory.mktemp("models") / "llama-70b-q4_k.gguf", **LLAMA_70B)


@given("the synthetic host with an RTX 4090, an RTX 3060 and an A100", target_fixture="world")
def hetero_host(tmp_path: Path) -> World:
    devices = devices_from_snapshot(HETERO_SNAPSHOT)
    assert [d.name.split()[-1] for d in devices] == ["4090", "3060", "A100-SXM4-80GB"]
    return World(tmp=tmp_path, devices=devices)


@given("the recorded host with one H100")
def h100_host(world: World) -> None:
    world.devices = devices_from_snapshot(H100_SNAPSHOT)
    assert len(world.devices) == 1 and "H100" in world.devices[0].name


@given(parsers.parse("a 70B-class Q4_K model with a context of {ctx:d} tokens in {slots:d} slot"))
@given(parsers.parse("a 70B-class Q4_K model with a context of {ctx:d} tokens in {slots:d} slots"))
def model_70b(world: World, sparse_70b: Path, ctx: int, slots: int) -> None:
    world.model, world.ctx, world.slots = sparse_70b, ctx, slots
    assert sparse_70b.stat().st_size > 30 * GIB  # described size; the data is a hole


@given(parsers.parse("the tiny model with a context of {ctx:d} tokens in {slots:d} slots"))
def tiny_model(world: World, ctx: int, slots: int) -> None:
    world.model, world.ctx, world.slots = write_tiny_model(world.tmp / "tiny.gguf"), ctx, slots
    assert world.model.stat().st_size == 469_120


def _mask(world: World, mask: str) -> list[DeviceSnapshot]:
    return [world.devices[int(i)] for i in mask.split(",")]


def _plan(world: World, mask: str, tensor_split: list[float] | None = None) -> None:
    assert world.model is not None
    world.mask = _mask(world, mask)
    try:
        world.need, world.plan = make_plan(
            world.model, world.mask, ctx_size=world.ctx, slots=world.slots, tensor_split=tensor_split
        )
    except InsufficientVram as exc:
        world.error = exc
        world.need = estimate_vram(world.model, ctx_size=world.ctx, slots=world.slots)


@when(parsers.parse('the model is planned over the devices "{mask}"'))
def plan_over(world: World, mask: str) -> None:
    _plan(world, mask)
    assert world.error is None, world.error


@when(parsers.parse('the tensor split "{split}" is validated over the devices "{mask}"'))
def validate_split(world: World, split: str, mask: str) -> None:
    values = [float(v) for v in split.split(",")]
    _plan(world, mask, values)
    assert world.mask is not None and len(values) == len(world.mask)
    assert (world.plan is None) != (world.error is None)  # either a plan or a refusal, never both


@then("the plan has one ratio per device in mask order")
def one_ratio_per_device(world: World) -> None:
    _, plan, mask = world.planned()
    assert plan.device_uuids == [d.uuid for d in mask]
    assert len(plan.ratios) == len(plan.per_device_bytes) == len(plan.layers_per_device) == 3
    assert all(r > 0 for r in plan.ratios)


@then("the ratios follow the room each device has for layers to within a layer")
def ratios_follow_room(world: World) -> None:
    need, plan, _ = world.planned()
    room = layer_room(need, plan.usable_bytes, SCHED_MAX_COPIES)
    for ratio, room_i in zip(plan.ratios, room, strict=True):
        assert abs(ratio - room_i / sum(room)) <= 1.5 / need.n_gpu_layers


@then("llama.cpp would place the planned layers from the ratios")
def llama_places_planned_layers(world: World) -> None:
    need, plan, _ = world.planned()
    counts = reference_layer_counts(parse_ratios(format_ratios(plan.ratios)), need.n_gpu_layers)
    assert counts[:-1] == plan.layers_per_device[:-1]
    assert counts[-1] == plan.layers_per_device[-1] + 1  # the output layer goes with the last device
    assert plan.output_device == 2


@then("the ratios sum to 1.0")
def ratios_sum_to_one(world: World) -> None:
    _, plan, _ = world.planned()
    assert sum(plan.ratios) == pytest.approx(1.0, abs=1e-9)


@then("the --tensor-split flag holds the same ratios")
def flag_holds_ratios(world: World) -> None:
    _, plan, _ = world.planned()
    flags = plan.to_tensor_split_flags()
    values = [float(v) for v in flags[flags.index("--tensor-split") + 1].split(",")]
    assert values == plan.ratios
    assert round(sum(values), 6) == 1.0


@then("no device is planned more than its free VRAM less the headroom")
def no_device_over(world: World) -> None:
    _, plan, mask = world.planned()
    for used, dev in zip(plan.per_device_bytes, mask, strict=True):
        assert used <= dev.vram_free_bytes - plan.headroom_bytes


@then(parsers.parse('the "{name}" keeps at least the headroom free'))
def keeps_headroom(world: World, name: str) -> None:
    _, plan, mask = world.planned()
    i = world.named(name)
    assert mask[i].vram_free_bytes - plan.per_device_bytes[i] >= plan.headroom_bytes > 0


@then(parsers.parse('the ratio of the "{name}" is below its share of the free VRAM'))
def ratio_capped(world: World, name: str) -> None:
    _, plan, mask = world.planned()
    i = world.named(name)
    assert plan.ratios[i] < mask[i].vram_free_bytes / sum(d.vram_free_bytes for d in mask)


@then(parsers.parse('ratios proportional to free VRAM are refused because the "{name}" is over by some GiB'))
def free_proportional_refused(world: World, name: str) -> None:
    need, _, mask = world.planned()
    with pytest.raises(InsufficientVram) as refused:
        SplitPlan.validate_explicit(mask, need, [d.vram_free_bytes for d in mask])
    device_part = next(part for part in str(refused.value).split("; ") if name in part)
    assert "over by" in device_part


@then(parsers.parse('the plan is refused for insufficient VRAM naming the "{name}" with what it needs and has'))
def refused_naming(world: World, name: str) -> None:
    assert isinstance(world.error, InsufficientVram)
    assert world.mask is not None
    dev = world.mask[world.named(name)]
    part = next(p for p in str(world.error).split("; ") if name in p)
    assert dev.uuid in part and "needs" in part and "over by" in part
    assert f"has {dev.vram_free_bytes / GIB:.2f} GiB free" in part


@then(parsers.parse('the tensor split "{split}" over the devices "{mask}" is accepted as given'))
def split_accepted(world: World, split: str, mask: str) -> None:
    world.error = None
    values = [float(v) for v in split.split(",")]
    _plan(world, mask, values)
    _, plan, _ = world.planned()
    assert plan.explicit
    assert plan.ratios == pytest.approx([v / sum(values) for v in values], abs=1e-6)


@then("the plan is a single ratio of 1.0 with no split flags")
def single_ratio(world: World) -> None:
    _, plan, _ = world.planned()
    assert plan.ratios == [1.0]
    assert plan.to_tensor_split_flags() == []
    assert not plan.is_split


@then("every layer and the output layer are on that device")
def all_on_device(world: World) -> None:
    need, plan, _ = world.planned()
    assert plan.layers_per_device == [need.n_layer]
    assert plan.output_device == 0
    assert plan.per_device_bytes == [need.total_bytes - need.headroom_bytes]
