"""`ContainerLauncher`: the process launcher, plus engines that run in a detached rootless podman container.

A container's engine is, seen from the host, one more process: `podman run --detach` returns once it runs, and
`podman inspect` names its host pid. From there it is handled exactly as a process engine is — named by (pid,
start time), its exit seen at once through a pidfd (it is conmon's child, not ours), stopped by TERM → KILL of
its process group (the engine is the container's init: when it dies the kernel ends the rest) — and it outlives
poolmgr as a process engine does. Only its exit status differs: conmon keeps it, so it is read with `podman
inspect` (code, signal as 128+N, OOM) before the container is removed.

What the launcher must know to ask podman about a container (the engine user's `podman` command line and the
container's name) is written at spawn to a root-owned record in `records_dir`, found again by (pid, start time)
after a restart of poolmgr: never read from the engine's own memory (its environment), which it could forge.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from poolmgr.engines._logs import rotate_log
from poolmgr.engines._process import ExitInfo, LaunchRequest, ProcessLauncher, SpawnedEngine
from poolmgr.engines._procfs import read_start_time
from poolmgr.errors import EngineError

logger = logging.getLogger(__name__)

_PODMAN_TIMEOUT_S = 120.0
_STATUS_WAIT_S = 5.0  # conmon writes the exit status just after the engine ends


@dataclass(frozen=True)
class ContainerRecord:
    """How to ask podman about one container: the engine user's `podman --root=…` prefix and its name."""

    prefix: tuple[str, ...]
    name: str
    pid: int = 0
    start_time: int = 0


def split_podman_run(argv: list[str]) -> ContainerRecord | None:
    """The record of a detached `… podman --root=… run --detach … --name=N …` command line; None for others."""
    if "podman" not in argv or "run" not in argv or "--detach" not in argv:
        return None
    run = argv.index("run", argv.index("podman"))
    names = [a.split("=", 1)[1] for a in argv[run:] if a.startswith("--name=")]
    return ContainerRecord(tuple(argv[:run]), names[0]) if names else None


def _podman(record: ContainerRecord, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*record.prefix, *args],
        capture_output=True,
        text=True,
        timeout=_PODMAN_TIMEOUT_S,
        cwd="/",
        stdin=subprocess.DEVNULL,
        check=False,
    )


def inspect_state(record: ContainerRecord) -> dict[str, object] | None:
    """The container's `State` (Status, Pid, ExitCode, OOMKilled, …); None when podman does not know it."""
    out = _podman(record, "inspect", "--type=container", "--format={{json .State}}", record.name)
    if out.returncode != 0:
        return None
    try:
        state = json.loads(out.stdout)
    except json.JSONDecodeError:
        return None
    return state if isinstance(state, dict) else None


def exit_of(state: dict[str, object] | None) -> ExitInfo:
    """conmon's view of the exit: a code above 128 is a signal (as runc reports it), OOMKilled the cgroup's."""
    if state is None:
        return ExitInfo()
    code = state.get("ExitCode")
    oom = state.get("OOMKilled") is True
    if not isinstance(code, int):
        return ExitInfo(host_oom=oom)
    if 128 < code < 128 + 65:
        return ExitInfo(None, code - 128, oom)
    return ExitInfo(code, None, oom)


def container_exit(record: ContainerRecord) -> ExitInfo:
    """Wait (briefly) until podman has the exit status, read it, remove the container. Blocking."""
    deadline = time.monotonic() + _STATUS_WAIT_S
    state = inspect_state(record)
    while state is not None and state.get("Status") in ("running", "stopping") and time.monotonic() < deadline:
        time.sleep(0.05)
        state = inspect_state(record)
    info = exit_of(state)
    removed = _podman(record, "rm", "--force", "--ignore", record.name)
    if removed.returncode != 0:
        logger.warning("podman rm %s failed: %s", record.name, removed.stderr.strip()[-300:])
    return info


