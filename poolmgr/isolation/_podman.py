"""Containers: a rootless podman command for an engine, with the same seccomp deny-list as an OCI profile.

Rootless: when poolmgr is root the command starts with `setpriv` to the engine user, so podman itself never
runs as root. The container gets no capabilities, no_new_privs, poolmgr's seccomp profile, a read-only root,
the workdir as its only writable mount, the readable paths mounted read-only at the same place, and no network
at all (`--network=none`, and the profile refuses IP sockets): the engine serves on a unix socket in its
workdir, which is mounted at the same path, so poolmgr reaches it there exactly as it does outside a container.

podman's own home (its config and storage) is `podman_home(spec)`, next to the workdir and never mounted into
the container: an engine that could edit podman's config could run a program outside its sandbox next time.
A pool's container is named `container_name(pool_id)`; `detach=True` is how serve runs it (`-d --replace`, the
engine's stdout and stderr passed through conmon to poolmgr's log, kept after exit so its status can be read).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from poolmgr.errors import IsolationError
from poolmgr.isolation import _cgroup
from poolmgr.isolation._env import DEFAULT_PATH
from poolmgr.isolation._seccomp import ARG_RULES, DENIED_SYSCALLS, ENOSYS_SYSCALLS
from poolmgr.isolation._spec import IsolationSpec
from poolmgr.isolation._users import resolve_ids

SECCOMP_PROFILE_NAME = "poolmgr-seccomp.json"
PODMAN_DIR = ".podman"  # in the workdir root: root-owned; one engine-owned podman home per pool under it
_OCI_ARCH = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}
_EPERM = 1
_ENOSYS = 38


def seccomp_profile() -> dict[str, Any]:
    """The deny-list as an OCI/podman seccomp profile: default allow, EPERM for the rest."""
    syscalls: list[dict[str, Any]] = [
        {"names": list(DENIED_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": _EPERM},
        {"names": list(ENOSYS_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": _ENOSYS},
    ]
    for rule in ARG_RULES:
        args = [
            {"index": idx, "value": value, "valueTwo": 0, "op": "SCMP_CMP_EQ"}
            if not mask
            else {"index": idx, "value": mask, "valueTwo": value, "op": "SCMP_CMP_MASKED_EQ"}
            for idx, mask, value in rule.conditions
        ]
        syscalls.append(
            {
                "names": [rule.syscall],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": _EPERM,
                "args": args,
                "comment": rule.reason,
            }
        )
    arch = _OCI_ARCH.get(platform.machine())
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": [arch] if arch else [],
        "syscalls": syscalls,
    }


def write_seccomp_profile(path: Path) -> Path:
    """Write the profile (mode 0644, atomically) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(seccomp_profile(), indent=2) + "\n", encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def default_profile_path(spec: IsolationSpec) -> Path:
    """Next to the workdir, not in it: the engine must not be able to edit its own next sandbox."""
    return spec.workdir.absolute().parent / SECCOMP_PROFILE_NAME


def container_name(pool_id: str) -> str:
    return f"poolmgr-{pool_id}"


def podman_home(spec: IsolationSpec) -> Path:
    """podman's HOME and storage for this pool's containers: outside the workdir, owned by the engine user."""
    return spec.workdir.absolute().parent / PODMAN_DIR / spec.pool_id


def _ensure_home(spec: IsolationSpec) -> Path:
    home = podman_home(spec)
    if home.is_dir():
        return home
    home.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    home.mkdir(mode=0o700, exist_ok=True)
    if os.geteuid() == 0 and spec.user is not None:
        uid, gid = resolve_ids(spec.user, spec.group)
        os.chown(home, uid if uid is not None else -1, gid if gid is not None else -1)
    return home


def _rootless_prefix(spec: IsolationSpec) -> list[str]:
    if os.geteuid() != 0:
        return []
    uid, gid = resolve_ids(spec.user, spec.group)
    if uid is None or uid == 0:
        raise IsolationError(f"pool {spec.pool_id!r}: rootless podman needs a non-root engine user")
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all", "--"]


def _has_subids(name: str, uid: int) -> bool:
    try:
        lines = Path("/etc/subuid").read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    return any(line.split(":", 1)[0] in (name, str(uid)) for line in lines if ":" in line)


