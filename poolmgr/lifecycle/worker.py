"""One sequential, level-triggered task per pool: read the stored state, act on the gap, fire one trigger.

Slow work (spawn, health, kill) happens here, between triggers, never inside FSM callbacks. Every decision is
re-made from the database after each step, so a restarted poolmgr resumes where the last one stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from poolmgr.engines._process import ExitInfo, SpawnedEngine
from poolmgr.errors import IllegalTransition, PreloadFailed
from poolmgr.lifecycle.fsm import MACHINE
from poolmgr.lifecycle.placing import Placement
from poolmgr.lifecycle.policy import RestartPolicy
from poolmgr.lifecycle.runtime import EngineRuntime, ReadyInfo
from poolmgr.logfields import remember_pool
from poolmgr.states import ENGINE_STATES, DesiredState, PoolState, Trigger
from poolmgr.store import EventData, PoolView, Registry

log = logging.getLogger("poolmgr.pool")
S, T = PoolState, Trigger
_R = TypeVar("_R")


class PoolWorker:
    def __init__(
        self,
        pool_id: str,
        *,
        registry: Registry,
        runtime: EngineRuntime,
        policy: RestartPolicy,
        place: Callable[[PoolView], Placement],
        db: Callable[..., Awaitable[Any]],
    ) -> None:
        self.pool_id = pool_id
        self.registry = registry
        self.runtime = runtime
        self.policy = policy
        self._place = place
        self._db = db
        self.kick_event = asyncio.Event()
        self.engine: SpawnedEngine | None = None  # the engine this worker spawned or adopted
        self.stopping = False
        self._placement: Placement | None = None
        # NVML's verdict on a running engine (spillover, lost GPU); set by the reconciler.
        self.gpu_check: Callable[[PoolView, int], PreloadFailed | None] | None = None
        self._spawning: asyncio.Future[SpawnedEngine] | None = None  # spawn + pid record, shielded
        self._strays_checked = False  # /proc scanned for unrecorded engines since this worker started
        self._swept = False  # the first look at the pool after (re)start: no engine where none belongs
        self._traced: set[str] = set()  # causes whose traceback is already in the log (once each, not per retry)
        self._handlers: dict[PoolState, Callable[[PoolView], Awaitable[None]]] = {
            S.DISCOVERED: self._on_idle, S.STOPPED: self._on_idle, S.PLACED: self._on_placed,
            S.PRELOADING: self._on_preloading, S.READY: self._on_ready, S.DRAINING: self._on_draining,
            S.CRASHED: self._on_crashed, S.BACKOFF: self._on_backoff, S.BREAKER_OPEN: self._on_breaker_open,
        }  # fmt: skip

    @property
    def clock(self) -> Any:
        return self.registry.clock

    def kick(self) -> None:
        self.kick_event.set()

    def _extra(self, view: PoolView, **more: Any) -> dict[str, Any]:
        cid = (view.pending_op or {}).get("correlation_id")  # the request that started this work, if any
        return {
            "pool_id": view.id, "engine": view.engine, "engine_version": view.engine_version,
            "device_mask": view.device_mask, **({"correlation_id": cid} if cid else {}), **more,
        }  # fmt: skip

    async def run(self) -> None:
        while not self.stopping:
            # Cleared before the read, never after it: a kick that lands while the pool is read (an API request
            # that commits meanwhile) is kept and ends the wait the stale read leads to (no lost wake-up).
            self.kick_event.clear()
            view = await self._db(self.registry.find, self.pool_id)
            if view is None:
                return
            remember_pool(view.id, engine=view.engine, engine_version=view.engine_version, device_mask=view.device_mask)
            try:
                if not self._swept:
                    self._swept = True
                    await self._sweep(view)
                    continue
                await self._handlers[view.state](view)
            except IllegalTransition as exc:
                log.debug("pool %s: %s; re-reading", self.pool_id, exc)
            except Exception as exc:  # a bug or an unforeseen OS error in one step never kills the worker
                await self._failed_step(exc)

    def traceback_once(self, exc: BaseException) -> BaseException | None:
        """`exc` (for exc_info) the first time this cause is seen, None after: a pool that fails the same way
        on every restart logs its traceback once, then one line per failure."""
        cause = exc.__cause__ or exc
        key = f"{type(cause).__qualname__}: {cause}"
        if key in self._traced:
            return None
        self._traced.add(key)
        return cause

    async def _failed_step(self, exc: Exception) -> None:
        """An unexpected error while placing, spawning or watching: a failed preload or a crash of this pool
        (reason internal_error), so the usual backoff → breaker path applies instead of an endless loop."""
        why = PreloadFailed("internal_error", f"internal error: {type(exc).__name__}: {exc}")
        why.__cause__ = exc
        view = await self._db(self.registry.get, self.pool_id)
        if view.state in (S.PLACED, S.PRELOADING):
            await self._stop_engine()
            await self._preload_failed(view, why)
        elif view.state in (S.READY, S.DRAINING):
            from poolmgr.lifecycle.watch import crash

            await self._stop_engine()
            await crash(self, view, why, ExitInfo())
        else:
            log.error(
                "pool %s: %s", self.pool_id, why.message, exc_info=self.traceback_once(exc),
                extra=self._extra(view, last_error=why.message, reason=why.reason),
            )  # fmt: skip
            await self._db(self.registry.update, self.pool_id, last_error=why.message)
            await self._sleep_or_kick(1.0)

    async def fire(self, trigger: Trigger, view: PoolView, **kw: Any) -> PoolView:
        fired: PoolView = await self._db(
            MACHINE.fire, self.registry, self.pool_id, trigger, expect_state=view.state, **kw
        )
        return fired

    async def _wait_kick(self, timeout: float | None) -> None:
        """Sleep until kicked (API, lease release, shutdown) or the timeout; a kick since the last read counts."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.kick_event.wait(), timeout)

    # -- states ---------------------------------------------------------------------------------------
    async def _on_idle(self, view: PoolView) -> None:
        if view.desired_state is DesiredState.RUNNING:
            # placed → preloading straight on: no wake-up and re-read in between (preload latency)
            await self._on_placed(await self.fire(T.PLACE, view))
        else:
            await self._wait_kick(None)

    async def _on_placed(self, view: PoolView) -> None:
        if view.desired_state is DesiredState.STOPPED:
            await self.fire(T.STOP, view, event=EventData(reason="stopped by operator"))
            return
        try:
            placement = await self._db(self._place, view)  # reads the registry: waits out an outage
        except PreloadFailed as exc:
            await self._preload_failed(view, exc)
            return
        preloading = await self.fire(
            T.START_PRELOAD, view, updates={"spawn_intent_at": self.clock.now(), **placement.registry_fields()}
        )
        self._placement = placement
        await self._on_preloading(preloading)

    async def _on_preloading(self, view: PoolView) -> None:
        from poolmgr.lifecycle.watch import adopt_if_alive

        eng = None
        if view.pid is not None or self.engine is not None:
            # Caught mid-preload by a poolmgr restart: go on with the engine that outlived it (adopted: never a
            # second one). One that has ended meanwhile failed its preload.
            eng = await adopt_if_alive(self, view, whole_run=True)
            if eng is None and view.pid is not None:
                await self._preload_failed(view, PreloadFailed("exit", "engine exited while poolmgr was not running"))
                return
        if eng is None:
            await self.stop_strays(view, once=True)
            eng = await self._start(view)
            if eng is None:
                return
        expect_gpu = not view.spec.is_cpu
        try:
            ready = await self.runtime.wait_ready(view.spec, eng, expect_gpu=expect_gpu)
            problem = await self.check_gpus(view, eng.pid)
            if problem is not None:
                raise problem
        except PreloadFailed as exc:
            await self._stop_engine()
            await self._preload_failed(view, exc)
            return
        await self._preload_ok(view, ready)

    async def check_gpus(self, view: PoolView, pid: int, *, reread: bool = True) -> PreloadFailed | None:
        """NVML's verdict on the engine. `reread=False` when `view` was just read (the watch loop's health round):
        no second read of the same row on that path."""
        if self.gpu_check is None:
            return None
        if reread:
            view = await self._db(self.registry.get, self.pool_id)  # the split plan stored at placement
        return await asyncio.to_thread(self.gpu_check, view, pid)

    async def _start(self, view: PoolView) -> SpawnedEngine | None:
        """Place (unless just placed), spawn, record the pid; None when that failed (preload_failed fired).
        Spawn and record are shielded: a shutdown that cancels this task still learns the engine (settle)."""
        placement, self._placement = self._placement, None
        try:
            if placement is None:
                placement = await self._db(self._place, view)
            self._spawning = asyncio.ensure_future(self._spawn_and_record(view, placement))
            eng = await asyncio.shield(self._spawning)
        except PreloadFailed as exc:
            await self._preload_failed(view, exc)
            return None
        log.info("pool %s: engine spawned pid %s", self.pool_id, eng.pid, extra=self._extra(view, pid=eng.pid))
        return eng

    async def _spawn_and_record(self, view: PoolView, placement: Placement) -> SpawnedEngine:
        eng = await asyncio.to_thread(self.runtime.spawn, view.spec, placement)
        self.engine = eng  # known before the record: a shutdown meanwhile still stops (or keeps) it
        await self._db(self.registry.update, self.pool_id, pid=eng.pid, pid_start_time=eng.start_time)
        return eng

    async def settle(self, timeout: float) -> None:
        """Once the worker task is cancelled (shutdown): let a spawn in flight finish recording its engine."""
        if self._spawning is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._spawning), timeout)

    async def _preload_ok(self, view: PoolView, ready: ReadyInfo) -> None:
        op = view.pending_op or {}
        detail: dict[str, Any] = {"endpoint_url": ready.endpoint_url}
        if op.get("op") in ("reload", "rollback"):
            detail["reload_outcome"] = "success" if op["op"] == "reload" else "rolled_back"
        updates = {
            "endpoint_url": ready.endpoint_url, "engine_version": ready.engine_version,
            "slots_total": ready.slots_total, "ready_since": self.clock.now(), "consecutive_failures": 0,
            "breaker_trial": False, "breaker_timeout_s": 0.0, "breaker_until": None, "last_error": None,
            "heartbeat_at": self.clock.now(), "pending_op": None, "next_restart_at": None,
        }  # fmt: skip
        view = await self.fire(
            T.PRELOAD_OK, view, updates=updates,
            event=EventData(reason="ready", correlation_id=op.get("correlation_id"), detail=detail),
        )  # fmt: skip
        cid = {"correlation_id": op["correlation_id"]} if op.get("correlation_id") else {}  # pending_op is cleared now
        log.info("pool %s ready at %s", self.pool_id, ready.endpoint_url, extra=self._extra(view, **cid))

    async def _preload_failed(self, view: PoolView, exc: PreloadFailed) -> None:
        self.engine = None
        op = view.pending_op or {}
        await self.fire(
            T.PRELOAD_FAILED, view,
            updates={"pid": None, "pid_start_time": None, "endpoint_url": None, "last_error": exc.message,
                     "consecutive_failures": view.consecutive_failures + 1},
            event=EventData(kind="preload_failed", reason=exc.reason, correlation_id=op.get("correlation_id"),
                            detail={"message": exc.message}),
        )  # fmt: skip
        log.warning(
            "pool %s preload failed (%s): %s", self.pool_id, exc.reason, exc.message,
            exc_info=self.traceback_once(exc) if exc.__cause__ is not None else None,
            extra=self._extra(view, last_error=exc.message, reason=exc.reason),
        )  # fmt: skip

    async def _on_ready(self, view: PoolView) -> None:
        from poolmgr.lifecycle.watch import watch_ready

        await watch_ready(self, view)

    async def _on_draining(self, view: PoolView) -> None:
        from poolmgr.lifecycle.drain import run_drain

        await run_drain(self, view)

    async def _on_crashed(self, view: PoolView) -> None:
        op = view.pending_op or {}
        if view.desired_state is DesiredState.STOPPED:
            await self.fire(T.STOP, view, event=EventData(reason="stopped by operator"))
            return
        if op.get("op") == "reload" and op.get("old_spec"):
            await self._rollback(view, op)
            return
        now = self.clock.now()
        window = self.policy.storm_window_start(now)
        restarts = await self._db(self.registry.count_events, self.pool_id, trigger=T.RETRY.value, since=window)
        decision = self.policy.on_crash(view, now, restarts_in_window=restarts)
        if decision.action == "back_off":
            backing = await self.fire(
                T.BACK_OFF, view,
                updates={"backoff_step": view.backoff_step + 1, "next_restart_at": decision.next_restart_at},
                event=EventData(reason=decision.reason, backoff_ms=decision.delay_ms),
            )  # fmt: skip
            log.info(
                "pool %s backing off %d ms", self.pool_id, decision.delay_ms,
                extra=self._extra(
                    view, backoff_ms=decision.delay_ms, restart_count=view.restart_count, last_error=view.last_error,
                    next_restart_at=decision.next_restart_at.isoformat() if decision.next_restart_at else None,
                ),
            )  # fmt: skip
            if decision.delay_ms == 0:
                await self._on_backoff(backing)  # no delay: restart without a wake-up and re-read
            return
        if decision.storm:
            from poolmgr.lifecycle.watch import record_once

            await self._db(
                record_once, self.registry, self.pool_id,
                EventData(kind="restart_storm", reason=decision.reason, detail={"restarts_in_window": restarts}),
            )  # fmt: skip
            log.critical(
                "pool %s: %s", self.pool_id, decision.reason,
                extra=self._extra(view, restart_count=view.restart_count, last_error=view.last_error),
            )  # fmt: skip
        await self.fire(
            T.OPEN_BREAKER, view,
            updates={"breaker_until": decision.breaker_until, "breaker_timeout_s": decision.breaker_timeout_s,
                     "breaker_trial": False, "next_restart_at": None},
            event=EventData(reason=decision.reason, detail={"timeout_s": decision.breaker_timeout_s}),
        )  # fmt: skip
        log.critical(
            "pool %s circuit breaker open: %s", self.pool_id, decision.reason,
            extra=self._extra(
                view, last_error=view.last_error, restart_count=view.restart_count, from_state=view.state.value,
                to_state=S.BREAKER_OPEN.value, consecutive_failures=view.consecutive_failures,
            ),
        )  # fmt: skip

    async def _rollback(self, view: PoolView, op: dict[str, Any]) -> None:
        old = op["old_spec"]
        await self.fire(
            T.ROLLBACK, view,
            updates={"spec": old, "model": old["model"], "pending_op": {**op, "op": "rollback"}},
            event=EventData(reason=f"reload to {op.get('model')} failed: restarting {old['model']}",
                            correlation_id=op.get("correlation_id"), detail={"reload_outcome": "rolled_back"}),
        )  # fmt: skip
        log.warning("pool %s reload failed; rolling back to %s", self.pool_id, old["model"], extra=self._extra(view))

    async def _on_backoff(self, view: PoolView) -> None:
        if view.desired_state is DesiredState.STOPPED:
            await self.fire(T.STOP, view, event=EventData(reason="stopped by operator"))
            return
        due = view.next_restart_at or self.clock.now()
        wait_s = (due - self.clock.now()).total_seconds()
        if wait_s > 0:
            await self._sleep_or_kick(wait_s)
            return
        retried = await self.fire(
            T.RETRY, view,
            updates={"restart_count": view.restart_count + 1, "spawn_intent_at": self.clock.now()},
            event=EventData(reason="restart after backoff"),
        )  # fmt: skip
        log.info("pool %s restarting", self.pool_id, extra=self._extra(view, restart_count=view.restart_count + 1))
        await self._on_preloading(retried)

    async def _on_breaker_open(self, view: PoolView) -> None:
        if view.desired_state is DesiredState.STOPPED:
            await self.fire(T.STOP, view, event=EventData(reason="stopped by operator"))
            return
        due = view.breaker_until or self.clock.now()
        wait_s = (due - self.clock.now()).total_seconds()
        if wait_s > 0:
            await self._sleep_or_kick(wait_s)
            return
        await self.fire(
            T.TRIAL_START, view,
            updates={"breaker_trial": True, "restart_count": view.restart_count + 1,
                     "spawn_intent_at": self.clock.now()},
            event=EventData(reason="breaker half-open: one trial start"),
        )  # fmt: skip
        log.info(
            "pool %s breaker half-open: trial start", self.pool_id,
            extra=self._extra(
                view, restart_count=view.restart_count + 1, from_state=view.state.value,
                to_state=S.PRELOADING.value, consecutive_failures=view.consecutive_failures,
            ),
        )  # fmt: skip

    async def _sleep_or_kick(self, seconds: float) -> None:
        """Wait on the injected clock, cut short by a kick (a fake clock advances at once), also one that came
        since the last read (run() clears the event before it reads the pool)."""
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        kicked = asyncio.ensure_future(self.kick_event.wait())
        try:
            await asyncio.wait({sleeper, kicked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            kicked.cancel()

    # -- engine ---------------------------------------------------------------------------------------
    async def _stop_engine(self) -> None:
        eng, self.engine = self.engine, None
        if eng is not None:
            await self.runtime.stop(eng.pid, eng.start_time)

    async def _sweep(self, view: PoolView) -> None:
        """When this worker starts: a pool in a state that has no engine runs none (invariant 3)."""
        if view.state in ENGINE_STATES:
            return
        if view.pid is not None:
            log.warning(
                "pool %s is %s but records engine pid %s: stopping it", self.pool_id, view.state.value, view.pid,
                extra=self._extra(view, pid=view.pid),
            )  # fmt: skip
            await self._kill_recorded(view)
            await self._db(self.registry.update, self.pool_id, pid=None, pid_start_time=None, endpoint_url=None)
        await self.stop_strays(view)

    async def stop_strays(self, view: PoolView, *, once: bool = False) -> None:
        """Stop this pool's engines other than the one it holds: spawned, never recorded (poolmgr died).
        `once`: skip the /proc scan if this worker already made one; its own spawns are always recorded."""
        if once and self._strays_checked:
            return
        self._strays_checked = True
        keep = self.engine.pid if self.engine is not None else None
        for pid, start in await asyncio.to_thread(self.runtime.find_unrecorded, self.pool_id):
            if pid != keep:
                log.warning("pool %s: stopping unrecorded engine pid %s", self.pool_id, pid, extra=self._extra(view))
                await self.runtime.stop(pid, start)

    async def _kill_recorded(self, view: PoolView) -> None:
        if self.engine is not None:
            await self._stop_engine()
        elif view.pid is not None and view.pid_start_time is not None:
            # stop() checks the start time: a pid now owned by another program is never signalled.
            await self.runtime.stop(view.pid, view.pid_start_time)

    def stable_reset_due(self, view: PoolView) -> bool:
        return view.backoff_step > 0 and self.policy.stable(view, self.clock.now())

    def drain_deadline_passed(self, view: PoolView) -> bool:
        return view.drain_deadline_at is not None and self.clock.now() >= view.drain_deadline_at

    def since(self, moment: Any) -> timedelta:
        return self.clock.now() - moment  # type: ignore[no-any-return]


__all__ = ["PoolWorker"]
