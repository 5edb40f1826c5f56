"""Watching a ready pool: its exit is seen at once (pidfd), health misses and hangs are counted, and an
engine that outlived the previous poolmgr is re-adopted (same pid AND same start time) instead of restarted."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import TYPE_CHECKING, Any

from poolmgr.engines._process import ExitInfo, SpawnedEngine
from poolmgr.errors import PreloadFailed
from poolmgr.states import DesiredState, PoolState, Trigger
from poolmgr.store import EventData, PoolView, Registry

if TYPE_CHECKING:
    from poolmgr.lifecycle.worker import PoolWorker

log = logging.getLogger("poolmgr.pool")
_RECENT_EVENTS = 50
_NEEDS_A_PERSON = frozenset({"host_oom", "driver_error"})


async def adopt(w: PoolWorker, view: PoolView) -> SpawnedEngine | None:
    """The engine recorded for `view`, if it still runs; else the pool is marked crashed and None returned."""
    eng = await adopt_if_alive(w, view)
    if eng is None:
        await crash(w, view, PreloadFailed("exit", "engine exited while poolmgr was not running"), ExitInfo())
    return eng


async def adopt_if_alive(w: PoolWorker, view: PoolView, *, whole_run: bool = False) -> SpawnedEngine | None:
    """The pool's engine: the one this worker holds, or the recorded one re-adopted after a poolmgr restart
    (same pid AND start time; watched by pidfd; one `adopted` audit row). None when it no longer runs.

    `whole_run`: read the adopted engine's log from the start of its run (a preload still waiting for its
    `listening on` line), not from now."""
    if w.engine is not None:
        if (w.engine.pid, w.engine.start_time) == (view.pid, view.pid_start_time):
            return w.engine
        await w._stop_engine()  # not the recorded engine: never two for one pool
    launcher = w.runtime.launcher
    if view.pid is None or view.pid_start_time is None or not launcher.is_alive(view.pid, view.pid_start_time):
        return None
    path = w.runtime.log_path(view.id)
    if whole_run:
        offset = await asyncio.to_thread(w.runtime.run_log_offset, view.id)
    else:
        offset = path.stat().st_size if path.exists() else 0
    w.engine = SpawnedEngine(pid=view.pid, start_time=view.pid_start_time, log_path=path, log_offset=offset)
    event = EventData(
        kind="adopted", reason="engine outlived the previous poolmgr",
        detail={"pid": view.pid, "start_time": view.pid_start_time, "adoption_id": uuid.uuid4().hex},
    )  # fmt: skip
    await w._db(record_once, w.registry, view.id, event)
    log.info(
        "pool %s: adopted running engine pid %s (%s)", view.id, view.pid, view.state.value,
        extra=w._extra(view, pid=view.pid),
    )  # fmt: skip
    await w.stop_strays(view)
    return w.engine


def record_once(registry: Registry, pool_id: str, event: EventData) -> None:
    """Append `event` unless the same one (kind and detail) is already there since the pool's last state
    change: a retry after a COMMIT whose answer was lost (the database went away) does not write it twice."""
    for seen in reversed(registry.events(pool_id=pool_id, limit=_RECENT_EVENTS)):
        if seen.kind == event.kind and seen.detail == event.detail:
            return
        if seen.trigger is not None:
            break
    registry.record_event(pool_id, event)


async def crash(w: PoolWorker, view: PoolView, why: PreloadFailed, info: ExitInfo) -> None:
    w.engine = None
    await w.fire(
        Trigger.CRASH, view, clear_leases=True,  # the engine is gone: no one is served on its slots any more
        updates={"pid": None, "pid_start_time": None, "endpoint_url": None, "last_error": why.message,
                 "ready_since": None},
        event=EventData(kind="crashed", reason=why.reason, exit_code=info.code, signal=info.signal,
                        detail={"message": why.message}),
    )  # fmt: skip
    uptime = (w.clock.now() - view.ready_since).total_seconds() if view.ready_since is not None else None
    # What needs a person (the kernel killed it for memory, its GPU is gone) is critical; any other crash is
    # handled by the restart policy and logged at error.
    level = logging.CRITICAL if why.reason in _NEEDS_A_PERSON else logging.ERROR
    log.log(
        level, "pool %s engine crashed (%s): %s", view.id, why.reason, why.message,
        exc_info=w.traceback_once(why) if why.__cause__ is not None else None,
        extra=w._extra(
            view, last_error=why.message, reason=why.reason, restart_count=view.restart_count, exit_code=info.code,
            signal=info.signal, uptime_s=round(uptime, 3) if uptime is not None else None,
        ),
    )  # fmt: skip


async def watch_ready(w: PoolWorker, view: PoolView) -> None:
    eng = await adopt(w, view)
    if eng is None:
        return
    exit_task = asyncio.ensure_future(w.runtime.launcher.wait_exit(eng.pid, eng.start_time))
    try:
        await _watch_loop(w, view, eng, exit_task)
    finally:
        if not exit_task.done():
            exit_task.cancel()


async def _watch_loop(w: PoolWorker, view: PoolView, eng: SpawnedEngine, exit_task: asyncio.Future[Any]) -> None:
    cfg = w.runtime.cfg
    interval = cfg.health_check_interval_ms / 1000.0
    loop = asyncio.get_running_loop()
    due = loop.time() + interval  # the next health check: kicks (lease releases, say) never postpone it
    misses = 0
    while not w.stopping:
        kick = asyncio.ensure_future(w.kick_event.wait())
        timeout = max(0.0, due - loop.time())
        done, _ = await asyncio.wait({exit_task, kick}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        kick.cancel()
        if exit_task in done:
            info: ExitInfo = exit_task.result()
            why = w.runtime.exit_failure(eng, info, expect_gpu=not view.spec.is_cpu, when="serving")
            fresh = await w._db(w.registry.get, view.id)
            if fresh.state is PoolState.DRAINING:
                # A drain or reload was accepted meanwhile: it finishes without the engine (a reload starts
                # the new model) rather than crash → rollback, which would never try the new model.
                log.warning("pool %s: engine ended as its drain began: %s", view.id, why.message,
                            extra=w._extra(fresh, reason=why.reason))  # fmt: skip
                return
            await crash(w, fresh, why, info)
            return
        w.kick_event.clear()  # before the read: a kick that comes after it wakes the next wait at once
        fresh = await w._db(w.registry.get, view.id)
        if fresh.state is not PoolState.READY or fresh.pid != eng.pid:
            return
        if fresh.desired_state is DesiredState.STOPPED:
            # stopped while it was still preloading: it must not go on serving now that it is ready
            await w._stop_engine()
            await w.fire(Trigger.STOP, fresh, updates={"pid": None, "pid_start_time": None, "endpoint_url": None},
                         event=EventData(reason="stopped by operator"), clear_leases=True)  # fmt: skip
            return
        if loop.time() < due:
            continue
        due = loop.time() + interval
        problem = await w.check_gpus(fresh, eng.pid, reread=False)
        if problem is not None:
            await w._stop_engine()
            await crash(w, fresh, problem, ExitInfo())
            return
        ok, text = await w.runtime.health_ok(fresh.endpoint_url or "")
        if ok:
            misses = 0
            updates: dict[str, Any] = {"heartbeat_at": w.clock.now(), "live": True}
            if w.stable_reset_due(fresh):
                updates["backoff_step"] = 0
            await w._db(w.registry.update, view.id, **updates)
            continue
        misses += 1
        log.warning(
            "pool %s health check missed (%d/%d): %s",
            view.id,
            misses,
            cfg.health_failure_threshold,
            text,
            extra=w._extra(fresh),
        )
        if misses >= cfg.health_failure_threshold:
            await w._stop_engine()
            why = PreloadFailed("health_failure", f"health check failed {misses} times in a row: {text}")
            await crash(w, fresh, why, ExitInfo())
            return


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["adopt", "adopt_if_alive", "crash", "record_once", "watch_ready"]
