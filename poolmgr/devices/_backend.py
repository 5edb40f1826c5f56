"""The NVML seam: a small Protocol modelled on the pynvml calls poolmgr makes, and the real implementation.

Every method raises `pynvml.NVMLError` subclasses exactly as nvidia-ml-py does, so discovery handles the real
library and the recorded fake (`_fake.FakeNvmlBackend`) the same way. Handles are opaque.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import pynvml

Handle = Any


@dataclass(frozen=True)
class MemoryInfo:
    """Bytes. `reserved` is what the driver keeps for itself: only memory info v2 reports it (v1 adds it to
    `used`, ~480 MiB on an H100)."""

    total: int
    free: int
    used: int
    reserved: int = 0


class NvmlBackend(Protocol):
    def init(self) -> None: ...

    def shutdown(self) -> None: ...

    def driver_version(self) -> str: ...

    def device_count(self) -> int: ...

    def handle_by_index(self, index: int) -> Handle: ...

    def name(self, handle: Handle) -> str: ...

    def uuid(self, handle: Handle) -> str: ...

    def pci_bus_id(self, handle: Handle) -> str: ...

    def cuda_compute_capability(self, handle: Handle) -> tuple[int, int]: ...

    def memory_info_v2(self, handle: Handle) -> MemoryInfo: ...

    def memory_info_v1(self, handle: Handle) -> MemoryInfo: ...

    def mig_mode(self, handle: Handle) -> tuple[int, int]:
        """(current, pending); 1 = enabled."""
        ...

    def max_mig_device_count(self, handle: Handle) -> int: ...

    def mig_device_handle_by_index(self, handle: Handle, index: int) -> Handle:
        """Raises NVMLError_NotFound for an empty slot (or a GPU without MIG)."""
        ...

    def compute_running_processes(self, handle: Handle) -> list[tuple[int, int]]:
        """(pid, used bytes) of each compute process NVML attributes to this device."""
        ...


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RealNvmlBackend:
    """nvidia-ml-py. On a host without the driver `init()` raises NVMLError_LibraryNotFound (code 12)."""

    def init(self) -> None:
        pynvml.nvmlInit()

    def shutdown(self) -> None:
        pynvml.nvmlShutdown()

    def driver_version(self) -> str:
        return _text(pynvml.nvmlSystemGetDriverVersion())

    def device_count(self) -> int:
        return int(pynvml.nvmlDeviceGetCount())

    def handle_by_index(self, index: int) -> Handle:
        return pynvml.nvmlDeviceGetHandleByIndex(index)

    def name(self, handle: Handle) -> str:
        return _text(pynvml.nvmlDeviceGetName(handle))

    def uuid(self, handle: Handle) -> str:
        return _text(pynvml.nvmlDeviceGetUUID(handle))

    def pci_bus_id(self, handle: Handle) -> str:
        return _text(pynvml.nvmlDeviceGetPciInfo(handle).busId)

    def cuda_compute_capability(self, handle: Handle) -> tuple[int, int]:
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return int(major), int(minor)

    def memory_info_v2(self, handle: Handle) -> MemoryInfo:
        m = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
        return MemoryInfo(total=int(m.total), free=int(m.free), used=int(m.used), reserved=int(m.reserved))

    def memory_info_v1(self, handle: Handle) -> MemoryInfo:
        m = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return MemoryInfo(total=int(m.total), free=int(m.free), used=int(m.used))

    def mig_mode(self, handle: Handle) -> tuple[int, int]:
        current, pending = pynvml.nvmlDeviceGetMigMode(handle)
        return int(current), int(pending)

    def max_mig_device_count(self, handle: Handle) -> int:
        return int(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle))

    def mig_device_handle_by_index(self, handle: Handle, index: int) -> Handle:
        return pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, index)

    def compute_running_processes(self, handle: Handle) -> list[tuple[int, int]]:
        # usedGpuMemory is None where the driver cannot tell (WDDM, some containers).
        return [(int(p.pid), int(p.usedGpuMemory or 0)) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)]


__all__ = ["Handle", "MemoryInfo", "NvmlBackend", "RealNvmlBackend"]
