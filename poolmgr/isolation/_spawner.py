"""The compiled spawner: `_spawner.c` built once into a cache only its owner can write, and the plan as its argv.

    helper = ensure_spawner()                          # the binary, or None: the Python trampoline is used
    argv2 = [str(helper), *plan_argv(plan), "--", *argv]

The helper applies the same plan as `_trampoline.py` in the same order and execs the engine in the same pid,
without starting an interpreter (~1 ms instead of ~40). It runs as root before dropping privileges, so a
binary or directory not owned by us or writable by group/other is never used: it is rebuilt. The build goes
to a temporary file in the cache directory and is renamed into place, so concurrent builders race safely.
Without a working C compiler (`$CC`, else `cc`), or with POOL_MANAGERD_SPAWNER=python, engines start
through the Python trampoline, with the same layers.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("_spawner.c")
CFLAGS = ("-std=gnu11", "-O2", "-Wall", "-Wextra")
BINARY = "poolmgr-spawn"
CHOICE_VAR = "POOL_MANAGERD_SPAWNER"  # "python": always the Python trampoline; "auto" (default): the helper
ROOT_CACHE = Path("/var/cache/poolmgr/spawner")
COMPILE_TIMEOUT_S = 120

log = logging.getLogger(__name__)


class SpawnerUnavailable(Exception):
    """The helper cannot be built or trusted here; str() says why (the Python trampoline is used instead)."""


@dataclass(frozen=True)
class SpawnerState:
    """What `doctor` shows: the helper (built, or buildable here), or why engines start through the trampoline."""

    usable: bool
    path: Path | None
    detail: str


def plan_argv(plan: Mapping[str, Any]) -> list[str]:
    """The plan `prepare` builds as the helper's KEY=VALUE tokens. A layer the trampoline would skip (a falsy
    value) gets no token; `gid` goes with `uid`, as the trampoline reads it."""
    tokens = [f"cgroup={path}" for path in plan.get("cgroups") or ()]
    tokens += [f"rlimit={res},{soft},{hard}" for res, soft, hard in plan.get("rlimits") or ()]
    tokens += [f"{key}=1" for key in ("bounding", "caps") if plan.get(key)]
    if plan.get("uid") is not None:
        tokens.append(f"uid={plan['uid']}")
        if plan.get("gid") is not None:  # without it the helper refuses the plan (exit 126), as the trampoline does
            tokens.append(f"gid={plan['gid']}")
    if plan.get("workdir"):
        tokens.append(f"workdir={plan['workdir']}")
    if plan.get("nnp"):
        tokens.append("nnp=1")
    if landlock := plan.get("landlock"):
        tokens.append(f"landlock={landlock['abi']},{landlock['fs']},{landlock['net']},{landlock['scoped']}")
        tokens += [f"llpath={allowed},{path}" for path, allowed in landlock["paths"]]
    if plan.get("seccomp"):
        tokens.append(f"seccomp={plan['seccomp']}")
    return tokens


def cache_root() -> Path:
    """/var/cache/poolmgr/spawner as root, else ${XDG_CACHE_HOME:-~/.cache}/poolmgr/spawner (SpawnerUnavailable
    without a home)."""
    if os.geteuid() == 0:
        return ROOT_CACHE
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "poolmgr" / "spawner"
    try:
        home = Path.home()
    except (RuntimeError, KeyError):  # a uid with no passwd entry and no HOME
        raise SpawnerUnavailable("no cache directory: set XDG_CACHE_HOME or HOME") from None
    return home / ".cache" / "poolmgr" / "spawner"


def compiler() -> list[str]:
    return shlex.split(os.environ.get("CC", "")) or ["cc"]


def build_key(source: bytes, flags: Sequence[str] = CFLAGS) -> str:
    return hashlib.sha256(source + "\0".join(flags).encode()).hexdigest()[:16]


def forced_python() -> bool:
    return os.environ.get(CHOICE_VAR, "auto") == "python"


def ensure_spawner() -> Path | None:
    """The compiled helper, built on first use; None where it cannot be (one warning line says why) or with
    POOL_MANAGERD_SPAWNER=python: then engines start through the Python trampoline."""
    state = choose_spawner()
    if state.path is not None and not state.path.exists():  # removed under us (a cache cleaner): build it again
        choose_spawner.cache_clear()
        state = choose_spawner()
    return state.path


@functools.cache
def choose_spawner() -> SpawnerState:
    """Build (or find) the helper, once per process: every later call gives the same answer."""
    if forced_python():  # (said by the caller: serve's log line, setup's output)
        return SpawnerState(False, None, f"Python trampoline: {CHOICE_VAR}=python")
    try:
        binary = build_spawner(cache_root(), cc=compiler())
    except SpawnerUnavailable as exc:
        log.warning("engine spawner: %s; engines start through the Python trampoline (same layers, ~40 ms "
                    "more a spawn)", exc)  # fmt: skip
        return SpawnerState(False, None, f"Python trampoline: {exc}")
    return SpawnerState(True, binary, f"compiled helper {binary}")


def build_spawner(root: Path, *, cc: Sequence[str]) -> Path:
    """The helper for this source under `root`/<key>/, compiled with `cc` unless a trusted one is there.
    Raises SpawnerUnavailable."""
    try:
        source = SOURCE.read_bytes()
    except OSError as exc:
        raise SpawnerUnavailable(f"cannot read {SOURCE}: {exc.strerror}") from None
    directory = _own_directory(root.absolute() / build_key(source))
    binary = directory / BINARY
    if (problem := _binary_problem(binary)) is not None:
        if os.path.lexists(binary):
            log.warning("engine spawner: refusing %s (%s): rebuilding it", binary, problem)
            _remove(binary)
        _compile(source, cc, directory)
    _check_runs(binary)
    return binary


def spawner_state() -> SpawnerState:
    """Which spawner the next start would use, building and changing nothing (for `doctor`)."""
    if forced_python():
        return SpawnerState(False, None, f"Python trampoline: {CHOICE_VAR}=python")
    try:
        binary = cache_root().absolute() / build_key(SOURCE.read_bytes()) / BINARY
    except OSError as exc:
        return SpawnerState(False, None, f"Python trampoline: cannot read {SOURCE}: {exc.strerror}")
    except SpawnerUnavailable as exc:
        return SpawnerState(False, None, f"Python trampoline: {exc}")
    problem = _binary_problem(binary) or _untrusted_ancestor(binary.parent.resolve())
    if problem is None:
        return SpawnerState(True, binary, f"compiled helper {binary}")
    cc = compiler()
    if shutil.which(cc[0]) is None:
        return SpawnerState(False, None, f"Python trampoline: no C compiler ({cc[0]} not found; set CC)")
    why = "not built yet" if not os.path.lexists(binary) else f"{binary}: {problem}"
    return SpawnerState(True, None, f"{why}: `poolmgr setup` or the next serve compiles it with {cc[0]}")


def _untrusted_ancestor(path: Path) -> str | None:
    """Why `path` or a directory above it lets someone else swap what is inside; None when none does: each is
    a real directory (no symlink), owned by root or us, writable by no one else unless sticky (like /tmp)."""
    me = os.geteuid()
    for directory in (path, *path.parents):
        try:
            st = directory.lstat()
        except OSError as exc:
            return f"{directory}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{directory} is not a directory"
        if st.st_uid not in (0, me):
            return f"{directory} is owned by uid {st.st_uid}"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"{directory} is writable by group or other (mode {stat.filemode(st.st_mode)})"
    return None


def _binary_problem(binary: Path) -> str | None:
    """Why `binary` must not be run as root; None when it is a regular executable file of ours that no one
    else can write to."""
    try:
        st = binary.lstat()
    except OSError as exc:
        return exc.strerror or "cannot stat"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        return f"writable by group or other (mode {stat.filemode(st.st_mode)})"
    if not st.st_mode & 0o100:
        return "not executable"
    return None


def _own_directory(path: Path) -> Path:
    """`path` (<cache>/<key>) and its parent (<cache>), ours and 0755: one that anyone else could have written
    to is removed and made again. The directories above are made if missing and must be safe (symlinks
    resolved); SpawnerUnavailable otherwise."""
    base = path.parent.parent
    try:
        for directory in (*reversed(base.parents), base):
            if not directory.exists():
                _mkdir(directory)
        base = base.resolve(strict=True)
        if why := _untrusted_ancestor(base):
            raise SpawnerUnavailable(f"cache {path} is not safe: {why}")
        cache, key = base / path.parent.name, base / path.parent.name / path.name
        _ensure_private_dir(cache)
        _ensure_private_dir(key)
    except OSError as exc:
        raise SpawnerUnavailable(f"cache {path}: {exc.strerror or exc}") from None
    return key


def _mkdir(directory: Path) -> None:
    try:
        os.mkdir(directory, 0o755)
    except FileExistsError:  # a concurrent builder made it
        return
    os.chmod(directory, 0o755)  # whatever the umask


def _private_dir(directory: Path) -> bool:
    """A real directory of ours that no one else can write to (absent: False)."""
    try:
        st = directory.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _ensure_private_dir(directory: Path) -> None:
    if not os.path.lexists(directory):
        _mkdir(directory)
    if _private_dir(directory):
        return
    log.warning("engine spawner: %s is not a directory only we can write to: making it again", directory)
    _remove(directory)
    _mkdir(directory)
    if not _private_dir(directory):
        raise SpawnerUnavailable(f"cache {directory} is not ours")


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as exc:
        raise SpawnerUnavailable(f"cannot remove the untrusted {path}: {exc.strerror or exc}") from None


def _compile(source: bytes, cc: Sequence[str], directory: Path) -> None:
    """Compile `source` into a temporary file beside the binary, then rename it into place (atomic)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{BINARY}.", dir=directory)
    except OSError as exc:
        raise SpawnerUnavailable(f"cache {directory}: {exc.strerror or exc}") from None
    os.close(fd)
    cmd = [*cc, *CFLAGS, "-x", "c", "-o", tmp, "-"]  # the very bytes hashed into the key, read from stdin
    try:
        try:
            proc = subprocess.run(cmd, input=source, capture_output=True, timeout=COMPILE_TIMEOUT_S, check=False)
        except OSError as exc:
            raise SpawnerUnavailable(f"C compiler {shlex.join(cc)}: {exc.strerror or exc}") from None
        except subprocess.TimeoutExpired:
            raise SpawnerUnavailable(f"{shlex.join(cc)} took more than {COMPILE_TIMEOUT_S} s") from None
        if proc.returncode != 0:
            first = proc.stderr.decode(errors="replace").strip().splitlines()[:1]
            raise SpawnerUnavailable(f"{shlex.join(cc)} failed (exit {proc.returncode}): {''.join(first)}")
        os.chmod(tmp, 0o755)
        os.rename(tmp, directory / BINARY)
    except OSError as exc:
        raise SpawnerUnavailable(f"installing {directory / BINARY}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check_runs(binary: Path) -> None:
    """Run it once without arguments (it answers its usage line, exit 126): a cache on a noexec mount, or a
    binary that does not run here, must not fail every engine start later."""
    try:
        proc = subprocess.run([str(binary)], capture_output=True, timeout=10, check=False, env={})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SpawnerUnavailable(f"cannot run {binary}: {getattr(exc, 'strerror', None) or exc}") from None
    if proc.returncode != 126 or not proc.stderr.startswith(b"poolmgr-isolation: usage:"):
        raise SpawnerUnavailable(f"{binary} does not run as expected (exit {proc.returncode})")


__all__ = [
    "BINARY",
    "CHOICE_VAR",
    "SOURCE",
    "SpawnerState",
    "SpawnerUnavailable",
    "build_spawner",
    "cache_root",
    "choose_spawner",
    "ensure_spawner",
    "plan_argv",
    "spawner_state",
]
