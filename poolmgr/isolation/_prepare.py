"""`prepare` (parent side: workdir, cgroup, what the host supports) and `wrap_command` (the spawner argv).

`prepare` decides, once per start, which layers are in force and which are skipped (and why), and turns that
into a plan the spawner applies blindly: whatever is in the plan must hold or the engine is not exec'd. The
spawner is the compiled helper (`_spawner.c`, as KEY=VALUE tokens) where it could be built, else the Python
trampoline (`_trampoline.py`, as JSON): the same layers, the same order, the same failure lines.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import resource
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poolmgr.errors import IsolationError
from poolmgr.isolation import _cgroup, _seccomp
from poolmgr.isolation import _trampoline as tr
from poolmgr.isolation._env import engine_environment
from poolmgr.isolation._spawner import ensure_spawner, plan_argv
from poolmgr.isolation._spec import IsolationSpec
from poolmgr.isolation._users import resolve_ids

TRAMPOLINE = Path(tr.__file__).resolve()
CAP_SYS_RESOURCE = 24
LAYERS = ("user", "workdir", "cgroup", "rlimits", "capabilities", "no_new_privs", "landlock", "seccomp", "env")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerDecision:
    name: str
    in_force: bool
    detail: str


@dataclass(frozen=True)
class PreparedIsolation:
    """A spec made concrete for this host: ids, cgroup, the spawner's plan, and a line per layer. `spawner`: the
    compiled helper that applies the plan, None for the Python trampoline (which reads `plan_json`)."""

    spec: IsolationSpec
    uid: int | None
    gid: int | None
    layers: tuple[LayerDecision, ...]
    plan_json: str
    cgroup: _cgroup.CgroupHandle | None = None
    warnings: tuple[str, ...] = field(default=())
    plan: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    spawner: Path | None = None

    def layer(self, name: str) -> LayerDecision:
        return next(d for d in self.layers if d.name == name)

    @property
    def in_force(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.layers if d.in_force)

    @property
    def skipped(self) -> dict[str, str]:
        return {d.name: d.detail for d in self.layers if not d.in_force}

    def summary(self) -> str:
        on = ", ".join(f"{d.name} ({d.detail})" for d in self.layers if d.in_force) or "none"
        off = "; ".join(f"{d.name}: {d.detail}" for d in self.layers if not d.in_force) or "none"
        return f"in force: {on} | skipped: {off} | spawner={self.spawner_kind}"

    @property
    def spawner_kind(self) -> str:
        """What applies the layers: `c` (the compiled helper) or `python` (the trampoline)."""
        return "python" if self.spawner is None else "c"


def _bits_for(st: os.stat_result, uid: int, gid: int) -> int:
    if uid == st.st_uid:
        return (st.st_mode >> 6) & 7
    if gid == st.st_gid:
        return (st.st_mode >> 3) & 7
    return st.st_mode & 7


def unreachable_by(path: Path, uid: int, gid: int, want: int = os.R_OK) -> str | None:
    """Why `uid`/`gid` (no supplementary groups) cannot reach `path` with `want`, by mode bits; None if it can."""
    if uid == 0:
        return None
    for parent in reversed(path.parents):
        try:
            if not _bits_for(parent.stat(), uid, gid) & os.X_OK:
                return f"{parent} is not searchable by uid {uid}"
        except OSError as exc:
            return f"{parent}: {exc.strerror}"
    try:
        if _bits_for(path.stat(), uid, gid) & want != want:
            return f"{path} is mode {stat.filemode(path.stat().st_mode)} for uid {uid}"
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    return None


def _make_workdir(path: Path, uid: int | None, gid: int | None) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        st = path.lstat()
        if not stat.S_ISDIR(st.st_mode):  # a symlink here could point chown at anything
            raise IsolationError(f"workdir {path} exists and is not a plain directory") from None
    os.chmod(path, 0o700)
    if uid is not None and os.geteuid() == 0:
        os.chown(path, uid, gid if gid is not None else -1)
    if uid is not None and (why := unreachable_by(path, uid, gid if gid is not None else uid, os.X_OK)):
        raise IsolationError(f"workdir {path} is not reachable by the engine user: {why}")


def _user_layer(spec: IsolationSpec) -> tuple[int | None, int | None, LayerDecision]:
    uid, gid = resolve_ids(spec.user, spec.group)
    me = os.geteuid()
    if me == 0:
        if uid is None or uid == 0:
            raise IsolationError(
                f"pool {spec.pool_id!r}: refusing to run the engine as root; set an engine user "
                "(POOL_MANAGERD_ENGINE_USER, or `poolmgr setup` to create poolmgr-engine)"
            )
        if gid == 0:
            raise IsolationError(f"pool {spec.pool_id!r}: refusing to run the engine with group id 0")
        return uid, gid, LayerDecision("user", True, f"uid {uid} gid {gid}, no supplementary groups")
    if uid is not None and uid != me:
        why = f"poolmgr is not root: cannot switch to uid {uid}; engine runs as uid {me}"
    else:
        why = f"poolmgr is not root: engine runs as poolmgr's uid {me}"
    return None, None, LayerDecision("user", False, why)


def _cgroup_layer(spec: IsolationSpec, root: Path) -> tuple[_cgroup.CgroupHandle | None, LayerDecision]:
    limits = _cgroup.CgroupLimits(spec.memory_max_bytes, spec.cpu_max, spec.pids_max)
    try:
        handle = _cgroup.create(spec.pool_id, limits, root=root)
    except OSError as exc:
        return None, LayerDecision("cgroup", False, f"cannot create: {exc.strerror or exc}")
    if not handle.procs_files:
        return None, LayerDecision("cgroup", False, "no usable controller")
    detail = f"v{handle.version} {','.join(handle.controllers)} at {handle.paths[0]}"
    if handle.notes:
        detail += "; " + "; ".join(handle.notes)
    return handle, LayerDecision("cgroup", True, detail)


def _rlimit_plan(spec: IsolationSpec) -> tuple[list[list[int]], LayerDecision]:
    can_raise = tr.has_effective_cap(CAP_SYS_RESOURCE)
    plan: list[list[int]] = []
    notes: list[str] = []
    inf = resource.RLIM_INFINITY
    for name, soft, hard in spec.rlimits:
        res = getattr(resource, f"RLIMIT_{name}")
        cur_hard = resource.getrlimit(res)[1]
        if not can_raise and cur_hard != inf and (hard == inf or hard > cur_hard):
            notes.append(f"{name} hard {hard} capped at current {cur_hard}")
            hard = cur_hard
        if soft == inf or (hard != inf and soft > hard):
            soft = hard
        plan.append([res, soft, hard])
    detail = ", ".join(f"{n}={s}" for (n, _s, _h), (_r, s, _hh) in zip(spec.rlimits, plan, strict=True))
    return plan, LayerDecision("rlimits", bool(plan), detail + ("; " + "; ".join(notes) if notes else ""))


def _landlock_plan(spec: IsolationSpec, workdir: Path) -> tuple[dict[str, Any] | None, LayerDecision]:
    if not spec.landlock:
        return None, LayerDecision("landlock", False, "disabled for this pool")
    abi = tr.landlock_abi()
    if abi < 1:
        return None, LayerDecision("landlock", False, "kernel has no Landlock (or it is disabled)")
    fs = tr.LL_FS_WRITE_FILE | tr.LL_FS_REMOVE_DIR | tr.LL_FS_REMOVE_FILE | tr.LL_FS_MAKE_CHAR | tr.LL_FS_MAKE_DIR
    fs |= tr.LL_FS_MAKE_REG | tr.LL_FS_MAKE_SOCK | tr.LL_FS_MAKE_FIFO | tr.LL_FS_MAKE_BLOCK | tr.LL_FS_MAKE_SYM
    dev = tr.LL_FS_WRITE_FILE  # GPU device nodes are opened read-write and driven by ioctl
    if abi >= 2:
        fs |= tr.LL_FS_REFER
    if abi >= 3:
        fs |= tr.LL_FS_TRUNCATE
        dev |= tr.LL_FS_TRUNCATE
    if abi >= 5:
        fs |= tr.LL_FS_IOCTL_DEV
        dev |= tr.LL_FS_IOCTL_DEV
    plan: dict[str, Any] = {"abi": abi, "fs": fs, "net": 0, "scoped": 0, "paths": []}
    # The workdir keeps every right handled above, LL_FS_MAKE_SOCK included: the engine's unix socket lives there.
    plan["paths"] = [[str(workdir), fs], ["/dev", dev]]
    if os.path.isdir("/dev/shm"):  # POSIX shared memory (CUDA IPC, NCCL) lives there
        plan["paths"].append(["/dev/shm", fs])
    parts = [f"ABI {abi}", f"writes only in {workdir} (and /dev nodes, /dev/shm)"]
    if abi >= 4:
        # Handled with no port rule: no TCP bind or connect at all (engines serve on their unix socket).
        plan["net"] = tr.LL_NET_BIND_TCP | tr.LL_NET_CONNECT_TCP
        parts.append("no TCP bind or connect")
    else:
        parts.append(f"net part skipped: ABI {abi} < 4 cannot refuse TCP (seccomp still refuses IP sockets)")
    if abi >= 6:
        plan["scoped"] = tr.LL_SCOPE_ABSTRACT_UNIX_SOCKET | tr.LL_SCOPE_SIGNAL
        parts.append("no signals or abstract sockets outside the sandbox")
    return plan, LayerDecision("landlock", True, "; ".join(parts))


def _seccomp_plan(spec: IsolationSpec) -> tuple[str | None, LayerDecision]:
    if not spec.seccomp:
        return None, LayerDecision("seccomp", False, "disabled for this pool")
    why = _seccomp.seccomp_unavailable_reason()
    if why is not None:
        return None, LayerDecision("seccomp", False, why)
    try:
        bpf = _seccomp.deny_list_bpf()
    except (OSError, RuntimeError, ValueError) as exc:
        return None, LayerDecision("seccomp", False, f"could not build the filter: {exc}")
    return bpf.hex(), LayerDecision("seccomp", True, _seccomp.rules_summary())


def _caps_layer(spec: IsolationSpec) -> tuple[bool, LayerDecision]:
    if not spec.drop_caps:
        return False, LayerDecision("capabilities", False, "disabled for this pool")
    if tr.has_effective_cap(tr.CAP_SETPCAP):
        return True, LayerDecision("capabilities", True, "all sets cleared, bounding set included")
    detail = "effective/permitted/inheritable/ambient cleared; bounding set kept (no CAP_SETPCAP)"
    return False, LayerDecision("capabilities", True, detail)


def prepare(spec: IsolationSpec, *, cgroup_root: Path = _cgroup.CGROUP_ROOT) -> PreparedIsolation:
    """Make the workdir and cgroup, decide every layer for this host, and log one line saying which."""
    uid, gid, user = _user_layer(spec)
    workdir = spec.workdir.absolute()
    _make_workdir(workdir, uid, gid)
    handle, cgroup = _cgroup_layer(spec, cgroup_root)
    rlimits, rl_layer = _rlimit_plan(spec)
    bounding, caps = _caps_layer(spec)
    landlock, ll_layer = _landlock_plan(spec, workdir)
    bpf, sc_layer = _seccomp_plan(spec)
    nnp = spec.no_new_privs or landlock is not None or bpf is not None
    nnp_detail = "set" if spec.no_new_privs else "forced on: seccomp/Landlock need it"
    layers = (
        user,
        LayerDecision("workdir", True, f"{workdir} mode 0700"),
        cgroup,
        rl_layer,
        caps,
        LayerDecision("no_new_privs", nnp, nnp_detail if nnp else "disabled for this pool"),
        ll_layer,
        sc_layer,
        LayerDecision("env", spec.clean_env, "allow-list, no secrets" if spec.clean_env else "secrets dropped only"),
    )
    plan = {
        "v": 1,
        "pool": spec.pool_id,
        "uid": uid,
        "gid": gid,
        "workdir": str(workdir),
        "cgroups": list(handle.join_files) if handle else [],
        "rlimits": rlimits,
        "bounding": bounding,
        "caps": caps.in_force,
        "nnp": nnp,
        "landlock": landlock,
        "seccomp": bpf,
    }
    warnings = tuple(
        f"readable path {p}: {why}"
        for p in spec.readable_paths
        if uid is not None and (why := unreachable_by(Path(p), uid, gid if gid is not None else uid))
    )
    plan_json = json.dumps(plan, separators=(",", ":"))
    prepared = PreparedIsolation(spec, uid, gid, layers, plan_json, handle, warnings, plan, ensure_spawner())
    extra = {"pool_id": spec.pool_id}
    log.info("pool %s engine isolation: %s", spec.pool_id, prepared.summary(), extra=extra)
    for warning in warnings:
        log.warning("pool %s engine isolation: %s", spec.pool_id, warning, extra=extra)
    return prepared


def wrap_command(
    prepared: PreparedIsolation, argv: Sequence[str], env: Mapping[str, str]
) -> tuple[list[str], dict[str, str]]:
    """The argv that runs `argv` under the spawner, and the engine's cleaned env (`env`: the engine's own)."""
    if not argv:
        raise IsolationError("empty engine command")
    spec = prepared.spec
    env2 = engine_environment(os.environ, env, workdir=spec.workdir.absolute(), clean=spec.clean_env)
    if prepared.spawner is not None:
        return [str(prepared.spawner), *plan_argv(prepared.plan), "--", *argv], env2
    # -I: no cwd on sys.path and no PYTHON* variables (it starts as root); -S: no site, faster.
    python = sys.executable or "/usr/bin/python3"
    return [python, "-I", "-S", _trampoline_script(), prepared.plan_json, "--", *argv], env2


def _trampoline_script() -> str:
    """The trampoline's cached bytecode when it is current (saves compiling it on every start), else source."""
    try:
        pyc = Path(importlib.util.cache_from_source(str(TRAMPOLINE)))
        if pyc.stat().st_mtime >= TRAMPOLINE.stat().st_mtime:
            return str(pyc)
    except (OSError, NotImplementedError):
        pass
    return str(TRAMPOLINE)


def release(prepared: PreparedIsolation) -> None:
    """After the engine is gone: remove its (now empty) cgroup. The workdir is kept for the next start."""
    if prepared.cgroup is not None:
        _cgroup.remove(prepared.cgroup)


__all__ = ["LAYERS", "TRAMPOLINE", "LayerDecision", "PreparedIsolation", "prepare", "release", "wrap_command"]
