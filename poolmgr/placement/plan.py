"""`poolmgr plan`: estimate a model's VRAM need, plan its split over a device mask, and render both."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from poolmgr.devices import DeviceSnapshot
from poolmgr.placement.hetero_split import SplitPlan, engine_gpu_flags, format_bytes
from poolmgr.placement.vram import (
    DEFAULT_CUDA_OVERHEAD_BYTES,
    DEFAULT_HEADROOM_BYTES,
    DEFAULT_N_UBATCH,
    VramNeed,
    estimate_vram,
)

__all__ = ["make_plan", "plan_json", "plan_table"]

_PART_LABELS = {
    "layer_weights": "layer weights",
    "output_weights": "output weights",
    "kv_cache": "KV cache",
    "compute_buffer": "compute buffer",
    "cuda_context": "CUDA context",
    "headroom": "headroom",
}


def make_plan(
    model_path: str | os.PathLike[str],
    devices: Sequence[DeviceSnapshot],
    ctx_size: int,
    slots: int = 1,
    *,
    n_gpu_layers: int | None = None,
    tensor_split: Sequence[float] | None = None,
    cuda_overhead_bytes: int = DEFAULT_CUDA_OVERHEAD_BYTES,
    headroom_bytes: int = DEFAULT_HEADROOM_BYTES,
    n_ubatch: int = DEFAULT_N_UBATCH,
    kv_unified: bool = False,
) -> tuple[VramNeed, SplitPlan]:
    """Estimate the need from the GGUF header and plan it over `devices` (in CUDA order).

    With `tensor_split` the user's ratios are validated instead of computed. Raises `InsufficientVram`
    (does not fit), `ConfigError` (bad model file or arguments) or `DeviceError` (bad device list)."""
    need = estimate_vram(
        model_path,
        ctx_size=ctx_size,
        slots=slots,
        n_gpu_layers=n_gpu_layers,
        cuda_overhead_bytes=cuda_overhead_bytes,
        headroom_bytes=headroom_bytes,
        n_ubatch=n_ubatch,
        kv_unified=kv_unified,
    )
    if tensor_split is not None:
        return need, SplitPlan.validate_explicit(devices, need, tensor_split)
    return need, SplitPlan.compute(devices, need)


def _device_rows(plan: SplitPlan) -> list[dict[str, Any]]:
    rows = []
    for i, uuid in enumerate(plan.device_uuids):
        rows.append(
            {
                "uuid": uuid,
                "free_bytes": plan.free_bytes[i],
                "usable_bytes": plan.usable_bytes[i],
                "planned_bytes": plan.per_device_bytes[i],
                "left_bytes": plan.free_bytes[i] - plan.per_device_bytes[i],
                "layers": plan.layers_per_device[i],
                "output_layer": plan.output_device == i,
                "ratio": plan.ratios[i],
            }
        )
    return rows


def plan_json(need: VramNeed, plan: SplitPlan) -> dict[str, Any]:
    """The `poolmgr plan --json` document."""
    return {
        "model": need.model_path,
        "n_layer": need.n_layer,
        "n_gpu_layers": need.n_gpu_layers,
        "ctx_size": need.ctx_size,
        "slots": need.slots,
        "ctx_per_slot": need.n_ctx_seq,
        "need": {
            "parts": dict(need.breakdown()),
            "total_bytes": need.total_bytes,
            "host_bytes": need.host_bytes,
        },
        "devices": _device_rows(plan),
        "plan": plan.to_dict(),
        "flags": engine_gpu_flags(plan, need.n_layer, n_gpu_layers=need.n_gpu_layers),
    }


def plan_table(need: VramNeed, plan: SplitPlan) -> str:
    """The human form of `poolmgr plan`."""
    parts = ", ".join(f"{_PART_LABELS[name]} {format_bytes(size)}" for name, size in need.breakdown())
    lines = [
        f"model   {need.model_path or '(header)'}: {need.n_layer} layers, {need.n_gpu_layers} offloaded units, "
        f"context {need.ctx_size} = {need.slots} slot(s) x {need.n_ctx_seq}",
        f"need    {parts}",
        f"        = {format_bytes(need.total_bytes)} on one device; host memory {format_bytes(need.host_bytes)}",
        "",
        f"{'DEVICE':<42} {'FREE':>11} {'PLANNED':>11} {'LEFT':>11} {'LAYERS':>7} {'RATIO':>9}",
    ]
    for row in _device_rows(plan):
        layers = f"{row['layers']}{'+out' if row['output_layer'] else ''}"
        lines.append(
            f"{row['uuid']:<42} {format_bytes(row['free_bytes']):>11} {format_bytes(row['planned_bytes']):>11} "
            f"{format_bytes(row['left_bytes']):>11} {layers:>7} {row['ratio']:>9.6f}"
        )
    lines += ["", "flags   " + " ".join(engine_gpu_flags(plan, need.n_layer, n_gpu_layers=need.n_gpu_layers))]
    return "\n".join(lines) + "\n"
