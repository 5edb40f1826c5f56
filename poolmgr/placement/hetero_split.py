"""SplitPlan: how one engine's model is spread over the GPUs of its device mask (B-HETERO-001..006).

Each device can give the engine its free VRAM less poolmgr's headroom; that includes the engine's own CUDA
context, so its *usable* VRAM is free - CUDA context - headroom. `SplitPlan.compute` shares the layers out so
that every device is filled to about the same fraction of its usable VRAM (so the shares follow usable VRAM
after the costs each device pays whatever it holds, like its compute buffer), which also caps a small GPU's
share at what it can hold. The shares are whole layers placed the way llama.cpp places them (see
`_layer_split`), and the `--tensor-split` ratios are chosen so that llama.cpp reproduces exactly that
placement; the bytes of every device are then checked against its free VRAM. A single device is never split.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import accumulate
from typing import Any

from poolmgr.devices import DeviceSnapshot
from poolmgr.errors import ConfigError, DeviceError, InsufficientVram
from poolmgr.placement._layer_split import (
    format_ratios,
    layer_counts,
    normalise_ratios,
    parse_ratios,
    ratios_for_counts,
)
from poolmgr.placement.vram import GIB, SCHED_MAX_COPIES, VramNeed

__all__ = ["SplitPlan", "engine_gpu_flags", "format_bytes", "layer_room"]

log = logging.getLogger(__name__)

_PLAN_VERSION = 1
_LAMBDA_STEPS = 48  # bisection steps for the fill fraction; far finer than one layer of any real model


def format_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


class _Costs:
    """Bytes per device for a contiguous run of offloaded units (repeating layers, then the output layer)."""

    def __init__(self, need: VramNeed, n_devices: int) -> None:
        self.need = need
        self.n_units = need.n_gpu_layers
        # llama.cpp enables pipeline parallelism for several devices with everything offloaded
        self.copies = SCHED_MAX_COPIES if n_devices > 1 and need.n_gpu_layers > need.n_layer else 1
        self._prefix = [0, *accumulate(need.per_layer_bytes)]

    def layers(self, start: int, count: int) -> tuple[int, int, bool]:
        """(first layer, repeating layers, holds output) of units start..start+count-1."""
        lo = self.need.first_gpu_layer + start
        hi = lo + count
        return lo, max(min(hi, self.need.n_layer) - lo, 0), count > 0 and hi > self.need.n_layer

    def cost(self, start: int, count: int) -> int:
        lo, n_layers, has_output = self.layers(start, count)
        weights = self._prefix[lo + n_layers] - self._prefix[lo] if n_layers else 0
        return weights + self.need.device_extra_bytes(n_layers, has_output=has_output, pipeline_copies=self.copies)

    def per_device(self, counts: Sequence[int]) -> list[int]:
        starts = [0, *accumulate(counts)]
        return [self.cost(start, count) for start, count in zip(starts, counts, strict=False)]

    def most_units(self, start: int, limit: float) -> int:
        """The most units from `start` on whose cost beyond the CUDA context stays within `limit`."""
        overhead = self.need.cuda_overhead_bytes
        lo, hi = 0, self.n_units - start
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.cost(start, mid) - overhead <= limit:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def fill(self, usable: Sequence[int], fraction: float) -> list[int] | None:
        """Units per device when each takes all it can up to `fraction` of its usable VRAM, in device order."""
        counts: list[int] = []
        start = 0
        for i, room in enumerate(usable):
            limit = fraction * room
            if i == len(usable) - 1:
                count = self.n_units - start
                if self.cost(start, count) - self.need.cuda_overhead_bytes > limit:
                    return None
            else:
                count = self.most_units(start, limit)
            counts.append(count)
            start += count
        return counts


def _balanced_counts(costs: _Costs, usable: Sequence[int]) -> list[int] | None:
    """Units per device with the smallest common fill fraction; None when even full devices are too small.

    Exact about feasibility (greedy filling in device order is optimal for a contiguous placement), so it
    is the fallback when the proportional shares cannot be made to fit."""
    if min(usable) < 0 or costs.fill(usable, 1.0) is None:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(_LAMBDA_STEPS):
        mid = (lo + hi) / 2
        if costs.fill(usable, mid) is None:
            lo = mid
        else:
            hi = mid
    return costs.fill(usable, hi)


def _shares(n_units: int, weights: Sequence[int]) -> list[int]:
    """n_units split in proportion to weights, whole units by largest remainder (ties: lower index)."""
    total = sum(weights)
    if total <= 0:
        return [0] * len(weights)
    exact = [n_units * w / total for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[: n_units - sum(counts)]:
        counts[i] += 1
    return counts


def layer_room(need: VramNeed, usable: Sequence[int], pipeline_copies: int) -> list[int]:
    """Usable VRAM less the compute buffer that any device holding layers needs: the room for layers."""
    fixed = need.compute_bytes_for(has_layers=True, has_output=False, pipeline_copies=pipeline_copies)
    return [max(room - fixed, 0) for room in usable]


def _proportional_counts(costs: _Costs, usable: Sequence[int]) -> list[int] | None:
    """Units in proportion to each device's room for layers; a device that cannot hold its share is capped
    at what it can hold and the rest is shared out again among the others. None if that does not fit."""
    room = layer_room(costs.need, usable, costs.copies)
    capped: dict[int, int] = {}
    while len(capped) < len(usable):
        open_devices = [i for i in range(len(usable)) if i not in capped]
        shares = _shares(costs.n_units - sum(capped.values()), [room[i] for i in open_devices])
        counts = [capped.get(i, 0) for i in range(len(usable))]
        for i, share in zip(open_devices, shares, strict=True):
            counts[i] = share
        starts = [0, *accumulate(counts)]
        over = [
            i for i in open_devices if costs.cost(starts[i], counts[i]) - costs.need.cuda_overhead_bytes > usable[i]
        ]
        if not over:
            return counts
        for i in over:
            capped[i] = min(costs.most_units(starts[i], usable[i]), counts[i] - 1)
    return None


def _plan_counts(costs: _Costs, usable: Sequence[int]) -> list[int] | None:
    if min(usable) < 0:
        return None
    counts = _proportional_counts(costs, usable)
    if counts is not None:
        starts = [0, *accumulate(counts)]
        extra = [costs.cost(a, c) - costs.need.cuda_overhead_bytes for a, c in zip(starts, counts, strict=False)]
        if sum(counts) == costs.n_units and all(e <= u for e, u in zip(extra, usable, strict=True)):
            return counts
    return _balanced_counts(costs, usable)


def _label(device: DeviceSnapshot) -> str:
    return f"{device.uuid} ({device.name})"


def _too_small_message(devices: Sequence[DeviceSnapshot], need: VramNeed, costs: _Costs) -> str:
    n = len(devices)
    attention = need.compute_bytes_for(has_layers=True, has_output=False, pipeline_copies=costs.copies)
    needed = (
        need.weights_bytes
        + need.kv_bytes
        + need.logits_bytes
        + n * (attention + need.cuda_overhead_bytes + need.headroom_bytes)
    )
    have = "; ".join(
        f"{_label(d)}: {format_bytes(d.vram_free_bytes)} free, "
        f"{format_bytes(d.vram_free_bytes - need.cuda_overhead_bytes - need.headroom_bytes)} usable"
        for d in devices
    )
    return (
        f"model {need.model_path or '(header)'} does not fit {n} devices: it needs about "
        f"{format_bytes(needed)} in all (weights {format_bytes(need.weights_bytes)}, KV cache "
        f"{format_bytes(need.kv_bytes)}, and per device a compute buffer of {format_bytes(attention)}, "
        f"CUDA context {format_bytes(need.cuda_overhead_bytes)}, headroom {format_bytes(need.headroom_bytes)}); "
        f"there is {format_bytes(sum(d.vram_free_bytes for d in devices))} free: {have}"
    )


def _overfill_message(devices: Sequence[DeviceSnapshot], need: VramNeed, per_device: Sequence[int]) -> str:
    parts = []
    for device, used in zip(devices, per_device, strict=True):
        room = device.vram_free_bytes - need.headroom_bytes
        verdict = f"over by {format_bytes(used - room)}" if used > room else "fits"
        parts.append(
            f"{_label(device)} needs {format_bytes(used)} + {format_bytes(need.headroom_bytes)} headroom, "
            f"has {format_bytes(device.vram_free_bytes)} free ({verdict})"
        )
    return f"model {need.model_path or '(header)'} does not fit: " + "; ".join(parts)


def _check_devices(devices: Sequence[DeviceSnapshot]) -> list[DeviceSnapshot]:
    devs = list(devices)
    if not devs:
        raise DeviceError("a split plan needs at least one device")
    if len({d.uuid for d in devs}) != len(devs):
        raise DeviceError("a device appears twice in the mask: " + ", ".join(d.uuid for d in devs))
    if len(devs) > 1 and any(d.is_mig for d in devs):
        raise DeviceError("a CUDA process can use only one MIG instance; it cannot be split with other devices")
    return devs


@dataclass(frozen=True)
class SplitPlan:
    """Where the layers of one engine go; device order is the CUDA order (CUDA_VISIBLE_DEVICES)."""

    device_uuids: list[str]
    ratios: list[float]  # --tensor-split values, summing to 1.0
    per_device_bytes: list[int]  # what the engine allocates on each device, CUDA context included
    layers_per_device: list[int]  # repeating layers (blk.N) on each device
    output_device: int | None  # index of the device holding the output layer (None: all on the CPU)
    free_bytes: list[int]  # free VRAM of each device when planned
    cuda_overhead_bytes: int
    headroom_bytes: int
    explicit: bool = False  # ratios given by the user rather than computed

    @property
    def is_split(self) -> bool:
        return len(self.device_uuids) > 1

    @property
    def usable_bytes(self) -> list[int]:
        """Free VRAM less the engine's CUDA context and poolmgr's headroom, per device."""
        return [free - self.cuda_overhead_bytes - self.headroom_bytes for free in self.free_bytes]

    @classmethod
    def compute(
        cls,
        devices: Sequence[DeviceSnapshot],
        need: VramNeed,
        *,
        cuda_overhead_bytes: int | None = None,
        headroom_bytes: int | None = None,
    ) -> SplitPlan:
        """Plan the split of `need` over `devices`; raises `InsufficientVram` when it cannot fit.

        `cuda_overhead_bytes` / `headroom_bytes` default to the ones `need` was estimated with."""
        devs = _check_devices(devices)
        need = need.with_margins(cuda_overhead_bytes=cuda_overhead_bytes, headroom_bytes=headroom_bytes)
        costs = _Costs(need, len(devs))
        if len(devs) == 1:
            return cls._build(devs, need, costs, [costs.n_units], [1.0], explicit=False)
        if costs.n_units == 0:
            raise ConfigError("n_gpu_layers=0 leaves nothing to split over several devices")
        usable = [d.vram_free_bytes - need.cuda_overhead_bytes - need.headroom_bytes for d in devs]
        counts = _plan_counts(costs, usable)
        if counts is None:
            raise InsufficientVram(_too_small_message(devs, need, costs))
        plan = cls._build(devs, need, costs, counts, ratios_for_counts(counts), explicit=False)
        for uuid, count in zip(plan.device_uuids, counts, strict=True):
            if count == 0:
                log.info("device %s gets no layers in this plan (it still holds a CUDA context)", uuid)
        log.debug(
            "split plan: devices=%s ratios=%s layers=%s bytes=%s",
            plan.device_uuids,
            plan.ratios,
            plan.layers_per_device,
            plan.per_device_bytes,
        )
        return plan

    @classmethod
    def validate_explicit(
        cls, devices: Sequence[DeviceSnapshot], need: VramNeed, tensor_split: Sequence[float]
    ) -> SplitPlan:
        """Check a user's tensor_split against the devices the way llama.cpp would place it."""
        devs = _check_devices(devices)
        values = [float(v) for v in tensor_split]
        if len(values) != len(devs):
            raise ConfigError(f"tensor_split has {len(values)} values for {len(devs)} devices")
        if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
            raise ConfigError(f"tensor_split {values}: values must be finite, >= 0, and not all 0")
        costs = _Costs(need, len(devs))
        if len(devs) == 1:
            return cls._build(devs, need, costs, [costs.n_units], [1.0], explicit=True)
        ratios = normalise_ratios(values)
        counts = layer_counts(parse_ratios(format_ratios(ratios)), costs.n_units)
        return cls._build(devs, need, costs, counts, ratios, explicit=True)

    @classmethod
    def _build(
        cls,
        devs: list[DeviceSnapshot],
        need: VramNeed,
        costs: _Costs,
        counts: list[int],
        ratios: list[float],
        *,
        explicit: bool,
    ) -> SplitPlan:
        if len(devs) > 1 and layer_counts(parse_ratios(format_ratios(ratios)), costs.n_units) != counts:
            raise RuntimeError(f"tensor_split {ratios} does not reproduce the planned layers {counts}")
        per_device = costs.per_device(counts)
        if any(used > d.vram_free_bytes - need.headroom_bytes for d, used in zip(devs, per_device, strict=True)):
            raise InsufficientVram(_overfill_message(devs, need, per_device))
        starts = [0, *accumulate(counts)]
        placed = [costs.layers(start, count) for start, count in zip(starts, counts, strict=False)]
        output = next((i for i, (_, _, has_output) in enumerate(placed) if has_output), None)
        return cls(
            device_uuids=[d.uuid for d in devs],
            ratios=ratios,
            per_device_bytes=per_device,
            layers_per_device=[n_layers for _, n_layers, _ in placed],
            output_device=output,
            free_bytes=[d.vram_free_bytes for d in devs],
            cuda_overhead_bytes=need.cuda_overhead_bytes,
            headroom_bytes=need.headroom_bytes,
            explicit=explicit,
        )

    def to_tensor_split_flags(self) -> list[str]:
        """llama-server flags for the split; none for a single device."""
        if not self.is_split:
            return []
        return ["--tensor-split", format_ratios(self.ratios), "--split-mode", "layer", "--main-gpu", "0"]

    def to_dict(self) -> dict[str, Any]:
        return {"version": _PLAN_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SplitPlan:
        """Inverse of `to_dict`; raises `ValueError` on data that is not a stored plan."""
        if data.get("version") != _PLAN_VERSION:
            raise ValueError(f"unknown split plan version {data.get('version')!r}")
        try:
            uuids = [str(u) for u in data["device_uuids"]]
            ratios = [float(r) for r in data["ratios"]]
            per_device = [int(b) for b in data["per_device_bytes"]]
            layers = [int(n) for n in data["layers_per_device"]]
            free = [int(b) for b in data["free_bytes"]]
            output = data["output_device"]
            plan = cls(
                device_uuids=uuids,
                ratios=ratios,
                per_device_bytes=per_device,
                layers_per_device=layers,
                output_device=None if output is None else int(output),
                free_bytes=free,
                cuda_overhead_bytes=int(data["cuda_overhead_bytes"]),
                headroom_bytes=int(data["headroom_bytes"]),
                explicit=bool(data.get("explicit", False)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a split plan: {exc!r}") from exc
        if not uuids or len({len(uuids), len(ratios), len(per_device), len(layers), len(free)}) != 1:
            raise ValueError("split plan lists must be non-empty and of equal length")
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SplitPlan:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a split plan is a JSON object")
        return cls.from_dict(data)


def engine_gpu_flags(plan: SplitPlan, n_layer: int, *, n_gpu_layers: int | None = None) -> list[str]:
    """llama-server GPU flags for a plan: every layer offloaded (unless told), `--fit off` so the plan that
    runs is poolmgr's, then the split flags."""
    layers = n_layer + 1 if n_gpu_layers is None else n_gpu_layers
    return ["--n-gpu-layers", str(layers), "--fit", "off", *plan.to_tensor_split_flags()]