class ContainerLauncher(ProcessLauncher):
    """A `Launcher` for process engines and container engines alike (see the module docstring)."""

    def __init__(self, records_dir: Path) -> None:
        super().__init__()
        self.records_dir = Path(records_dir)
        self._records: dict[tuple[int, int], ContainerRecord] = {}

    # -- spawning ---------------------------------------------------------------------------------------

    def spawn(self, req: LaunchRequest) -> SpawnedEngine:
        argv, env = list(req.argv), dict(req.env)
        if req.wrap is not None:
            argv, env = req.wrap(argv, env)
        record = split_podman_run(argv)
        if record is None:
            return super().spawn(replace(req, argv=argv, env=env, wrap=None))
        offset = self._start(req, argv, env)
        state = inspect_state(record) or {}
        pid = state.get("Pid")
        start_time = read_start_time(pid) if isinstance(pid, int) and pid > 0 else None
        if not isinstance(pid, int) or start_time is None:
            info = container_exit(record)
            raise EngineError(f"container {record.name} {info.describe()} at once (see the pool's log)")
        record = ContainerRecord(record.prefix, record.name, pid, start_time)
        self._remember(record)
        logger.info("started container %s: engine pid %s", record.name, pid, extra={"pool_id": req.pool_id})
        with contextlib.suppress(RuntimeError):
            self._watch(pid, start_time)
        return SpawnedEngine(pid, start_time, req.log_path, offset, tuple(argv))

    def _start(self, req: LaunchRequest, argv: list[str], env: dict[str, str]) -> int:
        """Run `podman run --detach` with its output (and, through conmon, the engine's) going to the log."""
        req.log_path.parent.mkdir(parents=True, exist_ok=True)
        rotate_log(req.log_path, max_bytes=req.log_max_bytes, keep=req.log_keep)
        fd = os.open(req.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
            os.write(fd, f"--- poolmgr {stamp}: spawn {shlex.join(argv)}\n".encode())
            offset = os.fstat(fd).st_size
            try:
                done = subprocess.run(
                    argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, cwd="/", env=env,
                    start_new_session=True, timeout=_PODMAN_TIMEOUT_S, check=False,
                )  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise EngineError(f"cannot start the container: {exc}") from None
        finally:
            os.close(fd)
        if done.returncode != 0:
            raise EngineError(f"podman run exited with code {done.returncode} (see the pool's log)")
        return offset

    # -- records ----------------------------------------------------------------------------------------

    def _record_path(self, name: str) -> Path:
        return self.records_dir / f"{name}.json"

    def _remember(self, record: ContainerRecord) -> None:
        self._records[(record.pid, record.start_time)] = record
        self.records_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        path = self._record_path(record.name)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"prefix": list(record.prefix), "name": record.name, "pid": record.pid,
                                   "start_time": record.start_time}), encoding="utf-8")  # fmt: skip
        os.replace(tmp, path)

    def record_for(self, pid: int, start_time: int) -> ContainerRecord | None:
        """The container whose engine is (pid, start_time): from memory, else from the records on disk."""
        key = (pid, start_time)
        if key in self._records:
            return self._records[key]
        with contextlib.suppress(OSError):
            for path in self.records_dir.glob("*.json"):
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    data = json.loads(path.read_text(encoding="utf-8"))
                    if (data["pid"], data["start_time"]) == key:
                        self._records[key] = ContainerRecord(tuple(data["prefix"]), data["name"], *key)
                        return self._records[key]
        return None

    def _forget(self, record: ContainerRecord) -> None:
        self._records.pop((record.pid, record.start_time), None)
        with contextlib.suppress(OSError, ValueError):
            path = self._record_path(record.name)
            if json.loads(path.read_text(encoding="utf-8")).get("pid") == record.pid:
                path.unlink()

    def _ended(self, record: ContainerRecord) -> ExitInfo:
        info = container_exit(record)
        self._forget(record)
        return info

    # -- watching ---------------------------------------------------------------------------------------

    def _status_reader(self, pid: int, start_time: int) -> Callable[[], ExitInfo] | None:
        record = self.record_for(pid, start_time)
        return None if record is None else functools.partial(self._ended, record)


__all__ = ["ContainerLauncher", "ContainerRecord", "container_exit", "exit_of", "split_podman_run"]
