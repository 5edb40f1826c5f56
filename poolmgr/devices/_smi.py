"""Cross-check NVML discovery with `nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.free
--format=csv,noheader,nounits` (scripts/gpu-check runs it on a GPU host)."""

from __future__ import annotations

from dataclasses import dataclass

from poolmgr.devices._discovery import Inventory

MIB = 1024**2
SMI_QUERY = ("index", "uuid", "name", "memory.total", "memory.free")


@dataclass(frozen=True)
class SmiRow:
    index: int
    uuid: str
    name: str
    total_mib: int
    free_mib: int


def _mib(cell: str) -> int:
    return int(cell.removesuffix("MiB").strip())


def parse_smi_csv(text: str) -> list[SmiRow]:
    """Rows of the query above; tolerates a header line and "81559 MiB" cells (without nounits)."""
    rows: list[SmiRow] = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < len(SMI_QUERY) or not cells[0].isdigit():
            continue
        rows.append(SmiRow(int(cells[0]), cells[1], cells[2], _mib(cells[3]), _mib(cells[4])))
    return rows


def compare_with_smi(inventory: Inventory, rows: list[SmiRow], *, free_tolerance_mib: int = 512) -> list[str]:
    """One line per disagreement; empty when NVML discovery and nvidia-smi agree.

    Free memory moves between the two reads, so it may differ by `free_tolerance_mib`."""
    gpus = {d.index: d for d in inventory.devices if not d.is_mig}
    problems: list[str] = []
    if sorted(gpus) != sorted(r.index for r in rows):
        problems.append(f"indices: NVML {sorted(gpus)}, nvidia-smi {sorted(r.index for r in rows)}")
    for row in rows:
        dev = gpus.get(row.index)
        if dev is None:
            continue
        if (dev.uuid, dev.name) != (row.uuid, row.name):
            problems.append(f"GPU {row.index}: NVML {dev.uuid} {dev.name!r}, nvidia-smi {row.uuid} {row.name!r}")
        if dev.vram_total_bytes // MIB != row.total_mib:
            problems.append(
                f"GPU {row.index}: total NVML {dev.vram_total_bytes // MIB} MiB, nvidia-smi {row.total_mib} MiB"
            )
        if abs(dev.vram_free_bytes // MIB - row.free_mib) > free_tolerance_mib:
            problems.append(
                f"GPU {row.index}: free NVML {dev.vram_free_bytes // MIB} MiB, nvidia-smi {row.free_mib} MiB"
            )
    return problems


__all__ = ["SMI_QUERY", "SmiRow", "compare_with_smi", "parse_smi_csv"]
