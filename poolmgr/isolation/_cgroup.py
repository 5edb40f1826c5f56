"""Per-pool cgroups: v2 at <root>/poolmgr/<pool>; v1 one directory per controller (memory, cpu, pids).

v2 sits at the top of the hierarchy (the "no internal processes" rule keeps it out of poolmgr's own
cgroup, and engines outlive poolmgr). v1 nests under the cgroup poolmgr itself is in — "/" on a normal host,
so <root>/<controller>/poolmgr/<pool> — so an engine stays inside whatever limits its parent set. Limits
are written every time (a limit dropped from the pool file is reset to unlimited). The spawner joins before it
switches user by writing "0" (itself) to each `join_files` entry: on v1 the `tasks` file, which moves the
writing thread alone and so skips the kernel's global threadgroup lock (Linux ≥ 6.0, "cgroup: Optimize single
thread migration") — `cgroup.procs` takes it for write, an RCU grace period: 6-14 ms per spawn here, charged to
the engine's start. The spawner is single-threaded, so the thread is the whole process; the engine's threads
are born inside. v2 has only `cgroup.procs`.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "cpu", "pids")


@dataclass(frozen=True)
class CgroupLimits:
    memory_max_bytes: int | None = None
    cpu_max: tuple[int, int] | None = None
    pids_max: int | None = None


@dataclass(frozen=True)
class CgroupHandle:
    """A pool's cgroup(s). procs_files: its member processes; join_files: where the spawner writes "0" to join
    (v1: `tasks`, see the module docstring); notes: limits left unset."""

    version: int
    paths: tuple[Path, ...]
    procs_files: tuple[str, ...]
    join_files: tuple[str, ...]
    controllers: tuple[str, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class CgroupLayout:
    """What the host offers: version 2 (unified), 1 (controller mounts) or 0 (nothing usable), and why."""

    version: int
    controllers: tuple[str, ...]
    detail: str


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError:
        return ""


def _v1_mount(root: Path, controller: str) -> Path | None:
    mount = root / controller
    return mount if (mount / "tasks").exists() and (mount / "cgroup.procs").exists() else None


def detect(root: Path = CGROUP_ROOT) -> CgroupLayout:
    if (root / "cgroup.controllers").exists():
        have = set(_read(root / "cgroup.controllers").split())
        ctrls = tuple(c for c in CONTROLLERS if c in have)
        return CgroupLayout(2, ctrls, f"v2 at {root}: controllers {' '.join(ctrls) or 'none of ours'}")
    ctrls = tuple(c for c in CONTROLLERS if _v1_mount(root, c) is not None)
    if ctrls:
        hybrid = ""
        if (root / "unified" / "cgroup.controllers").exists():
            unified = _read(root / "unified" / "cgroup.controllers") or "none"
            hybrid = f"; hybrid v2 at {root / 'unified'} has only: {unified}"
        return CgroupLayout(1, ctrls, f"v1 controllers: {' '.join(ctrls)}{hybrid}")
    return CgroupLayout(0, (), f"no cgroup v2 and no v1 memory/cpu/pids under {root}")


def own_v1_path(controller: str, proc_cgroup: Path = Path("/proc/self/cgroup")) -> str:
    """This process's cgroup in one v1 hierarchy ("/" when not found)."""
    for line in _read(proc_cgroup).splitlines():
        _hid, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path or "/"
    return "/"


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _enable_v2(parent: Path, controllers: tuple[str, ...]) -> None:
    enabled = set(_read(parent / "cgroup.subtree_control").split())
    for ctrl in controllers:
        if ctrl not in enabled:
            try:
                _write(parent / "cgroup.subtree_control", f"+{ctrl}")
            except OSError as exc:  # EBUSY etc.: the limit for it is reported as unset below
                if exc.errno not in (errno.EBUSY, errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP):
                    raise


