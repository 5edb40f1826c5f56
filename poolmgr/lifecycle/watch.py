"""Watching a ready pool, a part of its worker: the engine's exit is seen at once (pidfd), health misses and
hangs are counted on the injected clock, NVML's verdict on its GPUs is asked at each health round. The watch
writes only heartbeats itself; how the watch ended (a crash, a stop) it returns as an effect for the worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from poolmgr.engines import ExitInfo, SpawnedEngine
from poolmgr.errors import PreloadFailed
from poolmgr.lifecycle.effects import Crashed, Healthy, Stopped
from poolmgr.lifecycle.policy import RestartPolicy
from poolmgr.lifecycle.port import PoolPort
from poolmgr.states import DesiredState, PoolState
from poolmgr.store import PoolView

log = logging.getLogger("poolmgr.pool")
# NVML's verdict on a running engine (spillover, a lost GPU): runs in a thread, None when all is well.
GpuCheck = Callable[[PoolView, int], PreloadFailed | None]
Outcome = Crashed | Stopped | None


class ReadyWatch:
    def __init__(self, port: PoolPort, policy: RestartPolicy, gpu_check: GpuCheck | None) -> None:
        self.port = port
        self.policy = policy
        self.gpu_check = gpu_check

    async def gpu_problem(self, view: PoolView, pid: int) -> PreloadFailed | None:
        """NVML's verdict on the engine, from the split plan stored in `view`."""
        if self.gpu_check is None:
            return None
        return await asyncio.to_thread(self.gpu_check, view, pid)

    async def run(self, view: PoolView, eng: SpawnedEngine) -> Outcome:
        """Until the engine ends (Crashed), the pool is to stop (Stopped, engine stopped) or another part takes
        over (None: drained, reloaded, shutdown)."""
        exit_task = asyncio.ensure_future(self.port.runtime.launcher.wait_exit(eng.pid, eng.start_time))
        try:
            return await self._loop(view, eng, exit_task)
        finally:
            if not exit_task.done():
                exit_task.cancel()

    async def _loop(self, view: PoolView, eng: SpawnedEngine, exit_task: asyncio.Future[ExitInfo]) -> Outcome:
        port, clock = self.port, self.port.clock
        interval = port.runtime.cfg.health_check_interval_ms / 1000.0
        due = clock.monotonic() + interval  # the next health check: kicks (lease releases, say) never postpone it
        misses = 0
        while not port.stopping:
            waiter = asyncio.ensure_future(port.wait(max(0.0, due - clock.monotonic())))
            either: list[asyncio.Future[Any]] = [exit_task, waiter]
            done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if exit_task in done:
                return await self._exited(view, eng, exit_task.result())
            fresh = await port.read()
            if fresh.state is not PoolState.READY or fresh.pid != eng.pid:
                return None
            if fresh.desired_state is DesiredState.STOPPED:
                # stopped while it was still preloading: it must not go on serving now that it is ready
                await port.stop_engine()
                return Stopped()
            if clock.monotonic() < due:
                continue
            due = clock.monotonic() + interval
            outcome, misses = await self._health_round(fresh, eng, misses)
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

    async def _health_round(self, view: PoolView, eng: SpawnedEngine, misses: int) -> tuple[Outcome, int]:
        problem = await self.gpu_problem(view, eng.pid)
        if problem is not None:
            await self.port.stop_engine()
            return Crashed(problem), misses
        ok, text = await self.port.runtime.health_ok(view.endpoint_url or "")
        if ok:
            stable = view.backoff_step > 0 and self.policy.stable(view, self.port.clock.now())
            await self.port.fire(Healthy(reset_backoff=stable), expect=[PoolState.READY])
            return None, 0
        misses += 1
        threshold = self.port.runtime.cfg.health_failure_threshold
        extra: dict[str, Any] = self.port.log_extra(view)
        log.warning("pool %s health check missed (%d/%d): %s", view.id, misses, threshold, text, extra=extra)
        if misses < threshold:
            return None, misses
        await self.port.stop_engine()
        return Crashed(PreloadFailed("health_failure", f"health check failed {misses} times in a row: {text}")), misses


__all__ = ["GpuCheck", "ReadyWatch"]
