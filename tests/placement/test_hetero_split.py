"""SplitPlan on the synthetic three-GPU host (RTX 4090 + RTX 3060 + A100) and the recorded H100."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from poolmgr.devices._snapshot import DeviceSnapshot
from poolmgr.engines.tiny_model import write_tiny_model
from poolmgr.errors import ConfigError, DeviceError, InsufficientVram
from poolmgr.placement import (
    SplitPlan,
    VramNeed,
    engine_gpu_flags,
    estimate_vram,
    estimate_vram_from_header,
)
from poolmgr.placement._layer_split import format_ratios, parse_ratios
from poolmgr.placement.hetero_split import layer_room
from poolmgr.placement.vram import SCHED_MAX_COPIES

from ._helpers import (
    GIB,
    H100_SNAPSHOT,
    HETERO_SNAPSHOT,
    LLAMA_70B,
    device,
    device_bytes,
    devices_from_snapshot,
    llama_header,
    reference_layer_counts,
)

HETERO = devices_from_snapshot(HETERO_SNAPSHOT)
H100 = devices_from_snapshot(H100_SNAPSHOT)
RTX_3060 = next(d for d in HETERO if "3060" in d.name)


def _need_70b(ctx: int, slots: int = 1) -> VramNeed:
    return estimate_vram_from_header(llama_header(**LLAMA_70B), ctx_size=ctx, slots=slots)


def _check_against_llama_cpp(plan: SplitPlan, need: VramNeed, devices: list[DeviceSnapshot]) -> None:
    """Re-place the plan's flag ratios with llama.cpp's loop and re-add the bytes: they must fit and agree."""
    units = need.n_gpu_layers
    counts = reference_layer_counts(parse_ratios(format_ratios(plan.ratios)), units) if plan.is_split else [units]
    copies = SCHED_MAX_COPIES if plan.is_split else 1
    start = need.first_gpu_layer
    for i, count in enumerate(counts):
        n_layers = max(min(count, need.n_layer - start), 0)
        has_output = count > 0 and start + count > need.n_layer
        used = device_bytes(need, start, n_layers, has_output=has_output, pipeline_copies=copies)
        assert plan.per_device_bytes[i] == used
        assert plan.layers_per_device[i] == n_layers
        assert used + need.headroom_bytes <= devices[i].vram_free_bytes
        assert (plan.output_device == i) == has_output
        start += count


def test_three_gpu_plan_places_whole_layers_that_fit_every_device() -> None:
    need = _need_70b(8192)
    plan = SplitPlan.compute(HETERO, need)
    assert plan.device_uuids == [d.uuid for d in HETERO]
    assert sum(plan.ratios) == pytest.approx(1.0, abs=1e-9)
    assert sum(plan.layers_per_device) == need.n_layer
    assert all(n > 0 for n in plan.layers_per_device)
    assert plan.output_device == 2  # the output layer follows the last layer: the A100
    _check_against_llama_cpp(plan, need, HETERO)


def test_three_gpu_ratios_follow_the_room_each_device_has_for_layers() -> None:
    need = _need_70b(8192)
    plan = SplitPlan.compute(HETERO, need)
    room = layer_room(need, plan.usable_bytes, SCHED_MAX_COPIES)
    for ratio, share in zip(plan.ratios, (r / sum(room) for r in room), strict=True):
        assert abs(ratio - share) <= 1.5 / need.n_gpu_layers
    by_ratio = sorted(range(3), key=lambda i: plan.ratios[i])
    by_free = sorted(range(3), key=lambda i: HETERO[i].vram_free_bytes)
    assert by_ratio == by_free


def test_smallest_gpu_is_capped_where_free_memory_proportions_would_overfill_it() -> None:
    need = _need_70b(65536)
    free = [d.vram_free_bytes for d in HETERO]
    with pytest.raises(InsufficientVram) as refused:
        SplitPlan.validate_explicit(HETERO, need, free)
    assert f"{RTX_3060.uuid} ({RTX_3060.name}) needs" in str(refused.value)
    assert "over by" in str(refused.value)
    plan = SplitPlan.compute(HETERO, need)
    i = HETERO.index(RTX_3060)
    assert plan.ratios[i] < RTX_3060.vram_free_bytes / sum(free)
    assert plan.per_device_bytes[i] + plan.headroom_bytes <= RTX_3060.vram_free_bytes
    _check_against_llama_cpp(plan, need, HETERO)


def test_model_too_big_for_the_devices_names_need_and_every_device() -> None:
    need = _need_70b(8192)
    small = HETERO[:2]
    with pytest.raises(InsufficientVram) as err:
        SplitPlan.compute(small, need)
    text = str(err.value)
    for dev in small:
        assert dev.uuid in text and f"{dev.vram_free_bytes / GIB:.2f} GiB free" in text
    assert f"weights {need.weights_bytes / GIB:.2f} GiB" in text
    assert f"KV cache {need.kv_bytes / GIB:.2f} GiB" in text


def test_device_too_small_for_its_own_cuda_context_is_refused() -> None:
    need = estimate_vram_from_header(llama_header(**LLAMA_70B), ctx_size=512)
    tiny_gpu = device("GPU-tiny", need.cuda_overhead_bytes, index=1)
    with pytest.raises(InsufficientVram, match="GPU-tiny"):
        SplitPlan.compute([HETERO[2], tiny_gpu], need)


def test_single_h100_is_not_split(tmp_path: Path) -> None:
    need = estimate_vram(write_tiny_model(tmp_path / "tiny.gguf"), ctx_size=2048, slots=4)
    plan = SplitPlan.compute(H100, need)
    assert plan.ratios == [1.0]
    assert plan.to_tensor_split_flags() == []
    assert plan.layers_per_device == [need.n_layer] and plan.output_device == 0
    assert plan.per_device_bytes == [need.total_bytes - need.headroom_bytes]
    assert engine_gpu_flags(plan, need.n_layer) == ["--n-gpu-layers", "3", "--fit", "off"]


def test_seventy_b_on_one_h100_fits_at_8k_and_not_at_128k() -> None:
    plan = SplitPlan.compute(H100, _need_70b(8192))
    assert plan.ratios == [1.0] and plan.layers_per_device == [80]
    need = _need_70b(131072)
    with pytest.raises(InsufficientVram) as err:
        SplitPlan.compute(H100, need)
    text = str(err.value)
    assert H100[0].uuid in text and "over by" in text
    assert f"needs {(need.total_bytes - need.headroom_bytes) / GIB:.2f} GiB" in text


def test_multi_gpu_flags_are_layer_split_with_main_gpu_zero() -> None:
    need = _need_70b(8192)
    plan = SplitPlan.compute(HETERO, need)
    flags = engine_gpu_flags(plan, need.n_layer)
    assert flags[:4] == ["--n-gpu-layers", "81", "--fit", "off"]
    assert flags[4] == "--tensor-split"
    assert [float(v) for v in flags[5].split(",")] == plan.ratios
    assert flags[6:] == ["--split-mode", "layer", "--main-gpu", "0"]


def test_plan_round_trips_through_json() -> None:
    plan = SplitPlan.compute(HETERO, _need_70b(8192))
    text = plan.to_json()
    assert json.loads(text)["version"] == 1
    assert SplitPlan.from_json(text) == plan
    assert SplitPlan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize(
    "text",
    ['{"version": 2}', "[]", '{"version": 1, "device_uuids": ["a"]}'],
)
def test_stored_plans_that_are_not_plans_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        SplitPlan.from_json(text)


def test_stored_plan_with_lists_of_different_length_is_rejected() -> None:
    data = SplitPlan.compute(HETERO, _need_70b(8192)).to_dict()
    data["ratios"] = data["ratios"][:2]
    with pytest.raises(ValueError, match="equal length"):
        SplitPlan.from_dict(data)


def test_explicit_tensor_split_is_placed_as_llama_cpp_would() -> None:
    need = _need_70b(8192)
    plan = SplitPlan.validate_explicit(HETERO, need, [1, 0.25, 3])
    assert plan.explicit
    assert plan.ratios == pytest.approx([1 / 4.25, 0.25 / 4.25, 3 / 4.25], abs=1e-6)
    assert sum(plan.ratios) == pytest.approx(1.0, abs=1e-9)
    _check_against_llama_cpp(plan, need, HETERO)


def test_explicit_tensor_split_must_match_the_devices() -> None:
    need = _need_70b(8192)
    with pytest.raises(ConfigError, match="3 devices"):
        SplitPlan.validate_explicit(HETERO, need, [1, 1])
    with pytest.raises(ConfigError, match="not all 0"):
        SplitPlan.validate_explicit(HETERO, need, [0, 0, 0])
    with pytest.raises(ConfigError, match=">= 0"):
        SplitPlan.validate_explicit(HETERO, need, [1, -1, 1])
    single = SplitPlan.validate_explicit(H100, need, [3])
    assert single.ratios == [1.0] and single.to_tensor_split_flags() == []


def test_margins_given_to_compute_replace_the_estimates() -> None:
    need = _need_70b(8192)
    plan = SplitPlan.compute(HETERO, need, cuda_overhead_bytes=GIB, headroom_bytes=2 * GIB)
    assert plan.cuda_overhead_bytes == GIB and plan.headroom_bytes == 2 * GIB
    assert plan.usable_bytes == [d.vram_free_bytes - 3 * GIB for d in HETERO]
    default = SplitPlan.compute(HETERO, need)
    assert sum(plan.per_device_bytes) - sum(default.per_device_bytes) == 3 * (GIB - need.cuda_overhead_bytes)


def test_device_lists_that_cannot_be_split_are_refused() -> None:
    need = _need_70b(8192)
    with pytest.raises(DeviceError, match="at least one"):
        SplitPlan.compute([], need)
    with pytest.raises(DeviceError, match="twice"):
        SplitPlan.compute([HETERO[0], HETERO[0]], need)
    mig = DeviceSnapshot(
        index=2001,
        uuid="MIG-aaaa",
        name="A100 MIG 3g.40gb",
        pci_bus_id="00000000:41:00.0",
        compute_capability=(8, 0),
        vram_total_bytes=40 * GIB,
        vram_free_bytes=40 * GIB,
        is_mig=True,
        parent_uuid=HETERO[2].uuid,
    )
    with pytest.raises(DeviceError, match="MIG"):
        SplitPlan.compute([HETERO[0], mig], need)


def test_no_offloaded_layers_cannot_be_split() -> None:
    need = estimate_vram_from_header(llama_header(**LLAMA_70B), ctx_size=512, n_gpu_layers=0)
    with pytest.raises(ConfigError, match="n_gpu_layers=0"):
        SplitPlan.compute(HETERO, need)
