"""Spillover detection: is an engine where its mask says, judged from NVML's per-process attribution.

A CUDA llama-server that sees no GPU logs a warning and serves on the CPU with /health 200 (recorded on an
H200, shared/fixtures/gpu/h200-llama-server-b11434-cuda/): nothing fails, so poolmgr has to look. NVML lists
every compute process on the GPU it uses (its pid, with ~0.5 GiB of CUDA context at least), which proves both
"on its GPUs" and "nowhere else". Pure functions over snapshots, except `descendant_pids` which reads /proc.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

from poolmgr.devices._snapshot import DeviceSnapshot

# Lines a CUDA llama.cpp build prints when it found no GPU and carries on on the CPU.
CPU_SPILLOVER_MARKERS: tuple[str, ...] = (
    "failed to initialize CUDA: no CUDA-capable device is detected",
    "no usable GPU found, --gpu-layers option will be ignored",
)


def stderr_shows_cpu_spillover(text: str) -> bool:
    return any(marker in text for marker in CPU_SPILLOVER_MARKERS)


def _parent_pid(stat_text: str) -> int | None:
    # /proc/PID/stat: "pid (comm) state ppid ..."; comm may itself hold spaces and parentheses.
    _, sep, rest = stat_text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 2 or not fields[1].isdigit():
        return None
    return int(fields[1])


def _parent_map(proc: Path) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = _parent_pid((entry / "stat").read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue  # exited while we looked
        if ppid is not None:
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendant_pids(pid: int, *, proc: Path = Path("/proc")) -> set[int]:
    """Children, grandchildren … of `pid` (not `pid` itself), from the ppid field of /proc/*/stat."""
    children = _parent_map(proc)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found and child != pid:
                found.add(child)
                todo.append(child)
    return found


def _allowed(mask_uuids: Collection[str], devices: Sequence[DeviceSnapshot]) -> set[str]:
    # NVML may also attribute a MIG instance's process to the MIG-enabled parent GPU: that is the same memory.
    allowed = set(mask_uuids)
    allowed |= {d.parent_uuid for d in devices if d.uuid in allowed and d.parent_uuid is not None}
    return allowed


def find_foreign_gpus(
    pids: Collection[int], mask_uuids: Collection[str], devices: Sequence[DeviceSnapshot]
) -> list[tuple[int, str]]:
    """(pid, uuid) for each engine process (pass the pid and its descendants) on a device outside its mask.

    A CPU pool has no mask uuids, so any GPU it touches is foreign."""
    allowed = _allowed(mask_uuids, devices)
    return sorted(
        (pid, dev.uuid) for dev in devices if dev.uuid not in allowed for pid, _used in dev.processes if pid in pids
    )


def engine_on_gpus(pids: Collection[int], mask_uuids: Collection[str], devices: Sequence[DeviceSnapshot]) -> bool:
    """True when NVML shows one of `pids` on a device of the mask; False for a GPU pool means cpu_spillover."""
    allowed = _allowed(mask_uuids, devices)
    return any(pid in pids for dev in devices if dev.uuid in allowed for pid, _used in dev.processes)


__all__ = [
    "CPU_SPILLOVER_MARKERS",
    "descendant_pids",
    "engine_on_gpus",
    "find_foreign_gpus",
    "stderr_shows_cpu_spillover",
]
