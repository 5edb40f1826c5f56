"""FakeNvmlBackend: answers from a recorded NVML snapshot (the shape of shared/fixtures/gpu/*/nvml-snapshot.json).

It behaves as nvidia-ml-py did on the recording machine: a refused value (`{"nvml_error": ..., "code": N}`)
is raised as the same `pynvml.NVMLError` subclass, calls before `init()` or after the last `shutdown()` raise
Uninitialized, an out-of-range index raises InvalidArgument, an empty MIG slot or a MIG lookup on a non-MIG GPU
raises NotFound, and a snapshot with `nvml_init_error` (the no-driver host) raises it from `init()`.
A field the snapshot lacks is answered NotSupported, as NVML answers a query a device does not support; MIG
instances share their parent's PCI id and compute capability, as NVML reports them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml

from poolmgr.devices._backend import MemoryInfo

_Json = dict[str, Any]


def _raise(refusal: _Json) -> None:
    raise pynvml.NVMLError(int(refusal["code"]))


def _checked(value: Any) -> Any:
    if isinstance(value, dict) and "nvml_error" in value:
        _raise(value)
    return value


@dataclass(frozen=True)
class _FakeHandle:
    device: _Json
    parent: _Json | None = None


class FakeNvmlBackend:
    def __init__(self, source: str | Path | _Json) -> None:
        if isinstance(source, dict):
            self._data: _Json = copy.deepcopy(source)
        else:
            self._data = json.loads(Path(source).read_text(encoding="utf-8"))
        if not isinstance(self._data, dict):
            raise TypeError("an NVML snapshot is a JSON object")
        self._refcount = 0
        self._failed: dict[str, int] = {}

    # -- test controls (what a real GPU does to NVML at run time) -------------------------------------------

    def set_processes(self, uuid: str, processes: list[tuple[int, int]]) -> None:
        """Make NVML attribute these (pid, used bytes) to the device (or MIG instance) `uuid`."""
        dev = self._find(uuid)
        dev["compute_processes"] = [{"pid": pid, "usedGpuMemory": used} for pid, used in processes]

    def compute_processes_of(self, uuid: str) -> list[tuple[int, int]]:
        """What NVML attributes to `uuid` now (pid, used bytes): test helpers add to it."""
        procs = self._find(uuid).get("compute_processes", [])
        if not isinstance(procs, list):
            return []  # a recorded refusal
        return [(int(p["pid"]), int(p.get("usedGpuMemory") or 0)) for p in procs]

    def fail_device(self, uuid: str, code: int = pynvml.NVML_ERROR_GPU_IS_LOST) -> None:
        """Every later query on this device raises NVMLError(code) (15 = GPU is lost)."""
        self._find(uuid)
        self._failed[uuid] = code

    def _find(self, uuid: str) -> _Json:
        for dev in self._data.get("devices", []):
            if dev.get("uuid") == uuid:
                return dev  # type: ignore[no-any-return]
            for mig in dev.get("mig_devices", []):
                if mig.get("uuid") == uuid:
                    return mig  # type: ignore[no-any-return]
        raise KeyError(uuid)

    # -- NvmlBackend ----------------------------------------------------------------------------------------

    def init(self) -> None:
        if "nvml_init_error" in self._data:
            _raise(self._data["nvml_init_error"])
        self._refcount += 1

    def shutdown(self) -> None:
        self._require_init()
        self._refcount -= 1

    def _require_init(self) -> None:
        if self._refcount <= 0:
            _raise(self._data.get("after_shutdown") or {"code": pynvml.NVML_ERROR_UNINITIALIZED})

    def _error(self, name: str, default_code: int) -> None:
        _raise(self._data.get("errors", {}).get(name) or {"code": default_code})

    def _field(self, handle: _FakeHandle, key: str, *, inherit: bool = False) -> Any:
        self._require_init()
        code = self._failed.get(str(handle.device.get("uuid")))
        if handle.parent is not None:
            code = code or self._failed.get(str(handle.parent.get("uuid")))
        if code:
            raise pynvml.NVMLError(code)
        if key in handle.device:
            return _checked(handle.device[key])
        if inherit and handle.parent is not None and key in handle.parent:
            return _checked(handle.parent[key])
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def driver_version(self) -> str:
        self._require_init()
        return str(_checked(self._data["driver_version"]))

    def device_count(self) -> int:
        self._require_init()
        return len(self._data.get("devices", []))

    def handle_by_index(self, index: int) -> _FakeHandle:
        self._require_init()
        devices = self._data.get("devices", [])
        if not 0 <= index < len(devices):
            self._error("index_out_of_range", pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return _FakeHandle(devices[index])

    def name(self, handle: _FakeHandle) -> str:
        return str(self._field(handle, "name"))

    def uuid(self, handle: _FakeHandle) -> str:
        return str(self._field(handle, "uuid"))

    def pci_bus_id(self, handle: _FakeHandle) -> str:
        return str(self._field(handle, "pci", inherit=True)["busId"])

    def cuda_compute_capability(self, handle: _FakeHandle) -> tuple[int, int]:
        major, minor = self._field(handle, "cuda_compute_capability", inherit=True)
        return int(major), int(minor)

    def memory_info_v2(self, handle: _FakeHandle) -> MemoryInfo:
        m = self._field(handle, "memory_info_v2")
        return MemoryInfo(total=m["total"], free=m["free"], used=m["used"], reserved=m["reserved"])

    def memory_info_v1(self, handle: _FakeHandle) -> MemoryInfo:
        m = self._field(handle, "memory_info_v1")
        return MemoryInfo(total=m["total"], free=m["free"], used=m["used"])

    def mig_mode(self, handle: _FakeHandle) -> tuple[int, int]:
        current, pending = self._field(handle, "mig_mode")
        return int(current), int(pending)

    def max_mig_device_count(self, handle: _FakeHandle) -> int:
        return int(self._field(handle, "max_mig_device_count"))

    def mig_device_handle_by_index(self, handle: _FakeHandle, index: int) -> _FakeHandle:
        current, _pending = self.mig_mode(handle)
        if current != 1:
            self._error("mig_instance_on_non_mig", pynvml.NVML_ERROR_NOT_FOUND)
        if not 0 <= index < self.max_mig_device_count(handle):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for mig in handle.device.get("mig_devices", []):
            if mig.get("index") == index:
                return _FakeHandle(mig, parent=handle.device)
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def compute_running_processes(self, handle: _FakeHandle) -> list[tuple[int, int]]:
        try:
            procs = self._field(handle, "compute_processes")
        except pynvml.NVMLError_NotSupported:
            return []  # snapshots record MIG instances without a process list: none ran there
        return [(int(p["pid"]), int(p.get("usedGpuMemory") or 0)) for p in procs]


__all__ = ["FakeNvmlBackend"]
