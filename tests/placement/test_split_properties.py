"""Properties of SplitPlan.compute over random device sets and model sizes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from poolmgr.devices._snapshot import DeviceSnapshot
from poolmgr.errors import InsufficientVram
from poolmgr.placement import ModelHeader, SplitPlan, VramNeed, estimate_vram_from_header
from poolmgr.placement._layer_split import format_ratios, parse_ratios
from poolmgr.placement.vram import SCHED_MAX_COPIES

from ._helpers import GIB, MIB, device, device_bytes, reference_layer_counts

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def device_sets(min_size: int = 1, max_size: int = 6, max_gib: int = 96) -> st.SearchStrategy[list[DeviceSnapshot]]:
    free = st.integers(min_value=1024, max_value=max_gib * 1024).map(lambda mib: mib * MIB)
    return st.lists(free, min_size=min_size, max_size=max_size).map(
        lambda frees: [device(f"GPU-{i:04d}", f, index=i, name=f"GPU {i}") for i, f in enumerate(frees)]
    )


@st.composite
def headers(draw: st.DrawFn, weight_budget: int, max_layers: int) -> ModelHeader:
    """A model whose weights are 5 %..110 % of `weight_budget`, with layers of uneven size."""
    n_layer = draw(st.integers(min_value=1, max_value=max_layers))
    n_head_kv = draw(st.sampled_from([1, 2, 4, 8]))
    n_head = n_head_kv * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([64, 128]))
    total = int(weight_budget * draw(st.floats(min_value=0.05, max_value=1.1)))
    base = max(total // (n_layer + 1), 1)
    layers = draw(
        st.lists(st.integers(min_value=base * 3 // 4, max_value=base * 5 // 4), min_size=n_layer, max_size=n_layer)
    )
    return ModelHeader(
        architecture="llama",
        n_layer=n_layer,
        n_embd=n_head * head_dim,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_vocab=draw(st.sampled_from([320, 32000, 128256])),
        layer_bytes=tuple(layers),
        input_bytes=draw(st.integers(min_value=0, max_value=base)),
        output_bytes=draw(st.integers(min_value=0, max_value=base * 2)),
        n_ctx_train=4096,
    )


@st.composite
def scenarios(
    draw: st.DrawFn, min_devices: int = 1, max_devices: int = 6, max_gib: int = 96, max_layers: int = 100
) -> tuple[VramNeed, list[DeviceSnapshot]]:
    """Devices, and a model sized around what they hold (so both fits and refusals are common)."""
    devices = draw(device_sets(min_devices, max_devices, max_gib))
    need = estimate_vram_from_header(
        draw(headers(sum(d.vram_free_bytes for d in devices), max_layers)),
        ctx_size=draw(st.sampled_from([512, 2048, 4096, 8192, 16384])),
        slots=draw(st.integers(min_value=1, max_value=4)),
        headroom_bytes=draw(st.sampled_from([0, 256 * MIB, GIB])),
    )
    return need, devices


def _bytes_as_llama_cpp_places(need: VramNeed, counts: list[int], split: bool) -> list[tuple[int, int, bool]]:
    """(bytes, repeating layers, holds output) per device for llama.cpp's placement of `counts` units."""
    copies = SCHED_MAX_COPIES if split and need.n_gpu_layers > need.n_layer else 1
    out = []
    start = need.first_gpu_layer
    for count in counts:
        n_layers = max(min(count, need.n_layer - start), 0)
        has_output = count > 0 and start + count > need.n_layer
        out.append(
            (device_bytes(need, start, n_layers, has_output=has_output, pipeline_copies=copies), n_layers, has_output)
        )
        start += count
    return out


@PROPERTY_SETTINGS
@given(scenarios())
def test_plan_fits_every_device_at_layer_granularity_or_says_why(
    scenario: tuple[VramNeed, list[DeviceSnapshot]],
) -> None:
    need, devices = scenario
    try:
        plan = SplitPlan.compute(devices, need)
    except InsufficientVram as err:
        event("refused")
        for dev in devices:
            assert dev.uuid in str(err)
        return
    event(f"planned over {len(devices)} device(s)")
    assert len(plan.ratios) == len(devices) == len(plan.per_device_bytes)
    assert sum(plan.ratios) == pytest.approx(1.0, abs=1e-9)
    assert all(r >= 0 for r in plan.ratios)
    counts = (
        reference_layer_counts(parse_ratios(format_ratios(plan.ratios)), need.n_gpu_layers)
        if plan.is_split
        else [need.n_gpu_layers]
    )
    placed = _bytes_as_llama_cpp_places(need, counts, plan.is_split)
    assert [b for b, _, _ in placed] == plan.per_device_bytes
    assert [n for _, n, _ in placed] == plan.layers_per_device
    assert sum(plan.layers_per_device) == need.n_layer
    for (used, _, _), dev in zip(placed, devices, strict=True):
        assert used + need.headroom_bytes <= dev.vram_free_bytes


@PROPERTY_SETTINGS
@given(scenarios())
def test_planning_is_deterministic(scenario: tuple[VramNeed, list[DeviceSnapshot]]) -> None:
    need, devices = scenario
    outcomes = []
    for _ in range(2):
        try:
            outcomes.append(SplitPlan.compute(devices, need).to_json())
        except InsufficientVram as err:
            outcomes.append(str(err))
    assert outcomes[0] == outcomes[1]


@PROPERTY_SETTINGS
@given(scenarios(max_devices=1))
def test_single_device_is_never_split_and_fits_iff_the_total_fits(
    scenario: tuple[VramNeed, list[DeviceSnapshot]],
) -> None:
    need, devices = scenario
    fits = need.total_bytes <= devices[0].vram_free_bytes
    try:
        plan = SplitPlan.compute(devices, need)
    except InsufficientVram as err:
        assert not fits
        assert f"{devices[0].vram_free_bytes / GIB:.2f} GiB free" in str(err)
        return
    assert fits
    assert plan.ratios == [1.0]
    assert plan.to_tensor_split_flags() == []
    assert plan.per_device_bytes == [need.total_bytes - need.headroom_bytes]


def _any_placement_fits(need: VramNeed, devices: list[DeviceSnapshot]) -> bool:
    units = need.n_gpu_layers
    for cuts in itertools.combinations_with_replacement(range(units + 1), len(devices) - 1):
        counts = [b - a for a, b in zip((0, *cuts), (*cuts, units), strict=True)]
        placed = _bytes_as_llama_cpp_places(need, counts, split=True)
        if all(b + need.headroom_bytes <= d.vram_free_bytes for (b, _, _), d in zip(placed, devices, strict=True)):
            return True
    return False


@settings(max_examples=200, deadline=None)
@given(scenarios(min_devices=2, max_devices=3, max_gib=24, max_layers=12))
def test_split_is_refused_only_when_no_whole_layer_placement_fits(
    scenario: tuple[VramNeed, list[DeviceSnapshot]],
) -> None:
    need, devices = scenario
    try:
        SplitPlan.compute(devices, need)
        planned = True
    except InsufficientVram:
        planned = False
    event("planned" if planned else "refused")
    assert planned == _any_placement_fits(need, devices)
