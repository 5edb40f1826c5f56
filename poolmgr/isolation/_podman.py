"""Containers: a rootless podman command for an engine, with the same seccomp deny-list as an OCI profile.

Rootless: when poolmgr is root the command starts with `setpriv` to the engine user, so podman itself never
runs as root. The container gets no capabilities, no_new_privs, poolmgr's seccomp profile, a read-only root,
the workdir as its only writable mount, the readable paths mounted read-only at the same place, and no network
at all (`--network=none`, and the profile refuses IP sockets): the engine serves on a unix socket in its
workdir, which is mounted at the same path, so poolmgr reaches it there exactly as it does outside a container.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from poolmgr.errors import IsolationError
from poolmgr.isolation import _cgroup
from poolmgr.isolation._env import DEFAULT_PATH
from poolmgr.isolation._seccomp import ARG_RULES, DENIED_SYSCALLS, ENOSYS_SYSCALLS
from poolmgr.isolation._spec import IsolationSpec
from poolmgr.isolation._users import resolve_ids

SECCOMP_PROFILE_NAME = "poolmgr-seccomp.json"
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


def _clean_env(workdir: Path) -> list[str]:
    """podman gets no secret either: a fresh env whose HOME (podman's config and storage) is the workdir.

    No XDG_RUNTIME_DIR: podman then keeps its run state in /tmp/podman-run-UID (a runroot under the workdir
    would pass podman's 50-character limit)."""
    return ["env", "-i", f"PATH={DEFAULT_PATH}", f"HOME={workdir}"]


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
) -> list[str]:
    """The full command line; write the profile first with `write_seccomp_profile(default_profile_path(spec))`.

    image_or_rootfs: an image name, or an existing directory used as `--rootfs`.
    """
    profile = seccomp_profile_path or default_profile_path(spec)
    workdir = spec.workdir.absolute()
    cmd = [
        *_rootless_prefix(spec),
        *_clean_env(workdir),
        "podman",
        f"--root={workdir / '.containers' / 'storage'}",
        "run",
        *_runtime(),
        "--rm",
        f"--name=poolmgr-{spec.pool_id}",
        *_userns(spec),
        "--cap-drop=all",
        "--security-opt=no-new-privileges",
        f"--security-opt=seccomp={profile}",
        "--read-only",
        f"--volume={workdir}:{workdir}:rw",
        f"--workdir={workdir}",
        f"--env=HOME={workdir}",
        *(f"--volume={p}:{p}:ro" for p in spec.readable_paths),
        *_limits(spec),
        "--network=none",
    ]
    is_rootfs = os.path.isdir(image_or_rootfs)
    cmd += ["--rootfs", image_or_rootfs] if is_rootfs else [image_or_rootfs]
    return [*cmd, *argv]


__all__ = ["default_profile_path", "podman_command", "seccomp_profile", "write_seccomp_profile"]
