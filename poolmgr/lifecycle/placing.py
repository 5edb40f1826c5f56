"""Placement of one pool before its engine starts: device mask → devices, exclusivity, VRAM fit, split plan.

CPU pools need nothing. GPU pools are placed on discovered devices only (never a mask passed through
unchecked), and a model that cannot fit is refused here, before anything is spawned (OC-POOL-3002).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from poolmgr.devices import (
    DeviceMask,
    DeviceSnapshot,
    Inventory,
    check_exclusive,
    descendant_pids,
    engine_env,
    engine_on_gpus,
    find_foreign_gpus,
)
from poolmgr.errors import DeviceError, InsufficientVram, PoolmgrError, PreloadFailed
from poolmgr.placement import engine_gpu_flags, make_plan
from poolmgr.poolsfile import PoolSpec


@dataclass(frozen=True)
class Placement:
    env: dict[str, str]
    gpu_flags: list[str] = field(default_factory=list)
    device_uuids: list[str] = field(default_factory=list)
    split_plan: dict[str, Any] | None = None
    vram_total_bytes: int | None = None
    vram_free_bytes: int | None = None
    compute_capability: str | None = None


CPU_PLACEMENT = Placement(env={"CUDA_VISIBLE_DEVICES": ""})


def place(
    spec: PoolSpec,
    inventory: Inventory,
    *,
    others: Sequence[tuple[str, str, bool]] = (),
    cuda_overhead_bytes: int | None = None,
    headroom_bytes: int | None = None,
) -> Placement:
    """Where and how `spec` runs. `others`: (pool_id, device_mask, share_devices) of this node's other pools
    that hold devices now. Raises PreloadFailed with reason no_gpu / device_mask / mask_overlap /
    insufficient_vram / bad_model."""
    if spec.is_cpu:
        return CPU_PLACEMENT
    if not inventory.available or not inventory.devices:
        raise PreloadFailed("no_gpu", f"no GPU available for GPU pool {spec.id!r}: {inventory.reason or 'none found'}")
    devices = inventory.devices
    try:
        mask = DeviceMask.parse(spec.device_mask)
        chosen = mask.resolve(devices)
    except DeviceError as exc:
        raise PreloadFailed("device_mask", f"pool {spec.id!r}: {exc}") from None
    _check_overlap(spec, mask, devices, others)
    kwargs: dict[str, Any] = {}
    if cuda_overhead_bytes is not None:
        kwargs["cuda_overhead_bytes"] = cuda_overhead_bytes
    if headroom_bytes is not None:
        kwargs["headroom_bytes"] = headroom_bytes
    try:
        need, plan = make_plan(spec.model, chosen, spec.ctx_size, spec.slots, tensor_split=spec.tensor_split, **kwargs)
    except InsufficientVram as exc:
        raise PreloadFailed("insufficient_vram", str(exc)) from None
    except PoolmgrError as exc:
        raise PreloadFailed("bad_model", f"pool {spec.id!r}: {exc}") from None
    first = chosen[0]
    return Placement(
        env=engine_env(mask, devices),
        gpu_flags=engine_gpu_flags(plan, need.n_layer),
        device_uuids=[d.uuid for d in chosen],
        split_plan=plan.to_dict(),
        vram_total_bytes=sum(d.vram_total_bytes for d in chosen),
        vram_free_bytes=sum(d.vram_free_bytes for d in chosen),
        compute_capability=f"{first.compute_capability[0]}.{first.compute_capability[1]}",
    )


def _check_overlap(
    spec: PoolSpec, mask: DeviceMask, devices: Sequence[DeviceSnapshot], others: Sequence[tuple[str, str, bool]]
) -> None:
    masks: list[tuple[str, DeviceMask, bool]] = [(spec.id, mask, spec.share_devices)]
    for pool_id, text, share in others:
        if pool_id == spec.id or text.strip().lower() == "cpu":
            continue
        try:
            masks.append((pool_id, DeviceMask.parse(text), share))
        except DeviceError:
            continue
    try:
        check_exclusive(masks, devices)
    except DeviceError as exc:
        raise PreloadFailed("mask_overlap", str(exc)) from None


def gpu_problem(
    view_spec: PoolSpec, device_uuids: Sequence[str], pid: int, inventory: Inventory
) -> PreloadFailed | None:
    """What NVML says is wrong with a running GPU engine, if anything (B-DEVICE-010/011, OC-POOL-3012):
    one of its devices lost (driver_error), the engine or a child on a GPU outside its mask (gpu_spillover), or
    the engine on none of its GPUs at all (cpu_spillover). CPU pools: only a GPU they touch is a problem."""
    pids = {pid} | descendant_pids(pid)
    if not view_spec.is_cpu:
        if not inventory.available:
            return PreloadFailed("driver_error", f"NVML unavailable: {inventory.reason or 'unknown error'}")
        present = {d.uuid for d in inventory.devices}
        lost = [u for u in device_uuids if u not in present]
        if lost:
            return PreloadFailed("driver_error", f"GPU lost: {', '.join(lost)} no longer answers NVML")
    foreign = find_foreign_gpus(pids, device_uuids, inventory.devices)
    if foreign:
        where = ", ".join(f"pid {p} on {u}" for p, u in foreign)
        return PreloadFailed("gpu_spillover", f"engine outside its device mask: {where}")
    if not view_spec.is_cpu and not engine_on_gpus(pids, device_uuids, inventory.devices):
        return PreloadFailed(
            "cpu_spillover",
            f"NVML lists engine pid {pid} on none of its GPUs ({', '.join(device_uuids)}): CPU fallback",
        )
    return None


__all__ = ["CPU_PLACEMENT", "Placement", "gpu_problem", "place"]