def _userns(spec: IsolationSpec) -> list[str]:
    """keep-id (the engine keeps its uid inside) needs subordinate ids; without them podman maps the one uid
    it has to root inside the container, which outside is still the unprivileged engine user."""
    uid, _gid = resolve_ids(spec.user, spec.group) if spec.user is not None else (os.geteuid(), None)
    name = str(spec.user) if spec.user is not None else str(uid)
    return ["--userns=keep-id"] if uid is not None and _has_subids(name, uid) else []


def _runtime() -> list[str]:
    """crun refuses cgroup v1/hybrid hosts ("cgroups in hybrid mode not supported"); runc runs there."""
    if _cgroup.detect().version != 2 and shutil.which("runc"):
        return ["--runtime=runc"]
    return []


def _clean_env(home: Path) -> list[str]:
    """podman gets no secret either: a fresh env whose HOME holds podman's config and storage.

    No XDG_RUNTIME_DIR: podman then keeps its run state in /tmp/podman-run-UID (a runroot under the state dir
    would pass podman's 50-character limit)."""
    return ["env", "-i", f"PATH={DEFAULT_PATH}", f"HOME={home}"]


def podman_base(spec: IsolationSpec) -> list[str]:
    """`podman` as the engine user with a clean environment and this pool's storage: add a subcommand."""
    home = _ensure_home(spec)
    return [*_rootless_prefix(spec), *_clean_env(home), "podman", f"--root={home / 'storage'}"]


def _detached(name: str, detach: bool) -> list[str]:
    if not detach:
        return ["--rm", f"--name={name}"]
    return ["--detach", "--replace", f"--name={name}", "--log-driver=passthrough"]


def _limits(spec: IsolationSpec) -> list[str]:
    args = ["--ulimit=core=0:0"]
    if spec.memory_max_bytes:
        args.append(f"--memory={spec.memory_max_bytes}")
    if spec.cpu_max:
        quota, period = spec.cpu_max
        args += [f"--cpu-period={period}", f"--cpu-quota={quota}"]
    if spec.pids_max:
        args.append(f"--pids-limit={spec.pids_max}")
    return args


def podman_command(
    spec: IsolationSpec,
    image_or_rootfs: str,
    argv: Sequence[str],
    *,
    seccomp_profile_path: Path | None = None,
    detach: bool = False,
    env: Mapping[str, str] | None = None,
    devices: Sequence[str] = (),
) -> list[str]:
    """The full command line; write the profile first with `write_seccomp_profile(default_profile_path(spec))`.

    image_or_rootfs: an image name, or an existing directory used as `--rootfs`. `env`: the engine's
    environment inside the container (nothing else is passed). `devices`: CDI names (`nvidia.com/gpu=<uuid>`).
    """
    profile = seccomp_profile_path or default_profile_path(spec)
    workdir = spec.workdir.absolute()
    cmd = [
        *podman_base(spec),
        "run",
        *_runtime(),
        *_detached(container_name(spec.pool_id), detach),
        *_userns(spec),
        "--cap-drop=all",
        "--security-opt=no-new-privileges",
        f"--security-opt=seccomp={profile}",
        "--read-only",
        "--read-only-tmpfs=false",  # no tmpfs on /tmp, /run, /var/tmp: the workdir is the only writable place
        f"--volume={workdir}:{workdir}:rw",
        f"--workdir={workdir}",
        f"--env=HOME={workdir}",
        *(f"--volume={p}:{p}:ro" for p in spec.readable_paths),
        *_limits(spec),
        *(f"--env={k}={v}" for k, v in (env or {}).items()),
        *(f"--device={d}" for d in devices),
        "--network=none",
    ]
    is_rootfs = os.path.isdir(image_or_rootfs)
    cmd += ["--rootfs", image_or_rootfs] if is_rootfs else [image_or_rootfs]
    return [*cmd, *argv]


__all__ = [
    "container_name",
    "default_profile_path",
    "podman_base",
    "podman_command",
    "podman_home",
    "seccomp_profile",
    "write_seccomp_profile",
]
