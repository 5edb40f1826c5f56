"""DeviceMask: which GPUs a pool may use, parsed strictly and translated to UUIDs before any spawn.

CUDA takes `CUDA_VISIBLE_DEVICES` silently: on a one-GPU H100 "0,1" showed GPU 0 only, "1,0" and "GPU0"
showed no GPU at all (shared/fixtures/gpu/h100-80gb-hbm3/cuda-visible-devices-probe.json), and a CUDA engine
with no GPU falls back to the CPU without failing. So poolmgr never passes a mask through: it resolves every
id against the discovered devices and hands the engine their full UUIDs with `CUDA_DEVICE_ORDER=PCI_BUS_ID`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from poolmgr.devices._snapshot import DeviceSnapshot
from poolmgr.errors import DeviceError

_HEX_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_GPU_UUID = re.compile(rf"^GPU-{_HEX_UUID}$", re.IGNORECASE)
# MIG-<uuid> since driver R470; MIG-GPU-<uuid>/<gi>/<ci> before.
_MIG_UUID = re.compile(rf"^MIG-(?:{_HEX_UUID}|GPU-{_HEX_UUID}/\d+/\d+)$", re.IGNORECASE)
_UUID_PREFIX = re.compile(r"^(mig-gpu-|mig-|gpu-)")
_INDEX = re.compile(r"^(?:GPU)?(\d+)$", re.IGNORECASE)
_EXPECTED = "expected 'cpu', GPU indices such as '0,1' or 'GPU0,GPU1', or full GPU-/MIG- uuids"

Ref = int | str  # an NVML index or a full uuid


def _parse_ref(part: str, text: str) -> Ref:
    if _GPU_UUID.match(part) or _MIG_UUID.match(part):
        return _UUID_PREFIX.sub(lambda m: m.group(1).upper(), part.lower())
    m = _INDEX.match(part)
    if m:
        return int(m.group(1))
    if part.upper().startswith(("GPU-", "MIG-")):
        raise DeviceError(
            f"device mask {text!r}: {part!r} is not a full uuid (write all 32 hex digits as NVML prints them)"
        )
    raise DeviceError(f"device mask {text!r}: {part!r} is not a device id; {_EXPECTED}")


def _label(dev: DeviceSnapshot) -> str:
    if dev.is_mig:
        return f"{dev.uuid} (MIG on {dev.parent_uuid})"
    return f"{dev.index} = GPU{dev.index} = {dev.uuid}"


def _valid_ids(devices: Sequence[DeviceSnapshot]) -> str:
    usable = [_label(d) for d in devices if not d.mig_enabled]
    if not usable:
        return "no GPU was discovered on this host, only 'cpu' is valid"
    return "valid: cpu, " + ", ".join(usable)


@dataclass(frozen=True)
class DeviceMask:
    refs: tuple[Ref, ...]  # empty = cpu
    text: str = field(default="", compare=False)  # as written, for messages

    @classmethod
    def parse(cls, text: str) -> DeviceMask:
        stripped = text.strip()
        if not stripped:
            raise DeviceError(f"device mask {stripped!r}: empty; {_EXPECTED}")
        parts = [p.strip() for p in stripped.split(",")]
        if any(not p for p in parts):
            raise DeviceError(f"device mask {stripped!r}: empty entry between commas")
        cpu = [p for p in parts if p.lower() == "cpu"]
        if cpu and len(parts) > 1:
            raise DeviceError(f"device mask {stripped!r}: 'cpu' cannot be combined with GPUs or repeated")
        if cpu:
            return cls(refs=(), text=stripped)
        refs: list[Ref] = []
        for part in parts:
            ref = _parse_ref(part, stripped)
            if ref in refs:
                raise DeviceError(f"device mask {stripped!r}: {part!r} repeats a device already in the mask")
            refs.append(ref)
        return cls(refs=tuple(refs), text=stripped)

    @property
    def is_cpu(self) -> bool:
        return not self.refs

    def __str__(self) -> str:
        return "cpu" if self.is_cpu else ",".join(str(r) for r in self.refs)

    def _find(self, ref: Ref, devices: Sequence[DeviceSnapshot]) -> DeviceSnapshot:
        if isinstance(ref, int):
            found = next((d for d in devices if d.index == ref and not d.is_mig), None)
        else:
            found = next((d for d in devices if d.uuid.lower() == ref.lower()), None)
        if found is None:
            raise DeviceError(f"device mask {self.text!r}: unknown device {str(ref)!r}; {_valid_ids(devices)}")
        if found.mig_enabled:
            instances = ", ".join(d.uuid for d in devices if d.parent_uuid == found.uuid) or "none created"
            raise DeviceError(
                f"device mask {self.text!r}: GPU {found.index} ({found.uuid}) has MIG enabled; "
                f"use one of its MIG instances: {instances}"
            )
        return found

    def resolve(self, devices: Sequence[DeviceSnapshot]) -> list[DeviceSnapshot]:
        """The devices this mask names, in mask order; DeviceError naming the bad id and the valid ones."""
        resolved: list[DeviceSnapshot] = []
        for ref in self.refs:
            dev = self._find(ref, devices)
            if any(d.uuid == dev.uuid for d in resolved):
                raise DeviceError(f"device mask {self.text!r}: {dev.uuid} is named twice")
            resolved.append(dev)
        return resolved

    def validate_against(self, devices: Sequence[DeviceSnapshot]) -> None:
        self.resolve(devices)

    def uuids(self, devices: Sequence[DeviceSnapshot]) -> list[str]:
        return [d.uuid for d in self.resolve(devices)]

    def to_cuda_visible_devices(self, devices: Sequence[DeviceSnapshot]) -> str:
        """Full UUIDs, comma-joined ("" for cpu, which hides every GPU)."""
        return ",".join(self.uuids(devices))

    def canonical(self, devices: Sequence[DeviceSnapshot]) -> str:
        """The stable text stored in the registry: "cpu" or the UUIDs; it parses back to the same devices."""
        return "cpu" if self.is_cpu else self.to_cuda_visible_devices(devices)


def engine_env(mask: DeviceMask, devices: Sequence[DeviceSnapshot]) -> dict[str, str]:
    """Environment entries that pin an engine to its mask (merged over the engine's environment)."""
    if mask.is_cpu:
        return {"CUDA_VISIBLE_DEVICES": ""}
    return {"CUDA_VISIBLE_DEVICES": mask.to_cuda_visible_devices(devices), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def check_exclusive(masks: Sequence[tuple[str, DeviceMask, bool]], devices: Sequence[DeviceSnapshot]) -> None:
    """(pool_id, mask, share_devices) for each pool; two pools may use one device only if both share it."""
    users: dict[str, list[tuple[str, bool]]] = {}
    for pool_id, mask, share in masks:
        try:
            resolved = mask.resolve(devices)
        except DeviceError as exc:
            raise DeviceError(f"pool {pool_id!r}: {exc}") from None
        for dev in resolved:
            for other_id, other_share in users.get(dev.uuid, []):
                if not (share and other_share):
                    raise DeviceError(
                        f"pools {other_id!r} and {pool_id!r} both use {dev.uuid} (index {dev.index}); "
                        "set share_devices = true on both to share a device"
                    )
            users.setdefault(dev.uuid, []).append((pool_id, share))


__all__ = ["DeviceMask", "check_exclusive", "engine_env"]
