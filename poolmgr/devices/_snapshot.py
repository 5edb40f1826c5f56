"""DeviceSnapshot: what poolmgr knows about one GPU (or one MIG instance) at one moment."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeviceSnapshot:
    index: int  # NVML index; MIG instances get parent_index*1000+n for ordering only
    uuid: str  # "GPU-…" or "MIG-…"
    name: str
    pci_bus_id: str
    compute_capability: tuple[int, int]
    vram_total_bytes: int
    vram_free_bytes: int
    vram_reserved_bytes: int = 0
    mig_enabled: bool = False
    is_mig: bool = False
    parent_uuid: str | None = None
    processes: tuple[tuple[int, int], ...] = field(default=())  # (pid, used bytes) NVML attributes here

    @property
    def device_id(self) -> str:
        """The label used in metrics and the registry: the uuid."""
        return self.uuid


__all__ = ["DeviceSnapshot"]
