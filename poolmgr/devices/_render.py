"""The device list as the CLI prints it (a table) and the API returns it (JSON-ready dicts)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from poolmgr.devices._discovery import MIG_INDEX_BASE, Inventory
from poolmgr.devices._snapshot import DeviceSnapshot

GIB = 1024**3
_COLUMNS = ("INDEX", "NAME", "UUID", "CC", "VRAM_TOTAL_GIB", "VRAM_FREE_GIB", "MIG", "POOL")


def _index_label(dev: DeviceSnapshot) -> str:
    if dev.is_mig:
        return f"{dev.index // MIG_INDEX_BASE}:{dev.index % MIG_INDEX_BASE}"
    return str(dev.index)


def _mig_label(dev: DeviceSnapshot) -> str:
    if dev.is_mig:
        return "instance"
    return "enabled" if dev.mig_enabled else "-"


def _row(dev: DeviceSnapshot, holders: Mapping[str, str]) -> tuple[str, ...]:
    return (
        _index_label(dev),
        dev.name,
        dev.uuid,
        "{}.{}".format(*dev.compute_capability),
        f"{dev.vram_total_bytes / GIB:.1f}",
        f"{dev.vram_free_bytes / GIB:.1f}",
        _mig_label(dev),
        holders.get(dev.uuid, "-"),
    )


def devices_table(inventory: Inventory, holders: Mapping[str, str]) -> str:
    """`holders` maps a device uuid to the pool(s) placed on it."""
    if not inventory.available:
        return f"no GPUs: {inventory.reason}"
    if not inventory.devices:
        return f"no GPUs found (NVIDIA driver {inventory.driver_version})"
    rows = [_COLUMNS, *(_row(d, holders) for d in inventory.devices)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines + [f"problem: {p}" for p in inventory.problems])


def devices_json(inventory: Inventory, holders: Mapping[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "index": dev.index,
            "uuid": dev.uuid,
            "name": dev.name,
            "pci_bus_id": dev.pci_bus_id,
            "compute_capability": "{}.{}".format(*dev.compute_capability),
            "vram_total_bytes": dev.vram_total_bytes,
            "vram_free_bytes": dev.vram_free_bytes,
            "vram_reserved_bytes": dev.vram_reserved_bytes,
            "mig_enabled": dev.mig_enabled,
            "is_mig": dev.is_mig,
            "parent_uuid": dev.parent_uuid,
            "processes": [{"pid": pid, "used_bytes": used} for pid, used in dev.processes],
            "pool": holders.get(dev.uuid),
        }
        for dev in inventory.devices
    ]


__all__ = ["devices_json", "devices_table"]
