"""The process launcher: the OS seam through which engines are spawned, watched and stopped (Linux).

- An engine runs in its own session (`start_new_session`), so it outlives poolmgr and its process group
  holds every child it forks. stdout and stderr go to the pool's log file, opened for append.
- An engine is named by (pid, start time) — never by pid alone: a pid whose start time differs belongs to
  another program and is never signalled.
- Exits are seen at once, without polling: a pidfd (`os.pidfd_open`, Linux >= 5.3) becomes readable when the
  process ends, for our children and for engines adopted after a poolmgr restart alike. Our own children are
  reaped through the pidfd (`os.waitid(P_PIDFD)`), which yields their code or signal; an adopted engine's
  status belongs to its parent, so it is unknown (None, None) unless the kernel log names it as an OOM victim.
- Async methods of one launcher must be used from one event loop at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from poolmgr.engines import _procfs
from poolmgr.engines._logs import DEFAULT_LOG_KEEP, DEFAULT_LOG_MAX_BYTES, redact_argv, rotate_log
from poolmgr.errors import EngineError

logger = logging.getLogger(__name__)

WrapFn = Callable[[list[str], dict[str, str]], tuple[list[str], dict[str, str]]]
_EXIT_CACHE_SIZE = 256
_LEFTOVER_KILL_WAIT_S = 2.0


@dataclass(frozen=True)
class LaunchRequest:
    """What to run. `env` is the engine's complete environment (nothing is inherited); `wrap`, when given,
    rewrites (argv, env) just before the spawn — the isolation layer's hook."""

    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    cwd: Path | None = None
    wrap: WrapFn | None = None
    pool_id: str = ""
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES
    log_keep: int = DEFAULT_LOG_KEEP


@dataclass(frozen=True)
class SpawnedEngine:
    """`log_offset`: where this run's output starts in `log_path` (past poolmgr's header line)."""

    pid: int
    start_time: int
    log_path: Path
    log_offset: int
    argv: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class ExitInfo:
    """How an engine ended. Both `code` and `signal` are None when poolmgr is not its parent and nothing
    else told; `host_oom` is True when the kernel's OOM killer (not a plain SIGKILL) ended it."""

    code: int | None = None
    signal: int | None = None
    host_oom: bool = False

    def describe(self) -> str:
        if self.host_oom:
            return "killed by the kernel OOM killer (host out of memory)"
        if self.signal is not None:
            return f"killed by signal {_signame(self.signal)}"
        if self.code is not None:
            return f"exited with code {self.code}"
        return "exited (status unknown: not a child of this poolmgr)"


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


class Launcher(Protocol):
    def spawn(self, req: LaunchRequest) -> SpawnedEngine: ...

    def read_start_time(self, pid: int) -> int | None: ...

    def is_alive(self, pid: int, start_time: int) -> bool: ...

    async def wait_exit(self, pid: int, start_time: int) -> ExitInfo: ...

    async def stop(self, pid: int, start_time: int, grace_s: float) -> ExitInfo: ...

    def close(self) -> None: ...


class _Watch:
    """One pidfd registered with the event loop; its future resolves once with the engine's ExitInfo."""

    def __init__(self, pid: int, start_time: int, pidfd: int, loop: asyncio.AbstractEventLoop) -> None:
        self.pid = pid
        self.start_time = start_time
        self.pidfd = pidfd
        self.loop = loop
        self.future: asyncio.Future[ExitInfo] = loop.create_future()
        self.oom_file = _procfs.memory_cgroup_counter_file(pid)
        self.oom_base = _procfs.read_oom_kill_count(self.oom_file)

    def close(self) -> None:
        if self.pidfd < 0:
            return
        if not self.loop.is_closed():
            self.loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1


