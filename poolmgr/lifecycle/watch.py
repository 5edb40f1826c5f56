"""Watching a ready pool, a part of its worker: the engine's exit is seen at once (pidfd), a hang is reported by
the runtime's HealthProber (probes on the injected clock's cadence), NVML's verdict on GPU pools is asked each
health interval. A healthy engine costs no database read or write; how the watch ended (a crash, a stop) it
returns as an effect for the worker."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from poolmgr.engines import ExitInfo, SpawnedEngine
from poolmgr.errors import PreloadFailed
from poolmgr.inflight import IDLE_UNLOAD, Drain
from poolmgr.lifecycle.effects import Crashed, IdleUnload, Stopped
from poolmgr.lifecycle.port import PoolPort
from poolmgr.states import DesiredState, PoolState
from poolmgr.store import PoolView

log = logging.getLogger("poolmgr.pool")
Outcome = Crashed | Stopped | IdleUnload | None
# An idle unload drains with nothing to wait for; a request admitted in the instant before the pool left `ready`
# still gets the time an operator's drain gives by default.
IDLE_DRAIN_DEADLINE_MS = 30_000


class GpuCheck(Protocol):
    """NVML's verdict on a running engine (spillover, a lost GPU): runs in a thread, None when all is well."""

    def applies(self, view: PoolView) -> bool:
        """Whether the pool's engine needs NVML rounds at all (a GPU pool, or any pool on a host with a driver)."""
        ...

    def __call__(self, view: PoolView, pid: int) -> PreloadFailed | None: ...


class ReadyWatch:
    """Waits, costing nothing meanwhile, for whichever comes first: the engine's exit (pidfd), the prober's word
    that it hung (engines.HealthProber: `threshold` unanswered probes, one per interval on the clock), a kick
    (a request changed the pool: re-read it), an NVML round (GPU pools), the end of its `idle_unload_s`. Nothing
    is written while the engine is healthy; whether it served long enough to restart its backoff is decided when
    it crashes."""

    def __init__(self, port: PoolPort, gpu_check: GpuCheck | None) -> None:
        self.port = port
        self.gpu_check = gpu_check

    async def gpu_problem(self, view: PoolView, pid: int) -> PreloadFailed | None:
        """NVML's verdict on the engine, from the split plan stored in `view`."""
        if self.gpu_check is None or not self.gpu_check.applies(view):
            return None
        return await asyncio.to_thread(self.gpu_check, view, pid)

    async def run(self, view: PoolView, eng: SpawnedEngine) -> Outcome:
        """Until the engine ends (Crashed), the pool is to stop (Stopped, engine stopped) or another part takes
        over (None: drained, reloaded, shutdown)."""
        exit_task = asyncio.ensure_future(self.port.runtime.launcher.wait_exit(eng.pid, eng.start_time))
        hung = self._watch_health(view)
        try:
            return await self._loop(view, eng, exit_task, hung)
        finally:
            self.port.runtime.prober.unwatch(view.id)
            for fut in (exit_task, hung):
                if not fut.done():
                    fut.cancel()

    def _watch_health(self, view: PoolView) -> asyncio.Future[str]:
        loop = asyncio.get_running_loop()
        hung: asyncio.Future[str] = loop.create_future()

        def settle(text: str) -> None:
            if not hung.done():
                hung.set_result(text)

        def on_hung(text: str) -> None:  # called from the prober's thread
            loop.call_soon_threadsafe(settle, text)

        self.port.runtime.prober.watch(view.id, str(self.port.runtime.socket_path(view.id)), on_hung)
        return hung

    async def _loop(
        self, view: PoolView, eng: SpawnedEngine, exit_task: asyncio.Future[ExitInfo], hung: asyncio.Future[str]
    ) -> Outcome:
        port = self.port
        rounds = _Rounds(self, view)
        idle = _Idle(port, view)
        while not port.stopping:
            waiter = asyncio.ensure_future(port.wait(_soonest(rounds.next_in(), idle.next_in())))
            either: list[asyncio.Future[Any]] = [exit_task, hung, waiter]
            done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if exit_task in done:
                return await self._exited(view, eng, exit_task.result())
            if hung in done:
                # It answered nothing for threshold x timeout: no graceful stop to wait for (a stopped or
                # deadlocked engine would hold its pool "ready" for the whole stop grace). Killed, then recorded.
                await port.stop_engine(grace=False)
                return Crashed(PreloadFailed("health_failure", hung.result()))
            fresh = await port.read()
            if fresh.state is not PoolState.READY or fresh.pid != eng.pid or fresh.removed_at is not None:
                return None  # another part takes over (a removal: the worker drains it)
            if fresh.desired_state is DesiredState.STOPPED:
                # stopped while it was still preloading: it must not go on serving now that it is ready
                await port.stop_engine()
                return Stopped()
            outcome = await rounds.due(fresh, eng) or idle.due(fresh)
            if outcome is not None:
                return outcome
        return None

    async def _exited(self, view: PoolView, eng: SpawnedEngine, info: ExitInfo) -> Outcome:
        why = self.port.runtime.exit_failure(eng, info, expect_gpu=not view.spec.is_cpu, when="serving")
        fresh = await self.port.read()
        if fresh.state is PoolState.DRAINING:
            # A drain or reload was accepted meanwhile: it finishes without the engine (a reload starts the new
            # model) rather than crash → rollback, which would never try the new model.
            log.warning("pool %s: engine ended as its drain began: %s", view.id, why.message,
                        extra=self.port.log_extra(fresh, reason=why.reason))  # fmt: skip
            return None
        return Crashed(why, info)