def _create_v2(root: Path, layout: CgroupLayout, pool_id: str, limits: CgroupLimits) -> CgroupHandle:
    base = root / "poolmgr"
    base.mkdir(mode=0o755, exist_ok=True)
    _enable_v2(root, layout.controllers)
    _enable_v2(base, layout.controllers)
    cg = base / pool_id
    cg.mkdir(mode=0o755, exist_ok=True)
    have = set(_read(cg / "cgroup.controllers").split())
    wanted = {
        "memory": ("memory.max", str(limits.memory_max_bytes) if limits.memory_max_bytes else "max"),
        "cpu": ("cpu.max", f"{limits.cpu_max[0]} {limits.cpu_max[1]}" if limits.cpu_max else "max"),
        "pids": ("pids.max", str(limits.pids_max) if limits.pids_max else "max"),
    }
    notes: list[str] = []
    for ctrl, (fname, value) in wanted.items():
        if ctrl in have:
            _write(cg / fname, value)
        elif value != "max":
            notes.append(f"{fname} not set: {ctrl} controller not enabled in {cg}")
    ctrls = tuple(c for c in CONTROLLERS if c in have)
    procs = (str(cg / "cgroup.procs"),)
    return CgroupHandle(2, (cg,), procs, procs, ctrls, tuple(notes))


def _v1_limits(ctrl: str, limits: CgroupLimits) -> list[tuple[str, str]]:
    if ctrl == "memory":
        return [("memory.limit_in_bytes", str(limits.memory_max_bytes or -1))]
    if ctrl == "cpu":
        quota, period = limits.cpu_max or (-1, 100_000)
        return [("cpu.cfs_period_us", str(period)), ("cpu.cfs_quota_us", str(quota))]
    return [("pids.max", str(limits.pids_max) if limits.pids_max else "max")]


def _create_v1(root: Path, layout: CgroupLayout, pool_id: str, limits: CgroupLimits) -> CgroupHandle:
    paths: list[Path] = []
    for ctrl in layout.controllers:
        cg = root / ctrl / own_v1_path(ctrl).lstrip("/") / "poolmgr" / pool_id
        cg.mkdir(mode=0o755, parents=True, exist_ok=True)
        for fname, value in _v1_limits(ctrl, limits):
            _write(cg / fname, value)
        paths.append(cg)
    notes = []
    if limits.memory_max_bytes and "memory" not in layout.controllers:
        notes.append("memory limit not set: no v1 memory controller")
    if limits.cpu_max and "cpu" not in layout.controllers:
        notes.append("cpu limit not set: no v1 cpu controller")
    if limits.pids_max and "pids" not in layout.controllers:
        notes.append("pids limit not set: no v1 pids controller")
    procs = tuple(str(p / "cgroup.procs") for p in paths)
    tasks = tuple(str(p / "tasks") for p in paths)
    return CgroupHandle(1, tuple(paths), procs, tasks, layout.controllers, tuple(notes))


def create(pool_id: str, limits: CgroupLimits, *, root: Path = CGROUP_ROOT) -> CgroupHandle:
    """Create (or reuse) the pool's cgroup and write its limits; OSError when the host refuses."""
    layout = detect(root)
    if layout.version == 2:
        return _create_v2(root, layout, pool_id, limits)
    if layout.version == 1:
        return _create_v1(root, layout, pool_id, limits)
    raise FileNotFoundError(errno.ENOENT, layout.detail)


def members(handle: CgroupHandle) -> list[int]:
    """Pids in the pool's cgroup (first hierarchy)."""
    text = _read(Path(handle.procs_files[0])) if handle.procs_files else ""
    return [int(p) for p in text.split()]


def remove(handle: CgroupHandle) -> None:
    """Remove the pool's cgroup directories once empty; a busy or missing one is left alone."""
    for path in handle.paths:
        try:
            path.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
                raise


__all__ = ["CgroupHandle", "CgroupLayout", "CgroupLimits", "create", "detect", "members", "remove"]
