"""The engine's user and group: resolving names to ids, and creating the dedicated system user."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import shutil
import signal
import subprocess
from pathlib import Path

from poolmgr.errors import IsolationError

DEFAULT_ENGINE_USER = "poolmgr-engine"
_NOLOGIN_SHELLS = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")

log = logging.getLogger(__name__)


def resolve_uid(user: str | int) -> tuple[int, int]:
    """(uid, primary gid) of a user name or numeric id; a numeric id with no passwd entry keeps gid = uid."""
    try:
        entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError:
        if isinstance(user, int):
            return user, user
        raise IsolationError(f"engine user {user!r} does not exist (run `poolmgr setup` to create it)") from None
    return entry.pw_uid, entry.pw_gid


def resolve_gid(group: str | int) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise IsolationError(f"engine group {group!r} does not exist") from None


def resolve_ids(user: str | int | None, group: str | int | None) -> tuple[int | None, int | None]:
    """(uid, gid) to switch to. The group is always explicit: the user's primary group unless one is named."""
    if user is None:
        return None, resolve_gid(group) if group is not None else None
    uid, primary_gid = resolve_uid(user)
    return uid, resolve_gid(group) if group is not None else primary_gid


def _nologin_shell() -> str:
    return next((s for s in _NOLOGIN_SHELLS if os.path.exists(s)), _NOLOGIN_SHELLS[0])


def ensure_engine_user(name: str = DEFAULT_ENGINE_USER) -> tuple[int, int]:
    """(uid, gid) of the engine's system user, created with its own group when root and it is missing."""
    try:
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise IsolationError(f"engine user {name!r} does not exist and only root can create it")
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    # --user-group makes the group explicit (Debian's default, not every distro's).
    argv = [useradd, "--system", "--no-create-home", "--shell", _nologin_shell(), "--user-group", name]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0 and proc.returncode != 9:  # 9: created meanwhile by someone else
        raise IsolationError(f"useradd {name!r} failed ({proc.returncode}): {proc.stderr.strip()}")
    entry = pwd.getpwnam(name)
    log.info("created engine user %s (uid %s, gid %s)", name, entry.pw_uid, entry.pw_gid)
    return entry.pw_uid, entry.pw_gid


SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))
SUBID_COUNT = 65_536
_SUBID_FLOOR = 100_000


def _subid_ranges(path: Path) -> dict[str, tuple[int, int]]:
    ranges: dict[str, tuple[int, int]] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text(encoding="utf-8").splitlines():
            name, _, rest = line.partition(":")
            start, _, count = rest.partition(":")
            if start.isdigit() and count.isdigit():
                ranges[name] = (int(start), int(count))
    return ranges


def ensure_subids(name: str) -> tuple[int, int]:
    """(first, count) of `name`'s subordinate uids and gids (rootless podman maps the container's ids onto them),
    added with usermod past every range already given when it has none."""
    have = [_subid_ranges(p) for p in SUBID_FILES]
    if all(name in r for r in have):
        return have[0][name]
    start = max([_SUBID_FLOOR, *(s + c for r in have for s, c in r.values())])
    argv = [shutil.which("usermod") or "/usr/sbin/usermod", "--add-subuids", f"{start}-{start + SUBID_COUNT - 1}",
            "--add-subgids", f"{start}-{start + SUBID_COUNT - 1}", name]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise IsolationError(f"usermod {name!r} (subordinate ids) failed ({proc.returncode}): {proc.stderr.strip()}")
    log.info("gave %s subordinate ids %s-%s", name, start, start + SUBID_COUNT - 1)
    _end_podman_pause(pwd.getpwnam(name).pw_uid)
    return start, SUBID_COUNT


def _end_podman_pause(uid: int) -> None:
    """Rootless podman keeps its user namespace in a pause process; one made before the subordinate ids existed
    keeps the old single-id mapping (runc then fails: `chown …/exec.fifo: invalid argument`). End it, as
    `podman system migrate` would: the next podman makes a namespace with the new ids."""
    for path in (Path(f"/tmp/podman-run-{uid}"), Path(f"/run/user/{uid}")):
        with contextlib.suppress(OSError, ValueError):
            pid = int((path / "libpod" / "tmp" / "pause.pid").read_text(encoding="ascii").strip())
            if os.stat(f"/proc/{pid}").st_uid == uid:
                os.kill(pid, signal.SIGKILL)


__all__ = [
    "DEFAULT_ENGINE_USER",
    "SUBID_COUNT",
    "ensure_engine_user",
    "ensure_subids",
    "resolve_gid",
    "resolve_ids",
    "resolve_uid",
]
