"""`poolmgr doctor`: which isolation mechanisms this host offers, one row each."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from poolmgr.isolation import _cgroup, _seccomp, _spawner
from poolmgr.isolation import _trampoline as tr


@dataclass(frozen=True)
class LayerStatus:
    name: str
    supported: bool
    detail: str


def _user_switch() -> LayerStatus:
    uid = os.geteuid()
    if uid == 0:
        return LayerStatus("user switch", True, "poolmgr is root: engines run as the engine user")
    return LayerStatus("user switch", False, f"poolmgr runs as uid {uid}: engines run as that uid")


def _capabilities() -> LayerStatus:
    if tr.has_effective_cap(tr.CAP_SETPCAP):
        return LayerStatus("capabilities", True, "all sets can be cleared, bounding set included")
    return LayerStatus("capabilities", True, "effective/permitted/ambient cleared; bounding set needs CAP_SETPCAP")


def _no_new_privs() -> LayerStatus:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            ok = any(line.startswith("NoNewPrivs:") for line in f)
    except OSError:
        ok = False
    return LayerStatus("no_new_privs", ok, "prctl(PR_SET_NO_NEW_PRIVS)" if ok else "kernel older than 3.5")


def _seccomp_row() -> LayerStatus:
    why = _seccomp.seccomp_unavailable_reason()
    if why is not None:
        return LayerStatus("seccomp", False, why)
    return LayerStatus("seccomp", True, f"pyseccomp: {_seccomp.rules_summary()}")


def _landlock_row() -> LayerStatus:
    abi = tr.landlock_abi()
    if abi < 1:
        return LayerStatus("landlock", False, "kernel has no Landlock (or lsm= leaves it out)")
    net = "fs + no TCP bind or connect" if abi >= 4 else "fs only (refusing TCP needs ABI 4)"
    return LayerStatus("landlock", True, f"ABI {abi}: {net}")


def _cgroup_rows(root: Path) -> list[LayerStatus]:
    layout = _cgroup.detect(root)
    if layout.version == 2:
        v2 = LayerStatus("cgroup v2", bool(layout.controllers), layout.detail)
        return [v2, LayerStatus("cgroup v1", False, "not used: the host is on v2")]
    unified = root / "unified" / "cgroup.controllers"
    if unified.exists():
        have = unified.read_text(encoding="ascii").split()
        v2 = LayerStatus("cgroup v2", False, f"hybrid: {root / 'unified'} has {' '.join(have) or 'no'} controllers")
    else:
        v2 = LayerStatus("cgroup v2", False, f"{root} is not a cgroup2 mount")
    return [v2, LayerStatus("cgroup v1", layout.version == 1, layout.detail)]


def _binary(name: str, label: str, what: str) -> LayerStatus:
    path = shutil.which(name)
    return LayerStatus(label, path is not None, f"{path}: {what}" if path else f"{name} not on PATH")


ROOTLESS_V1_LIMITS = "on this cgroup v1/hybrid host rootless podman ignores memory_max, cpu_max and pids_max"


def _podman_row(root: Path) -> LayerStatus:
    path = shutil.which("podman")
    if path is None:
        return LayerStatus("podman", False, 'podman not on PATH: runtime = "podman" pools cannot run '
                                            "(Debian: apt-get install podman uidmap runc)")  # fmt: skip
    limits = "" if _cgroup.detect(root).version == 2 else f"; {ROOTLESS_V1_LIMITS}"
    return LayerStatus("podman", True, f'{path}: runtime = "podman" pools run in rootless containers{limits}')


def _spawner_row() -> LayerStatus:
    state = _spawner.spawner_state()
    return LayerStatus("spawner", state.usable, state.detail)


def doctor(*, cgroup_root: Path = _cgroup.CGROUP_ROOT) -> list[LayerStatus]:
    """Probe every isolation mechanism; nothing is changed on the host."""
    return [
        _user_switch(),
        _capabilities(),
        _no_new_privs(),
        _seccomp_row(),
        _landlock_row(),
        *_cgroup_rows(cgroup_root),
        _binary("bwrap", "bubblewrap", "namespaces available"),
        _podman_row(cgroup_root),
        _spawner_row(),
    ]


def doctor_table(rows: list[LayerStatus]) -> str:
    """A plain-text table, one row per mechanism: name, yes/no, detail."""
    width = max((len(r.name) for r in rows), default=5)
    lines = [f"{'layer':<{width}}  ok   detail", f"{'-' * width}  ---  {'-' * 40}"]
    lines += [f"{r.name:<{width}}  {'yes' if r.supported else 'no ':<3}  {r.detail}" for r in rows]
    return "\n".join(lines)


__all__ = ["ROOTLESS_V1_LIMITS", "LayerStatus", "doctor", "doctor_table"]
