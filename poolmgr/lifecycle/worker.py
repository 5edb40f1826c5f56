"""One pool's worker: a sequential, level-triggered task that owns its pool and its engine. It reads the stored
state, acts on the gap to the desired state, and records what happened as one typed effect (effects.py) through
the one write path (Registry.apply: lock, FSM decides, compare-and-swap, audit row).

Slow work (spawn, health, kill) happens here, between effects, never while a row is locked. Every decision is
re-made from the database after each step, so a restarted poolmgr resumes where the last one stopped. Watching a
ready engine (watch.py) and draining it (drain.py) are parts of the worker that act through its `PoolPort`.

A crash, followed from the pidfd to the `crashed` row: `ReadyWatch.run` awaits `launcher.wait_exit` (a pidfd
readable in the event loop) → `runtime.exit_failure` classifies it → the watch returns a `Crashed` effect →
`PoolWorker._on_ready` → `_crashed` → `fire` → `RetryingRegistry.apply` → `Registry.apply` → `apply_effect`
(store/_write.py): row locked, `MACHINE.target(ready, crash)` = crashed, CAS update, `pool_events` row inserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import replace
from typing import Any

from poolmgr.clock import Clock
from poolmgr.engines import SpawnedEngine
from poolmgr.errors import IllegalTransition, PreloadFailed
from poolmgr.inflight import Drain
from poolmgr.lifecycle import effects as fx
from poolmgr.lifecycle.desired import CHANGE_DRAIN_MS
from poolmgr.lifecycle.drain import Drainer
from poolmgr.lifecycle.outage import RetryingRegistry
from poolmgr.lifecycle.placing import Placement
from poolmgr.lifecycle.policy import RestartPolicy
from poolmgr.lifecycle.runtime import EngineRuntime
from poolmgr.lifecycle.supervision import Supervisor
from poolmgr.lifecycle.watch import GpuCheck, ReadyWatch
from poolmgr.logfields import remember_pool
from poolmgr.states import ENGINE_STATES, DesiredState, PoolState
from poolmgr.store import Effect, PoolView

log = logging.getLogger("poolmgr.pool")
S = PoolState
_RUNNING_DESIRED = DesiredState.RUNNING


class PoolWorker:
    """Owns one pool: the only writer of its row's lifecycle, the only one to spawn, adopt or stop its engine.

    `engine` is the handle of the engine this worker spawned or adopted (its log offset, its pidfd watch); the
    row's pid and start time are its durable record, compared with it on every read (`_adopt`)."""

    def __init__(
        self,
        pool_id: str,
        *,
        store: RetryingRegistry,
        runtime: EngineRuntime,
        policy: RestartPolicy,
        place: Callable[[PoolView], Placement],
        gpu_check: GpuCheck | None = None,
        adopted: SpawnedEngine | None = None,
    ) -> None:
        self._pool_id = pool_id
        self.store = store
        self._runtime = runtime
        self._place = place
        self._kick = asyncio.Event()
        self._stopping = False
        self.engine: SpawnedEngine | None = adopted  # re-adopted by the reconciler at start (already audited)
        self._placement: Placement | None = None  # placed just now: no second placement before the spawn
        self._spawning: asyncio.Future[SpawnedEngine] | None = None  # spawn + pid record, shielded
        self._strays_checked = False  # /proc scanned for unrecorded engines since this worker started
        self._swept = False  # the first look at the pool after (re)start: no engine where none belongs
        self._traced: set[str] = set()  # causes whose traceback is already in the log (once each)
        self._watch = ReadyWatch(self, gpu_check)
        self._policy = policy
        self._drain = Drainer(self)
        self._supervisor = Supervisor(self, policy, store, preload=self.on_preloading)
        self._handlers: dict[PoolState, Callable[[PoolView], Awaitable[None]]] = {
            S.DISCOVERED: self._on_idle, S.STOPPED: self._on_idle, S.PLACED: self._on_placed,
            S.PRELOADING: self.on_preloading, S.READY: self._on_ready, S.DRAINING: self._on_draining,
            S.CRASHED: self._supervisor.on_crashed, S.BACKOFF: self._supervisor.on_backoff,
            S.BREAKER_OPEN: self._supervisor.on_breaker_open,
        }  # fmt: skip

    # -- PoolPort -------------------------------------------------------------------------------------
    @property
    def pool_id(self) -> str:
        return self._pool_id

    @property
    def clock(self) -> Clock:
        return self._runtime.clock

    @property
    def runtime(self) -> EngineRuntime:
        return self._runtime

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def read(self) -> PoolView:
        # Cleared before the read, never after it: a kick that lands while the pool is read (an API request
        # that commits meanwhile) is kept and ends the wait the stale read leads to (no lost wake-up).
        self._kick.clear()
        return self._follow(await self.store.get(self._pool_id))

    async def fire(
        self,
        effect: Effect,
        *,
        expect: Collection[PoolState],
        then: Callable[[PoolView], Effect | None] | None = None,
    ) -> PoolView:
        return self._follow(await self.store.apply(self._pool_id, effect, expect=expect, then=then))

    def _follow(self, view: PoolView) -> PoolView:
        """The data plane's gate follows every state of the pool this worker sees or makes (traffic.py)."""
        self._runtime.traffic.follow(view)
        return view

    async def stop_engine(self, *, grace: bool = True) -> None:
        eng, self.engine = self.engine, None
        if eng is not None:
            await self._runtime.stop(eng.pid, eng.start_time, grace=grace)

    async def wait(self, seconds: float | None) -> None:
        """Sleep on the clock (None: until kicked), cut short by a kick, also one since the last read."""
        kicked = asyncio.ensure_future(self._kick.wait())
        waits: set[asyncio.Future[Any]] = {kicked}
        if seconds is not None:
            waits.add(asyncio.ensure_future(self.clock.sleep(seconds)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in waits:
                fut.cancel()

    def log_extra(self, view: PoolView, **more: Any) -> dict[str, Any]:
        cid = view.correlation_id  # the request that started this work, if any
        return {
            "pool_id": view.id, "engine": view.engine, "engine_version": view.engine_version,
            "device_mask": view.device_mask, **({"correlation_id": cid} if cid else {}), **more,
        }  # fmt: skip

    # -- the loop -------------------------------------------------------------------------------------
    def kick(self) -> None:
        self._kick.set()

    def stop(self) -> None:
        """poolmgr is shutting down: stop taking work (the reconciler cancels the task after this)."""
        self._stopping = True
        self._kick.set()

    async def run(self) -> None:
        while not self._stopping:
            self._kick.clear()
            view = await self.store.find(self._pool_id)
            if view is None:
                self._runtime.traffic.forget(self._pool_id)
                return
            self._follow(view)
            remember_pool(view.id, engine=view.engine, engine_version=view.engine_version, device_mask=view.device_mask)
            try:
                if not self._swept:
                    self._swept = True
                    await self._sweep(view)
                    continue
                if view.removed_at is not None and await self._removing(view):
                    continue
                await self._handlers[view.state](view)
            except IllegalTransition as exc:
                log.debug("pool %s: %s; re-reading", self._pool_id, exc)
            except Exception as exc:  # a bug or an unforeseen OS error in one step never kills the worker
                await self._failed_step(exc)

    async def _removing(self, view: PoolView) -> bool:
        """A pool being removed (desired.remove_pool): a ready one drains (its requests get CHANGE_DRAIN_MS), a
        starting one is asked to stop; once no engine runs, its row is deleted — the next read finds none and
        the worker ends. False: the state's own handler goes on (a drain finishing, a start stopping)."""
        if view.state is S.READY:
            drain = Drain(self.clock.now(), CHANGE_DRAIN_MS, None, "pool removed")
            await self.fire(fx.DrainRequested(drain), expect=[S.READY])
            return True
        if view.state in ENGINE_STATES:
            if view.desired_state is _RUNNING_DESIRED:
                await self.fire(fx.StopRequested(), expect=[view.state])
                return True
            return False
        await self.store.call(self.store.registry.deregister, view.id)
        self._runtime.traffic.forget(view.id)
        log.info("pool %s removed", view.id, extra=self.log_extra(view))
        return True

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
        view = await self.store.get(self._pool_id)
        if view.state in (S.PLACED, S.PRELOADING):
            await self.stop_engine()
            await self.start_failed(view, why)
        elif view.state in (S.READY, S.DRAINING):
            await self.stop_engine()
            await self.crashed(view, fx.Crashed(why))
        else:
            log.error(
                "pool %s: %s", self._pool_id, why.message, exc_info=self.traceback_once(exc),
                extra=self.log_extra(view, last_error=why.message, reason=why.reason),
            )  # fmt: skip
            await self.fire(fx.ErrorNoted(why.message), expect=[view.state])
            await self.wait(1.0)

    # -- the way up -----------------------------------------------------------------------------------
    async def _on_idle(self, view: PoolView) -> None:
        if view.desired_state is not _RUNNING_DESIRED:
            await self.wait(None)
            return
        # placed → preloading straight on: no wake-up and re-read in between (preload latency). A CPU pool's
        # start_preload commits with its place row (effects.cpu_start); a GPU pool's place row is its claim on
        # the devices, committed before the placement reads the other pools' claims (_on_placed).
        placed = await self.fire(fx.Placed(), expect=[view.state], then=fx.cpu_start)
        if placed.state is S.PRELOADING:
            await self.on_preloading(placed)
            return
        await self._on_placed(placed)

    async def _on_placed(self, view: PoolView) -> None:
        if view.desired_state is not _RUNNING_DESIRED:
            await self.fire(fx.Stopped(), expect=[S.PLACED])
            return
        try:
            placement = await self.store.call(self._place, view)  # reads the registry: waits out an outage
        except PreloadFailed as exc:
            await self.start_failed(view, exc)
            return
        preloading = await self.fire(fx.PreloadStarted(placement), expect=[S.PLACED])
        self._placement = placement
        await self.on_preloading(preloading)

    async def on_preloading(self, view: PoolView) -> None:
        """Spawn (or go on with an adopted engine), wait until it answers, record ready or the failure."""
        eng = await self._engine_for_preload(view)
        if eng is None:
            return
        try:
            ready = await self._runtime.wait_ready(view.spec, eng, expect_gpu=not view.spec.is_cpu)
            problem = await self._watch.gpu_problem(view, eng.pid)
            if problem is not None:
                raise problem
        except PreloadFailed as exc:
            await self.stop_engine()
            await self.start_failed(view, exc)
            return
        ready_view = await self.fire(fx.PreloadSucceeded(ready), expect=[S.PRELOADING])
        cid = {"correlation_id": view.correlation_id} if view.correlation_id else {}  # cleared by now
        log.info("pool %s ready at %s", self._pool_id, ready.endpoint_url, extra=self.log_extra(ready_view, **cid))

    async def _engine_for_preload(self, view: PoolView) -> SpawnedEngine | None:
        if view.pid is not None or self.engine is not None:
            # Caught mid-preload by a poolmgr restart: go on with the engine that outlived it (adopted: never a
            # second one). One that has ended meanwhile failed its preload.
            eng = await self._adopt(view, whole_run=True)
            if eng is not None:
                return eng
            if view.pid is not None:
                await self.start_failed(view, PreloadFailed("exit", "engine exited while poolmgr was not running"))
                return None
        await self._stop_strays(view, once=True)
        return await self._start(view)

    async def _start(self, view: PoolView) -> SpawnedEngine | None:
        """Place (unless just placed), spawn, record the pid; None when that failed (the failure recorded).
        Spawn and record are shielded: a shutdown that cancels this task still learns the engine (settle)."""
        placement, self._placement = self._placement, None
        try:
            if placement is None:  # a CPU pool's placement reads nothing (Reconciler._place): no thread hop
                placement = self._place(view) if view.spec.is_cpu else await self.store.call(self._place, view)
            self._spawning = asyncio.ensure_future(self._spawn_and_record(view, placement))
            eng = await asyncio.shield(self._spawning)
        except PreloadFailed as exc:
            await self.start_failed(view, exc)
            return None
        log.info("pool %s: engine spawned pid %s", self._pool_id, eng.pid, extra=self.log_extra(view, pid=eng.pid))
        return eng

    async def _spawn_and_record(self, view: PoolView, placement: Placement) -> SpawnedEngine:
        eng = await asyncio.to_thread(self._runtime.spawn, view.spec, placement)
        self.engine = eng  # known before the record: a shutdown meanwhile still stops (or keeps) it
        await self.fire(fx.EngineRecorded(eng.pid, eng.start_time), expect=[view.state])
        return eng

    async def settle(self, timeout: float) -> None:
        """Once the worker task is cancelled (shutdown): let a spawn in flight finish recording its engine."""
        if self._spawning is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._spawning), timeout)

    async def start_failed(self, view: PoolView, exc: PreloadFailed) -> None:
        self.engine = None
        await self.fire(fx.StartFailed(exc), expect=[S.PLACED, S.PRELOADING])
        level = logging.CRITICAL if exc.reason in _NEEDS_A_PERSON else logging.WARNING
        log.log(
            level, "pool %s preload failed (%s): %s", self._pool_id, exc.reason, exc.message,
            exc_info=self.traceback_once(exc) if exc.__cause__ is not None else None,
            extra=self.log_extra(view, last_error=exc.message, reason=exc.reason),
        )  # fmt: skip

    # -- serving and draining -------------------------------------------------------------------------
    async def _on_ready(self, view: PoolView) -> None:
        eng = await self._adopt(view)
        if eng is None:
            why = PreloadFailed("exit", "engine exited while poolmgr was not running")
            await self.crashed(view, fx.Crashed(why))
            return
        outcome = await self._watch.run(view, eng)
        if isinstance(outcome, fx.Crashed):
            after = await self.crashed(view, outcome)
            if after.state is S.PRELOADING and not self._stopping:  # backed off 0 ms and retried in the crash's
                await self.on_preloading(after)  # transaction (shutting down: the next poolmgr starts it)
        elif outcome is not None:
            await self.fire(outcome, expect=[S.READY])

    async def crashed(self, view: PoolView, crash: fx.Crashed) -> PoolView:
        """Record the crash — with a 0 ms backoff, its back_off and retry in the same transaction — and log it.
        Returns the row as it now is (crashed, or preloading when the restart was chained)."""
        self.engine = None
        stable = view.backoff_step > 0 and self._policy.stable(view, self.clock.now())
        then = await self._supervisor.restart_chain(view)
        after = await self.fire(replace(crash, stable=stable), expect=[view.state], then=then)
        why, info = crash.why, crash.exit
        uptime = (self.clock.now() - view.ready_since).total_seconds() if view.ready_since is not None else None
        # What needs a person (the kernel killed it for memory, its GPU is gone) is critical; any other crash is
        # handled by the restart policy and logged at error.
        level = logging.CRITICAL if why.reason in _NEEDS_A_PERSON else logging.ERROR
        log.log(
            level, "pool %s engine crashed (%s): %s", view.id, why.reason, why.message,
            exc_info=self.traceback_once(why) if why.__cause__ is not None else None,
            extra=self.log_extra(
                view, last_error=why.message, reason=why.reason, restart_count=view.restart_count,
                exit_code=info.code, signal=info.signal, uptime_s=round(uptime, 3) if uptime is not None else None,
            ),
        )  # fmt: skip
        if after.state is S.PRELOADING:
            self._supervisor.restarted_at_once(view, after)
        return after

    async def _on_draining(self, view: PoolView) -> None:
        # After a poolmgr restart: go on draining the engine that outlived it. One that ended meanwhile (the
        # previous poolmgr stopped it, most likely) leaves nothing to wait for: the drain finishes at once.
        gone = view.pid is not None and await self._adopt(view) is None
        effect = await self._drain.run(view, self.engine, engine_gone=gone)
        if effect is None:
            return
        await self.kill_recorded(view)
        await self.fire(effect, expect=[S.DRAINING])
        detail = effect.detail
        log.info(
            "pool %s drained (forced=%s, %d ms, %d leases left)", view.id, detail["force_stopped"],
            detail["duration_ms"], detail["final_leases"],
            extra={**self.log_extra(view), "correlation_id": view.correlation_id, **detail},
        )  # fmt: skip

    # -- the engine -----------------------------------------------------------------------------------
    async def _adopt(self, view: PoolView, *, whole_run: bool = False) -> SpawnedEngine | None:
        """The pool's engine: the one this worker holds, or the recorded one re-adopted after a poolmgr restart
        (same pid AND start time; watched by pidfd; one `adopted` audit row). None when it no longer runs.
        `whole_run`: read the adopted engine's log from the start of its run (a preload: its stderr verdict covers
        the whole load), not from now."""
        if self.engine is not None:
            if (self.engine.pid, self.engine.start_time) == (view.pid, view.pid_start_time):
                return self.engine
            await self.stop_engine()  # not the recorded engine: never two for one pool
        if view.pid is None or view.pid_start_time is None:
            return None
        if not self._runtime.launcher.is_alive(view.pid, view.pid_start_time):
            return None
        self.engine = await asyncio.to_thread(self._runtime.adopted, view.id, view.pid, view.pid_start_time, whole_run)
        await self.store.note_once(view.id, fx.adoption_event(view.pid, view.pid_start_time))
        log.info(
            "pool %s: adopted running engine pid %s (%s)", view.id, view.pid, view.state.value,
            extra=self.log_extra(view, pid=view.pid),
        )  # fmt: skip
        await self._stop_strays(view)
        return self.engine

    async def _sweep(self, view: PoolView) -> None:
        """When this worker starts: a pool in a state that has no engine runs none (invariant 3)."""
        if view.state in ENGINE_STATES:
            return
        if view.pid is not None:
            log.warning(
                "pool %s is %s but records engine pid %s: stopping it", self._pool_id, view.state.value, view.pid,
                extra=self.log_extra(view, pid=view.pid),
            )  # fmt: skip
            await self.kill_recorded(view)
            await self.fire(fx.EngineForgotten(), expect=[view.state])
        await self._stop_strays(view)

    async def stop_strays(self, view: PoolView) -> None:
        """Stop this pool's engines other than the one it holds: spawned, never recorded (poolmgr died)."""
        await self._stop_strays(view)

    async def _stop_strays(self, view: PoolView, *, once: bool = False) -> None:
        """`once`: skip the /proc scan if this worker already made one; its own spawns are always recorded."""
        if once and self._strays_checked:
            return
        self._strays_checked = True
        keep = self.engine.pid if self.engine is not None else None
        for pid, start in await asyncio.to_thread(self._runtime.find_unrecorded, self._pool_id):
            if pid != keep:
                log.warning(
                    "pool %s: stopping unrecorded engine pid %s", self._pool_id, pid, extra=self.log_extra(view)
                )
                await self._runtime.stop(pid, start)

    async def kill_recorded(self, view: PoolView) -> None:
        """Stop the pool's engine: the one held, else the recorded one (never a pid now owned by another program:
        stop() checks the start time)."""
        if self.engine is not None:
            await self.stop_engine()
        elif view.pid is not None and view.pid_start_time is not None:
            await self._runtime.stop(view.pid, view.pid_start_time)


_NEEDS_A_PERSON = frozenset({"host_oom", "driver_error"})

__all__ = ["PoolWorker"]
