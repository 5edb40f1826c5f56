"""discover(backend) -> Inventory: one NVML pass over every GPU and MIG instance.

NVML is slow work by the project's rules (≈16 ms per GPU for every field): callers on the event loop run
`discover` in a thread. A host without the driver gives an empty, unavailable inventory, never an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pynvml

from poolmgr.devices._backend import Handle, MemoryInfo, NvmlBackend, RealNvmlBackend
from poolmgr.devices._fake import FakeNvmlBackend
from poolmgr.devices._nvml_errors import NO_DRIVER_CODES, describe, is_driver_error
from poolmgr.devices._snapshot import DeviceSnapshot
from poolmgr.errors import ConfigError

logger = logging.getLogger("poolmgr.devices")

MIG_INDEX_BASE = 1000  # a MIG instance's index is parent_index * 1000 + slot, for ordering only
_T = TypeVar("_T")


@dataclass(frozen=True)
class Inventory:
    devices: list[DeviceSnapshot] = field(default_factory=list)
    driver_version: str | None = None
    available: bool = False
    reason: str | None = None  # why NVML is unavailable, when it is
    problems: list[str] = field(default_factory=list)  # devices skipped, one line each

    @property
    def placeable(self) -> list[DeviceSnapshot]:
        """Devices an engine can be given: whole GPUs without MIG, and MIG instances."""
        return [d for d in self.devices if not d.mig_enabled]

    def by_uuid(self, uuid: str) -> DeviceSnapshot | None:
        return next((d for d in self.devices if d.uuid == uuid), None)

    def vanished_since(self, previous: Inventory) -> list[str]:
        """UUIDs seen in `previous` and missing now (a lost GPU, a driver reset)."""
        now = {d.uuid for d in self.devices}
        return [d.uuid for d in previous.devices if d.uuid not in now]


def discover(backend: NvmlBackend, *, warn: bool = True) -> Inventory:
    """Read every device. `warn=False` logs the no-driver line at DEBUG (for periodic refreshes)."""
    try:
        backend.init()
    except pynvml.NVMLError as exc:
        return _unavailable(exc, warn=warn)
    try:
        return _read_all(backend)
    except pynvml.NVMLError as exc:
        return _unavailable(exc, warn=warn)
    finally:
        try:
            backend.shutdown()
        except pynvml.NVMLError as exc:
            logger.debug("nvmlShutdown failed: %s", describe(exc))


def _unavailable(exc: pynvml.NVMLError, *, warn: bool) -> Inventory:
    code = getattr(exc, "value", None)
    prefix = "no NVIDIA driver" if code in NO_DRIVER_CODES else "NVIDIA driver unusable"
    reason = f"{prefix}: {describe(exc)}"
    logger.log(logging.WARNING if warn else logging.DEBUG, "%s; GPU pools will not be placed, CPU pools run", reason)
    return Inventory(available=False, reason=reason)


def _read_all(backend: NvmlBackend) -> Inventory:
    driver = _optional(backend.driver_version, None)
    devices: list[DeviceSnapshot] = []
    problems: list[str] = []
    for index in range(backend.device_count()):
        try:
            devices.extend(_read_device(backend, index))
        except pynvml.NVMLError as exc:
            problem = f"GPU {index} skipped: {describe(exc)}"
            logger.warning("%s", problem)
            problems.append(problem)
    return Inventory(devices=devices, driver_version=driver, available=True, problems=problems)


def _optional(call: Callable[[], _T], default: _T) -> _T:
    """A field NVML may refuse (NotSupported, NoPermission): use the default. Driver errors propagate."""
    try:
        return call()
    except pynvml.NVMLError as exc:
        if is_driver_error(exc):
            raise
        return default


def _memory(backend: NvmlBackend, handle: Handle) -> MemoryInfo:
    # v2 separates the driver's reservation from `used`; older drivers and MIG instances answer v1 only.
    try:
        return backend.memory_info_v2(handle)
    except pynvml.NVMLError as exc:
        if is_driver_error(exc):
            raise
        return backend.memory_info_v1(handle)


def _snapshot(
    backend: NvmlBackend, handle: Handle, *, index: int, mig_enabled: bool, parent_uuid: str | None
) -> DeviceSnapshot:
    mem = _memory(backend, handle)
    no_procs: list[tuple[int, int]] = []
    procs = _optional(lambda: backend.compute_running_processes(handle), no_procs)
    return DeviceSnapshot(
        index=index,
        uuid=backend.uuid(handle),
        name=backend.name(handle),
        pci_bus_id=_optional(lambda: backend.pci_bus_id(handle), ""),
        compute_capability=_optional(lambda: backend.cuda_compute_capability(handle), (0, 0)),
        vram_total_bytes=mem.total,
        vram_free_bytes=mem.free,
        vram_reserved_bytes=mem.reserved,
        mig_enabled=mig_enabled,
        is_mig=parent_uuid is not None,
        parent_uuid=parent_uuid,
        processes=tuple(sorted(procs)),
    )


def _read_device(backend: NvmlBackend, index: int) -> list[DeviceSnapshot]:
    handle = backend.handle_by_index(index)
    mig_current, _pending = _optional(lambda: backend.mig_mode(handle), (0, 0))
    parent = _snapshot(backend, handle, index=index, mig_enabled=mig_current == 1, parent_uuid=None)
    found = [parent]
    if not parent.mig_enabled:
        return found
    for slot in range(_optional(lambda: backend.max_mig_device_count(handle), 0)):
        try:
            mig = backend.mig_device_handle_by_index(handle, slot)
        except pynvml.NVMLError_NotFound:
            continue  # an empty slot: no instance created there
        found.append(
            _snapshot(backend, mig, index=index * MIG_INDEX_BASE + slot, mig_enabled=False, parent_uuid=parent.uuid)
        )
    return found


def backend_from_env(fake_path: str) -> NvmlBackend:
    """The fake when `POOL_MANAGERD_FAKE_NVML` (PoolManagerConfig.fake_nvml) names a snapshot, else pynvml."""
    if not fake_path:
        return RealNvmlBackend()
    try:
        backend = FakeNvmlBackend(Path(fake_path))
    except OSError as exc:
        raise ConfigError(f"POOL_MANAGERD_FAKE_NVML={fake_path!r}: cannot read: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"POOL_MANAGERD_FAKE_NVML={fake_path!r}: not an NVML snapshot: {exc}") from None
    logger.info("using the fake NVML snapshot %s", fake_path)
    return backend


__all__ = ["MIG_INDEX_BASE", "Inventory", "backend_from_env", "discover"]
