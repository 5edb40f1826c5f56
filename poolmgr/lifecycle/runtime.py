"""Starting, watching and stopping one pool's engine: the slow work the reconciler awaits between FSM triggers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable
from pathlib import Path

import httpx

from poolmgr.clock import Clock, SystemClock
from poolmgr.engines import (
    ContainerLauncher,
    EngineAdapter,
    ExitInfo,
    HealthProber,
    Launcher,
    LaunchRequest,
    LlamaCppAdapter,
    LogWatch,
    LogWatcher,
    SlotCounts,
    SpawnedEngine,
    StderrReason,
    WrapFn,
    async_socket_client,
    read_stat,
    resolve_llama_server,
)
from poolmgr.engines.llamacpp import api_key_headers
from poolmgr.errors import ConfigError, EngineError, IsolationError, PreloadFailed
from poolmgr.isolation import PODMAN_DIR
from poolmgr.lifecycle.effects import ReadyInfo
from poolmgr.lifecycle.placing import Placement
from poolmgr.lifecycle.sandbox import container_wrapper, sandbox_wrapper
from poolmgr.lifecycle.traffic import TrafficBoard
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig

log = logging.getLogger("poolmgr.engine")

SPAWN_MARKER = "POOLMGR_POOL"  # in each engine's environment: finds an engine whose pid was never recorded
# ... together with this one (the state directory): another poolmgr's engine of a same-named pool is not ours.
INSTANCE_MARKER = "POOLMGR_INSTANCE"
# Health polling while preloading: fast at first so readiness is seen within ms of the engine's own.
_FAST_POLL_S = 0.002
_FAST_PHASE_S = 2.0
_EXIT_GRACE_S = 2.0
_SLOW_POLL_S = 0.05
ENGINE_SOCKET = "engine.sock"  # in the pool's workdir
_SUN_PATH_MAX = 107  # bytes of a unix socket path (sun_path is 108 with its NUL)
_FAKE_CLOCK_POLL_S = 0.05  # a clock that moves only when told (tests): the prober looks at it this often
_ENGINE_BASE = "http://engine"  # the Host of requests over an engine's socket


class EngineRuntime:
    def __init__(
        self,
        cfg: PoolManagerConfig,
        *,
        launcher: Launcher | None = None,
        adapter: EngineAdapter | None = None,
        clock: Clock | None = None,
        isolate: bool = True,
    ) -> None:
        self.cfg = cfg
        self.log_dir = cfg.state_dir / "logs"
        self.work_dir = cfg.state_dir / "work"
        # Process engines and `runtime = "podman"` ones alike (a container's engine is a host process too).
        self.launcher: Launcher = launcher or ContainerLauncher(self.work_dir / PODMAN_DIR)
        self.adapter: EngineAdapter = adapter or LlamaCppAdapter()
        self.clock: Clock = clock or SystemClock()
        self._prober: HealthProber | None = None
        self._unrecorded: dict[str, list[tuple[int, int]]] | None = None  # /proc looked at once, at start
        self._preloads = 0  # engines being waited for right now (their looks are paced together)
        self._logs = LogWatcher()  # one inotify instance: starting engines' ready lines
        self.isolate = isolate
        self._clients: dict[str, httpx.AsyncClient] = {}
        self.instance = str(cfg.state_dir.absolute())
        self.traffic = TrafficBoard(
            queue_timeout_s=cfg.queue_timeout_ms / 1000.0, socket_for=lambda pool_id: str(self.socket_path(pool_id)),
            activity_clock=self.clock.monotonic,  # idle_unload_s is timed on the lifecycle's clock
        )  # fmt: skip

    def socket_path(self, pool_id: str) -> Path:
        """Where the pool's engine listens: a unix socket in its workdir (engines have no TCP at all)."""
        return (self.work_dir / pool_id / ENGINE_SOCKET).absolute()

    def endpoint_url(self, pool_id: str) -> str:
        """The pool's address for everyone else (the registry's endpoint_url): the node's data plane."""
        return f"{self.cfg.advertised_url}/pools/{pool_id}/engine"

    def client(self, pool_id: str) -> httpx.AsyncClient:
        """An HTTP client over the pool's engine socket (requests go to `_ENGINE_BASE`). No idle connection is
        kept: one would hold one of the engine's few HTTP threads."""
        path = str(self.socket_path(pool_id))
        client = self._clients.get(path)
        if client is None:
            client = self._clients[path] = async_socket_client(path)
        return client

    @property
    def prober(self) -> HealthProber:
        """The health prober of every ready engine (one thread; started on first use)."""
        if self._prober is None:
            cfg = self.cfg
            self._prober = HealthProber(
                interval_s=cfg.health_check_interval_ms / 1000.0, timeout_s=cfg.health_check_timeout_ms / 1000.0,
                threshold=cfg.health_failure_threshold, clock=self.clock.monotonic,
                poll_s=None if isinstance(self.clock, SystemClock) else _FAKE_CLOCK_POLL_S,
            )  # fmt: skip
        return self._prober

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self.launcher.close()
        self._logs.close()
        if self._prober is not None:
            await asyncio.to_thread(self._prober.close)

    def log_path(self, pool_id: str) -> Path:
        return self.log_dir / f"{pool_id}.log"

    def run_log_offset(self, pool_id: str) -> int:
        """Where the newest engine run's output starts in the pool's log: just past the launcher's last
        `--- poolmgr ...: spawn` header (an adopted engine's whole run, its load lines included)."""
        try:
            data = self.log_path(pool_id).read_bytes()
        except OSError:
            return 0
        header = data.rfind(b"\n--- poolmgr ") + 1
        if header == 0 and not data.startswith(b"--- poolmgr "):
            return 0
        end = data.find(b"\n", header)
        return len(data) if end < 0 else end + 1

    def adopted(self, pool_id: str, pid: int, start_time: int, whole_run: bool) -> SpawnedEngine:
        """The handle of an engine that outlived the previous poolmgr. `whole_run`: its log is read from the start
        of its run (a preload: the load lines its stderr verdict is read from), else from now."""
        path = self.log_path(pool_id)
        offset = path.stat().st_size if path.exists() else 0
        if whole_run:
            offset = self.run_log_offset(pool_id)
        return SpawnedEngine(pid=pid, start_time=start_time, log_path=path, log_offset=offset)

    # -- spawn ----------------------------------------------------------------------------------------
    def spawn(self, spec: PoolSpec, placement: Placement) -> SpawnedEngine:
        try:
            binary = resolve_llama_server(self.cfg.llama_server)
        except (EngineError, ConfigError) as exc:
            raise PreloadFailed("binary_missing", str(exc)) from None
        sock = self.socket_path(spec.id)
        if len(os.fsencode(sock)) > _SUN_PATH_MAX:
            raise PreloadFailed(
                "socket_path_too_long",
                f"the engine socket {sock} is longer than {_SUN_PATH_MAX} bytes: use a shorter POOL_MANAGERD_STATE_DIR "
                "or pool id",
            )
        argv = self.adapter.command(spec, binary=binary, model_path=spec.model, socket_path=sock,
                                    gpu_flags=placement.gpu_flags)  # fmt: skip
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), SPAWN_MARKER: spec.id, INSTANCE_MARKER: self.instance,
            **placement.env,
        }  # fmt: skip
        self.log_dir.mkdir(parents=True, exist_ok=True)
        wrap = None
        cwd = self.work_dir / spec.id
        if self.isolate or spec.runtime == "podman":  # a container is never started without its isolation
            try:
                wrap, cwd = self._wrapper(spec, binary, placement)
            except PreloadFailed:
                raise
            except Exception as exc:  # any failure to prepare a layer: never an engine without its isolation
                raise PreloadFailed(
                    "isolation_error", f"cannot isolate the engine: {type(exc).__name__}: {exc}"
                ) from exc
        else:
            cwd.mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)  # a previous engine's: the new one could not bind over it
        req = LaunchRequest(argv=argv, env=env, log_path=self.log_path(spec.id), cwd=cwd, wrap=wrap, pool_id=spec.id)
        try:
            return self.launcher.spawn(req)
        except OSError as exc:
            raise PreloadFailed("spawn_failed", f"cannot start {binary}: {exc.strerror or exc}") from None
        except PreloadFailed:
            raise
        except (EngineError, IsolationError) as exc:  # the launcher's own words (exec failed, say): no worker crash
            # A container whose engine died at once (a corrupt model): the engine's own line says why, as for a
            # process engine that dies while it loads.
            verdict = self.adapter.classify_stderr(_tail(req.log_path), expect_gpu=not spec.is_cpu)
            if spec.runtime == "podman" and verdict is not None:
                raise PreloadFailed(verdict.reason.value, verdict.message) from None
            raise PreloadFailed("spawn_failed", str(exc)) from None

    def _wrapper(self, spec: PoolSpec, binary: Path, placement: Placement) -> tuple[WrapFn, Path]:
        if spec.runtime == "podman":
            return container_wrapper(self.cfg, spec, binary=binary, workdir_root=self.work_dir,
                                     device_uuids=placement.device_uuids)  # fmt: skip
        return sandbox_wrapper(self.cfg, spec, binary=binary, workdir_root=self.work_dir)

    # -- preload --------------------------------------------------------------------------------------
    async def wait_ready(self, spec: PoolSpec, eng: SpawnedEngine, *, expect_gpu: bool) -> ReadyInfo:
        """Until the engine answers /health 200: then its endpoint, version and slots. Raises PreloadFailed
        (the engine is left to the caller to stop) with the engine's own stderr line where it has one. The
        preload timeout runs on the injected clock (`_poll_ready`)."""
        exit_task = asyncio.ensure_future(self.launcher.wait_exit(eng.pid, eng.start_time))
        ready_task = asyncio.ensure_future(self._poll_ready(spec, eng, api_key_headers(list(spec.extra_args))))
        try:
            done, _ = await asyncio.wait({exit_task, ready_task}, return_when=asyncio.FIRST_COMPLETED)
            if ready_task in done and ready_task.exception() is not None and not exit_task.done():
                # A failed readiness check is usually the engine dying: give its exit a moment to be seen, so
                # the failure carries the engine's own reason (model_missing, …) rather than "not ready".
                done |= (await asyncio.wait({exit_task}, timeout=_EXIT_GRACE_S))[0]
        finally:
            for task in (exit_task, ready_task):
                if not task.done():
                    task.cancel()
        if exit_task in done:
            raise self.exit_failure(eng, exit_task.result(), expect_gpu=expect_gpu, when="preload")
        exc = ready_task.exception()
        if exc is not None:
            raise (
                exc
                if isinstance(exc, PreloadFailed)
                else PreloadFailed("health_failure", f"health check failed: {exc}")
            )
        verdict = self.adapter.classify_stderr(self.read_log(eng), expect_gpu=expect_gpu)
        if expect_gpu and verdict is not None and verdict.reason is StderrReason.CPU_SPILLOVER:
            raise PreloadFailed("cpu_spillover", f"engine fell back to the CPU: {verdict.message}")
        return ready_task.result()

    async def _poll_ready(self, spec: PoolSpec, eng: SpawnedEngine, headers: dict[str, str]) -> ReadyInfo:
        """The preload deadline is the injected clock's; the looks at the engine (its socket, then its /health)
        are paced in real time by `_pace`, however many engines start at once. Once the engine has written its
        ready line, /health, /slots and /props are asked together (one wait, not three in a row)."""
        timeout_s = self.cfg.preload_timeout_ms / 1000.0
        deadline = self.clock.monotonic() + timeout_s
        started = time.monotonic()
        self._preloads += 1
        watch: LogWatch | None = None
        try:
            watch = self._logs.watch(eng.log_path, eng.log_offset, self.adapter.ready_markers)
            while (ready := await self._look(spec.id, headers, together=watch is not None and watch.seen)) is None:
                if self.clock.monotonic() >= deadline:
                    raise PreloadFailed("timeout", f"health check failed: engine not ready within {timeout_s:g}s")
                if watch is not None and not watch.seen:
                    await self._until_ready_line(watch)
                else:
                    await asyncio.sleep(self._pace(started))
        finally:
            self._preloads -= 1
            if watch is not None:
                watch.close()
        return ready

    async def _look(self, pool_id: str, headers: dict[str, str], *, together: bool) -> ReadyInfo | None:
        """/health, and once it answers 200 /slots and /props (`together`: all three at once); None: not ready."""
        client, timeout = self.client(pool_id), self.cfg.health_check_timeout_ms / 1000.0

        def fetches() -> tuple[Awaitable[SlotCounts], Awaitable[str]]:
            return (self.adapter.fetch_slots(client, _ENGINE_BASE, timeout, headers),
                    self.adapter.fetch_version(client, _ENGINE_BASE, timeout, headers))  # fmt: skip

        probe = self.adapter.probe_health(client, _ENGINE_BASE, timeout)
        if together:
            health, slots, version = await asyncio.gather(probe, *fetches(), return_exceptions=True)
            if isinstance(health, BaseException) or not health.ok:
                return None
        else:
            if not (await probe).ok:
                return None
            slots, version = await asyncio.gather(*fetches(), return_exceptions=True)
        if isinstance(slots, BaseException):
            raise slots
        known = version if isinstance(version, str) else None  # a build without /props serves all the same
        return ReadyInfo(endpoint_url=self.endpoint_url(pool_id), engine_version=known, slots_total=slots.total)

    async def _until_ready_line(self, watch: LogWatch) -> None:
        """Until the engine writes its ready line (woken by each write to its log: no polling while it loads),
        or a fallback look is due — every 50 ms, and never more than ~500 looks a second across all preloading
        engines — for an engine whose log does not say it (its log verbosity turned down, say)."""
        until = time.monotonic() + max(_SLOW_POLL_S, _FAST_POLL_S * self._preloads)
        while not watch.ready() and (left := until - time.monotonic()) > 0:
            await watch.wait(left)

    def _pace(self, started: float) -> float:
        """Seconds to the next look at a preloading engine: every 2 ms for its first 2 s (a tiny model is served
        ~40 ms after spawn), then every 50 ms — but never more than ~500 looks a second across all the engines
        preloading at once (200 pools starting together look at each of theirs every 0.4 s)."""
        base = _FAST_POLL_S if time.monotonic() - started < _FAST_PHASE_S else _SLOW_POLL_S
        return max(base, _FAST_POLL_S * self._preloads)

    def read_log(self, eng: SpawnedEngine, limit: int = 64_000) -> str:
        try:
            with open(eng.log_path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(eng.log_offset if eng.log_offset <= size else 0)  # rotated in place meanwhile
                data = fh.read()
        except OSError:
            return ""
        return data[-limit:].decode("utf-8", "replace")

    def exit_failure(self, eng: SpawnedEngine, info: ExitInfo, *, expect_gpu: bool, when: str) -> PreloadFailed:
        """Classify an engine's exit: the engine's own stderr line first, then host OOM, signal, code."""
        verdict = self.adapter.classify_stderr(self.read_log(eng), expect_gpu=expect_gpu)
        if info.host_oom:
            return PreloadFailed("host_oom", f"engine killed by the kernel OOM killer during {when}")
        if verdict is not None and verdict.reason in (StderrReason.VRAM_OOM, StderrReason.DRIVER_ERROR):
            return PreloadFailed(verdict.reason.value, verdict.message)
        if verdict is not None and when == "preload":
            return PreloadFailed(verdict.reason.value, verdict.message)
        if info.signal is not None:
            return PreloadFailed("signal", f"engine killed by signal {info.signal} during {when}")
        if info.code is not None:
            return PreloadFailed("exit", f"engine exited with code {info.code} during {when}")
        return PreloadFailed("exit", f"engine exited during {when}")

    # -- running --------------------------------------------------------------------------------------
    async def health_ok(self, pool_id: str) -> tuple[bool, str]:
        timeout = self.cfg.health_check_timeout_ms / 1000.0
        res = await self.adapter.probe_health(self.client(pool_id), _ENGINE_BASE, timeout)
        return res.ok, res.text or res.status.value

    async def stop(self, pid: int, start_time: int, *, grace: bool = True) -> ExitInfo:
        return await self.launcher.stop(pid, start_time, self.cfg.stop_grace_ms / 1000.0 if grace else 0.0)

    def snapshot_unrecorded(self) -> None:
        """Look at /proc once for the engines of every pool of this poolmgr (at start: a previous poolmgr may have
        died between a spawn and its record); `find_unrecorded` answers from it instead of a walk per pool."""
        self._unrecorded = self._scan_marked()

    def find_unrecorded(self, pool_id: str) -> list[tuple[int, int]]:
        """Engines of this pool that run but were never recorded (poolmgr died between spawn and write): the
        session leaders carrying this pool's and this poolmgr's markers (an engine's own children die with it)."""
        if self._unrecorded is not None:
            return self._unrecorded.pop(pool_id, [])
        return self._scan_marked(pool_id).get(pool_id, [])

    def _scan_marked(self, only: str | None = None) -> dict[str, list[tuple[int, int]]]:
        found: dict[str, list[tuple[int, int]]] = {}
        instance = f"{INSTANCE_MARKER}={self.instance}".encode()
        prefix = f"{SPAWN_MARKER}=".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                env = set((entry / "environ").read_bytes().split(b"\0"))
                pools = [e[len(prefix) :].decode() for e in env if e.startswith(prefix)]
                if instance not in env or not pools or (only is not None and pools[0] != only):
                    continue
                stat = read_stat(int(entry.name))
                if stat is not None and stat.session == stat.pid and not stat.is_zombie:
                    found.setdefault(pools[0], []).append((stat.pid, stat.start_time))
        return found


__all__ = ["INSTANCE_MARKER", "SPAWN_MARKER", "EngineRuntime", "ReadyInfo"]


def _tail(path: Path, limit: int = 16_000) -> str:
    """What the last run wrote to an engine log: the text after its last `--- poolmgr …: spawn` header (never an
    earlier run's lines)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - limit))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    at = text.rfind("--- poolmgr ")
    return text[text.find("\n", at) + 1 :] if at >= 0 else ""