class ProcessLauncher:
    """The real launcher (see the module docstring)."""

    def __init__(self) -> None:
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._watches: dict[tuple[int, int], _Watch] = {}
        self._exits: OrderedDict[tuple[int, int], ExitInfo] = OrderedDict()
        self._killed: set[tuple[int, int]] = set()

    # -- spawning ---------------------------------------------------------------------------------------

    def spawn(self, req: LaunchRequest) -> SpawnedEngine:
        """Rotate the log, start the engine in its own session, return its identity. Inside a running event
        loop the exit watch starts at once, so the child is reaped as soon as it ends."""
        argv, env = list(req.argv), dict(req.env)
        if req.wrap is not None:
            argv, env = req.wrap(argv, env)
        if not argv:
            raise EngineError("cannot start an engine: empty command line")
        req.log_path.parent.mkdir(parents=True, exist_ok=True)
        rotate_log(req.log_path, max_bytes=req.log_max_bytes, keep=req.log_keep)
        fd = os.open(req.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
            os.write(fd, f"--- poolmgr {stamp}: spawn {shlex.join(redact_argv(argv))}\n".encode())
            offset = os.fstat(fd).st_size
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=fd,
                    stderr=fd,
                    cwd=req.cwd,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                os.write(fd, f"--- poolmgr {stamp}: spawn failed: {exc.strerror or exc}\n".encode())
                raise EngineError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        self._children[popen.pid] = popen
        # Our unreaped child cannot vanish from /proc, so its start time is always there to read.
        start_time = _procfs.read_start_time(popen.pid)
        if start_time is None:
            raise EngineError(f"spawned pid {popen.pid} has no /proc entry")
        logger.info("spawned engine pid %s: %s", popen.pid, argv[0], extra={"pool_id": req.pool_id})
        with contextlib.suppress(RuntimeError):
            self._watch(popen.pid, start_time)
        return SpawnedEngine(popen.pid, start_time, req.log_path, offset, tuple(argv))

    # -- identity ---------------------------------------------------------------------------------------

    def read_start_time(self, pid: int) -> int | None:
        return _procfs.read_start_time(pid)

    def is_alive(self, pid: int, start_time: int) -> bool:
        return _procfs.is_alive(pid, start_time)

    # -- watching ---------------------------------------------------------------------------------------

    async def wait_exit(self, pid: int, start_time: int) -> ExitInfo:
        """Wait until the engine (pid, start_time) has ended and say how. Returns at once for one that is
        already gone. Cancelling a waiter does not disturb other waiters."""
        return await asyncio.shield(self._watch(pid, start_time))

    def _watch(self, pid: int, start_time: int) -> asyncio.Future[ExitInfo]:
        loop = asyncio.get_running_loop()
        key = (pid, start_time)
        cached = self._exits.get(key)
        if cached is not None:
            return _done(loop, cached)
        watch = self._watches.get(key)
        if watch is not None:
            if watch.loop is loop:
                return watch.future
            watch.close()  # left behind by an event loop that has ended
            del self._watches[key]
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return self._gone_before_watch(loop, key)
        stat = _procfs.read_stat(pid)
        if stat is None or stat.start_time != start_time:
            os.close(pidfd)  # the number now belongs to another program (or to nobody)
            return _done(loop, self._exits.get(key) or ExitInfo())
        watch = _Watch(pid, start_time, pidfd, loop)
        self._watches[key] = watch
        loop.add_reader(pidfd, self._on_exit, watch)
        return watch.future

    def _gone_before_watch(self, loop: asyncio.AbstractEventLoop, key: tuple[int, int]) -> asyncio.Future[ExitInfo]:
        # Not our child (ours stay until reaped): it ended while nobody watched, e.g. while poolmgr was down.
        def check() -> ExitInfo:
            oom = bool(_procfs.kmsg_reports_oom_kill(*key))
            return ExitInfo(None, signal.SIGKILL if oom else None, oom)

        check = self._status_reader(*key) or check

        def record(fut: asyncio.Future[ExitInfo]) -> None:
            if not fut.cancelled() and fut.exception() is None:
                self._record(key, fut.result())

        future = loop.run_in_executor(None, check)
        future.add_done_callback(record)
        return future

    def _status_reader(self, pid: int, start_time: int) -> Callable[[], ExitInfo] | None:
        """For a subclass whose engines' exit status someone else keeps (a container's: conmon): a blocking
        function that reads it once the engine has ended. None: the status is the kernel's (waitid, OOM)."""
        return None

    def _on_exit(self, watch: _Watch) -> None:
        code, sig = self._reap(watch)
        watch.close()
        key = (watch.pid, watch.start_time)
        self._watches.pop(key, None)
        own_kill = key in self._killed
        self._killed.discard(key)
        reader = self._status_reader(*key)
        if reader is not None:
            self._read_status(watch, reader)
            return
        needs_oom_check = not own_kill and (sig == signal.SIGKILL or (code is None and sig is None))
        if not needs_oom_check:
            self._finish(watch, ExitInfo(code, sig, False))
            return

        def check() -> ExitInfo:
            # The kernel log names the victim exactly; the cgroup counter is the fallback where it is unreadable.
            oom = _procfs.kmsg_reports_oom_kill(watch.pid, watch.start_time)
            if oom is None:
                after = _procfs.read_oom_kill_count(watch.oom_file)
                oom = watch.oom_base is not None and after is not None and after > watch.oom_base
            if sig is None and not oom:
                return ExitInfo(code, None, False)
            return ExitInfo(code, signal.SIGKILL, oom)

        def done(fut: asyncio.Future[ExitInfo]) -> None:
            if fut.cancelled():
                return
            self._finish(watch, fut.result() if fut.exception() is None else ExitInfo(code, sig, False))

        watch.loop.run_in_executor(None, check).add_done_callback(done)

    def _read_status(self, watch: _Watch, reader: Callable[[], ExitInfo]) -> None:
        def done(fut: asyncio.Future[ExitInfo]) -> None:
            if not fut.cancelled():
                self._finish(watch, fut.result() if fut.exception() is None else ExitInfo())

        watch.loop.run_in_executor(None, reader).add_done_callback(done)

    def _reap(self, watch: _Watch) -> tuple[int | None, int | None]:
        popen = self._children.pop(watch.pid, None)
        if popen is None:
            return None, None
        try:
            info = os.waitid(os.P_PIDFD, watch.pidfd, os.WEXITED)
        except ChildProcessError:
            return None, None
        if info is None:
            return None, None
        if info.si_code == os.CLD_EXITED:
            popen.returncode = info.si_status
            return info.si_status, None
        popen.returncode = -info.si_status
        return None, info.si_status

    def _finish(self, watch: _Watch, info: ExitInfo) -> None:
        self._record((watch.pid, watch.start_time), info)
        if not watch.future.done():
            watch.future.set_result(info)

    def _record(self, key: tuple[int, int], info: ExitInfo) -> ExitInfo:
        self._exits[key] = info
        self._exits.move_to_end(key)
        while len(self._exits) > _EXIT_CACHE_SIZE:
            self._exits.popitem(last=False)
        return info

    # -- stopping ---------------------------------------------------------------------------------------

    async def stop(self, pid: int, start_time: int, grace_s: float) -> ExitInfo:
        """SIGTERM the engine's process group, SIGKILL it after `grace_s`, then kill whatever of its group or
        session is left (a grandchild that ignored SIGTERM). Never signals a pid whose start time differs."""
        deadline = time.monotonic() + max(0.0, grace_s)
        future = self._watch(pid, start_time)
        if not future.done() and grace_s <= 0:  # no grace (a hung engine): killed, no SIGTERM first
            if self._signal_group(pid, start_time, signal.SIGKILL):
                self._killed.add((pid, start_time))
        elif not future.done():
            self._signal_group(pid, start_time, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(future), max(0.0, grace_s))
            except TimeoutError:
                if self._signal_group(pid, start_time, signal.SIGKILL):
                    self._killed.add((pid, start_time))
                    logger.warning("engine pid %s ignored SIGTERM for %.1f s: sent SIGKILL", pid, grace_s)
        info = await asyncio.shield(future)
        await self._kill_leftovers(pid, start_time, deadline)
        return info

    def _group_is_ours(self, pid: int, start_time: int) -> bool:
        # While the leader (ours, alive or zombie) exists, or after it is gone, group `pid` can only hold our
        # engine's processes: the kernel hands out no pid that is still in use as a group id. Once the number
        # belongs to a process with another start time, the group may be someone else's.
        stat = _procfs.read_stat(pid)
        return stat is None or stat.start_time == start_time

    def _signal_group(self, pid: int, start_time: int, sig: int) -> bool:
        if not self._group_is_ours(pid, start_time):
            logger.warning("not signalling pid %s: its start time changed (another program)", pid)
            return False
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return False
        return True

    async def _kill_leftovers(self, pid: int, start_time: int, deadline: float) -> None:
        if not self._group_is_ours(pid, start_time):
            return
        while _procfs.group_members(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        leftovers = _procfs.group_members(pid)
        if not leftovers:
            return
        for member in leftovers:
            again = _procfs.read_stat(member.pid)
            if again is not None and again.start_time == member.start_time:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member.pid, signal.SIGKILL)
        logger.warning("killed %d leftover process(es) of engine pid %s", len(leftovers), pid)
        give_up = time.monotonic() + _LEFTOVER_KILL_WAIT_S
        while _procfs.group_members(pid) and time.monotonic() < give_up:
            await asyncio.sleep(0.01)

    def close(self) -> None:
        """Stop watching (engines keep running); pending waiters are cancelled."""
        for watch in list(self._watches.values()):
            watch.close()
            if not watch.future.done() and not watch.loop.is_closed():
                watch.future.cancel()
        self._watches.clear()


def _done(loop: asyncio.AbstractEventLoop, info: ExitInfo) -> asyncio.Future[ExitInfo]:
    fut: asyncio.Future[ExitInfo] = loop.create_future()
    fut.set_result(info)
    return fut


__all__ = ["ExitInfo", "LaunchRequest", "Launcher", "ProcessLauncher", "SpawnedEngine", "WrapFn"]