class _Rounds:
    """NVML rounds of a GPU pool's engine, each health interval on the clock (None for a CPU pool on a host
    without a driver: nothing timed at all)."""

    def __init__(self, watch: ReadyWatch, view: PoolView) -> None:
        self.watch = watch
        self.interval = watch.port.runtime.cfg.health_check_interval_ms / 1000.0
        gpu = watch.gpu_check is not None and watch.gpu_check.applies(view)
        self.next_gpu = watch.port.clock.monotonic() + self.interval if gpu else None

    def next_in(self) -> float | None:
        """Seconds until the next NVML round (None: only an exit, a hang or a kick can end the wait)."""
        if self.next_gpu is None:
            return None
        return max(0.0, self.next_gpu - self.watch.port.clock.monotonic())

    async def due(self, view: PoolView, eng: SpawnedEngine) -> Outcome:
        now = self.watch.port.clock.monotonic()
        if self.next_gpu is None or now < self.next_gpu:
            return None
        self.next_gpu = now + self.interval
        problem = await self.watch.gpu_problem(view, eng.pid)
        if problem is None:
            return None
        await self.watch.port.stop_engine()
        return Crashed(problem)


class _Idle:
    """`idle_unload_s` of a ready pool: once it has had no request through the data plane (none in flight, none
    answered) and no lease for that long on the clock, it is unloaded (IdleUnload: a drain with nothing to wait
    for). Requests are stamped by the traffic gate on the lifecycle's clock; leases are seen on each read of the
    row (a release kicks the worker, and a held lease is looked at again each `idle_unload_s`)."""

    def __init__(self, port: PoolPort, view: PoolView) -> None:
        self.port = port
        self.traffic = port.runtime.traffic.get(view.id)
        self.limit = view.spec.idle_unload_s
        self.since = port.clock.monotonic()  # ready (or adopted) now: idle from here on
        self.leased = view.active_leases > 0

    def _busy(self) -> bool:
        return self.leased or self.traffic.in_flight > 0 or self.traffic.queued > 0

    def next_in(self) -> float | None:
        """Seconds until the pool may have been idle long enough (None: never unloaded)."""
        if self.limit is None:
            return None
        if self._busy():
            return self.limit
        last = max(self.since, self.traffic.last_active)
        return max(0.0, last + self.limit - self.port.clock.monotonic())

    def due(self, view: PoolView) -> IdleUnload | None:
        self.limit = view.spec.idle_unload_s
        now = self.port.clock.monotonic()
        if view.active_leases > 0:
            self.leased = True
        elif self.leased:  # its last lease ended (released, or expired) since the previous look
            self.leased, self.since = False, now
        if self.limit is None or self._busy():
            return None
        idle_s = now - max(self.since, self.traffic.last_active)
        if idle_s < self.limit:
            return None
        log.info("pool %s: idle for %.1f s (idle_unload_s %g): unloading it", view.id, idle_s, self.limit,
                 extra=self.port.log_extra(view, reason=IDLE_UNLOAD, idle_s=round(idle_s, 3)))  # fmt: skip
        op = Drain(self.port.clock.now(), IDLE_DRAIN_DEADLINE_MS, None, IDLE_UNLOAD)
        return IdleUnload(op, idle_s=idle_s)


def _soonest(*delays: float | None) -> float | None:
    """The shortest of the delays that are set (None: none is)."""
    known = [d for d in delays if d is not None]
    return min(known) if known else None


__all__ = ["IDLE_DRAIN_DEADLINE_MS", "GpuCheck", "ReadyWatch"]
