"""estimate_vram against what a CUDA llama-server b11434 really used on an H200 (vram-table.json)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from poolmgr.engines.tiny_model import write_tiny_model
from poolmgr.errors import ConfigError
from poolmgr.placement import (
    VramNeed,
    effective_context,
    estimate_vram,
    estimate_vram_from_header,
    read_model_header,
)

from ._helpers import LLAMA_7B, LLAMA_70B, MIB, VRAM_FIXTURES, VRAM_TABLE, device_bytes, llama_header, load_json

TABLE = load_json(VRAM_TABLE)
READY_RUNS = [run for run in TABLE["runs"] if "nvml_used_mib" in run]
FAILED_RUNS = [run for run in TABLE["runs"] if run.get("exited")]


def _model_args(name: str) -> dict[str, int]:
    """write_tiny_model arguments for a model the table describes ("8 layers, ... ctx_train 134,217,728")."""
    text = TABLE["models"][name]
    layers = re.search(r"(\d+) layers", text)
    ctx = re.search(r"ctx_train ([\d,]+)", text)
    return {
        "n_layer": int(layers.group(1)) if layers else 0,
        "ctx": int(ctx.group(1).replace(",", "")) if ctx else 2048,
    }


def _logged_mib(run: dict[str, Any], pattern: str) -> float:
    for line in run["buffer_lines"]:
        found = re.search(pattern + r"\s*=\s*([\d.]+) MiB", line)
        if found:
            return float(found.group(1))
    raise AssertionError(f"no {pattern!r} line in {run['buffer_lines']}")


@pytest.fixture(scope="module")
def table_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {name: write_tiny_model(folder / f"{name}.gguf", **_model_args(name)) for name in TABLE["models"]}


def _estimate(models: dict[str, Path], run: dict[str, Any]) -> VramNeed:
    return estimate_vram(models[run["model"]], ctx_size=run["ctx"], slots=run["parallel"], headroom_bytes=0)


def _run_id(run: dict[str, Any]) -> str:
    return f"{run['model']}-c{run['ctx']}-np{run['parallel']}"


@pytest.mark.parametrize("run", READY_RUNS, ids=_run_id)
def test_estimate_is_within_ten_percent_of_nvml_for_every_ready_run(
    table_models: dict[str, Path], run: dict[str, Any]
) -> None:
    need = _estimate(table_models, run)
    measured = run["nvml_used_mib"] * MIB
    assert abs(need.total_bytes - measured) <= 0.10 * measured, (need.breakdown(), measured)


@pytest.mark.parametrize("run", READY_RUNS, ids=_run_id)
def test_kv_weights_and_compute_match_the_buffers_llama_cpp_logged(
    table_models: dict[str, Path], run: dict[str, Any]
) -> None:
    need = _estimate(table_models, run)
    assert need.kv_bytes / MIB == pytest.approx(_logged_mib(run, "CUDA0 KV buffer size"), abs=0.00501)
    assert need.weights_bytes / MIB == pytest.approx(_logged_mib(run, "CUDA0 model buffer size"), abs=0.00501)
    logged_compute = _logged_mib(run, "CUDA0 compute buffer size")
    assert need.compute_bytes / MIB == pytest.approx(logged_compute, abs=0.15)
    assert need.compute_bytes / MIB >= logged_compute - 0.005  # never under (logged: 2 decimals)


def test_compute_buffer_grows_with_the_context_per_slot_not_the_total(table_models: dict[str, Path]) -> None:
    model = table_models["long"]
    one_slot = estimate_vram(model, ctx_size=4 * 1048576, slots=1)
    four_slots = estimate_vram(model, ctx_size=4 * 1048576, slots=4)
    one_million = estimate_vram(model, ctx_size=1048576, slots=1)
    assert four_slots.kv_bytes == one_slot.kv_bytes  # KV follows the total
    assert four_slots.n_ctx_seq == one_million.n_ctx_seq == 1048576
    assert four_slots.compute_bytes < one_slot.compute_bytes / 3
    assert one_million.compute_bytes < four_slots.compute_bytes < 1.05 * one_million.compute_bytes


def test_weights_and_kv_alone_would_miss_tens_of_gib(table_models: dict[str, Path]) -> None:
    run = max(READY_RUNS, key=lambda r: r["nvml_used_mib"])
    need = _estimate(table_models, run)
    without_compute = need.weights_bytes + need.kv_bytes + need.cuda_overhead_bytes
    assert run["nvml_used_mib"] * MIB - without_compute > 30 * 1024 * MIB


@pytest.mark.parametrize("run", FAILED_RUNS, ids=_run_id)
def test_runs_that_failed_with_oom_are_estimated_above_the_gpu(
    table_models: dict[str, Path], run: dict[str, Any]
) -> None:
    need = _estimate(table_models, run)
    assert need.total_bytes > TABLE["total_mib"] * MIB


def test_compute_estimate_matches_the_failed_cuda_allocation_of_the_oom_probe(table_models: dict[str, Path]) -> None:
    # the OOM probe ran the long model (the only one that accepts -c 134217728 = its ctx_train)
    probe = load_json(VRAM_FIXTURES / "h200-probe.json")["oom_fit_off"]
    ctx = int(re.search(r"-c (\d+)", probe["cmd"]).group(1))  # type: ignore[union-attr]
    assert ctx == _model_args("long")["ctx"]
    failed = next(
        int(m.group(1))
        for line in probe["stderr_gpu_lines"]
        if (m := re.search(r"failed to allocate CUDA0 buffer of size (\d+)", line))
    )
    need = estimate_vram(table_models["long"], ctx_size=ctx, slots=1)
    assert need.compute_bytes == pytest.approx(failed, rel=1e-6)


def test_breakdown_parts_sum_to_the_total() -> None:
    need = estimate_vram_from_header(llama_header(**LLAMA_7B), ctx_size=4096, slots=2)
    parts = dict(need.breakdown())
    assert sum(parts.values()) == need.total_bytes
    assert parts["cuda_context"] == need.cuda_overhead_bytes
    assert parts["headroom"] == need.headroom_bytes
    assert parts["kv_cache"] == 4096 * 32 * 2 * 4096 * 2  # cells x layers x (K+V) x n_embd_kv x f16


def test_single_device_bytes_are_the_total_less_headroom() -> None:
    need = estimate_vram_from_header(llama_header(**LLAMA_70B), ctx_size=8192, slots=1)
    on_one = device_bytes(need, 0, need.n_layer, has_output=True)
    assert on_one == need.total_bytes - need.headroom_bytes


def test_seventy_b_at_8k_needs_about_forty_gib() -> None:
    need = estimate_vram_from_header(llama_header(**LLAMA_70B), ctx_size=8192, slots=1)
    assert 36 * 1024 * MIB < need.weights_bytes < 38 * 1024 * MIB
    assert need.kv_bytes == 8192 * 80 * 2 * 1024 * 2  # GQA: 8 KV heads of 128
    assert 39 * 1024 * MIB < need.total_bytes < 43 * 1024 * MIB


def test_partial_offload_keeps_the_first_layers_and_their_kv_on_the_host() -> None:
    header = llama_header(**LLAMA_7B)
    full = estimate_vram_from_header(header, ctx_size=4096)
    part = estimate_vram_from_header(header, ctx_size=4096, n_gpu_layers=11)  # 10 layers + output
    assert part.gpu_layer_count == 10 and part.first_gpu_layer == 22 and part.output_on_gpu
    assert part.kv_bytes == full.kv_bytes_per_layer * 10
    assert part.weights_bytes == sum(header.layer_bytes[22:]) + header.output_bytes
    assert part.host_bytes == full.host_bytes + sum(header.layer_bytes[:22]) + 22 * full.kv_bytes_per_layer
    assert estimate_vram_from_header(header, ctx_size=4096, n_gpu_layers=999).n_gpu_layers == 33


def test_context_is_padded_like_llama_cpp() -> None:
    assert effective_context(2048, 4) == (2048, 512)
    assert effective_context(1000, 1) == (1024, 1024)
    assert effective_context(1000, 3) == (1 * 256 * 3 * 2, 512)  # 1024 / 3 = 341 -> 512 per slot
    assert effective_context(0, 1, n_ctx_train=2048) == (2048, 2048)
    assert effective_context(2048, 4, kv_unified=True) == (2048, 2048)


def test_unified_kv_cache_makes_every_slots_attention_span_the_whole_context() -> None:
    # llama-server without --parallel: 4 slots, kv_unified = true (seen in the CPU build's log here)
    header = llama_header(**LLAMA_7B)
    split = estimate_vram_from_header(header, ctx_size=32768, slots=4)
    unified = estimate_vram_from_header(header, ctx_size=32768, slots=4, kv_unified=True)
    assert unified.kv_bytes == split.kv_bytes
    assert unified.n_ctx_seq == 4 * split.n_ctx_seq == 32768
    assert unified.kq_bytes == 4 * split.kq_bytes


def test_bad_arguments_raise_config_errors(tmp_path: Path) -> None:
    header = read_model_header(write_tiny_model(tmp_path / "tiny.gguf"))
    with pytest.raises(ConfigError, match="slots"):
        estimate_vram_from_header(header, ctx_size=512, slots=0)
    with pytest.raises(ConfigError, match="ctx_size"):
        estimate_vram_from_header(header, ctx_size=-1)
    with pytest.raises(ConfigError, match="must not be negative"):
        estimate_vram_from_header(header, ctx_size=512, headroom_bytes=-1)
    with pytest.raises(ConfigError, match="n_ubatch"):
        estimate_vram_from_header(header, ctx_size=512, n_ubatch=0)
