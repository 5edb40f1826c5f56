"""Watching a ready pool: its exit is seen at once (pidfd), health misses and hangs are counted, and an
engine that outlived the previous poolmgr is re-adopted (same pid AND same start time) instead of restarted."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from poolmgr.engines._process import ExitInfo, SpawnedEngine
from poolmgr.errors import PreloadFailed
from poolmgr.states import PoolState, Trigger
from poolmgr.store import EventData, PoolView

if TYPE_CHECKING:
    from poolmgr.lifecycle.worker import PoolWorker

log = logging.getLogger("poolmgr.pool")


async def adopt(w: PoolWorker, view: PoolView) -> SpawnedEngine | None:
    """The engine recorded for `view`, if it still runs; else the pool is marked crashed and None returned."""
    if w.engine is not None:
        return w.engine
    launcher = w.runtime.launcher
    if view.pid is not None and view.pid_start_time is not None and launcher.is_alive(view.pid, view.pid_start_time):
        path = w.runtime.log_path(view.id)
        offset = path.stat().st_size if path.exists() else 0
        w.engine = SpawnedEngine(pid=view.pid, start_time=view.pid_start_time, log_path=path, log_offset=offset)
        await w._db(
            w.registry.record_event, view.id,
            EventData(kind="adopted", reason="engine outlived the previous poolmgr",
                      detail={"pid": view.pid, "start_time": view.pid_start_time}),
        )  # fmt: skip
        log.info("pool %s: adopted running engine pid %s", view.id, view.pid, extra=w._extra(view, pid=view.pid))
        return w.engine
    await crash(w, view, PreloadFailed("exit", "engine exited while poolmgr was not running"), ExitInfo())
    return None


async def crash(w: PoolWorker, view: PoolView, why: PreloadFailed, info: ExitInfo) -> None:
    w.engine = None
    await w.fire(
        Trigger.CRASH, view,
        updates={"pid": None, "pid_start_time": None, "endpoint_url": None, "last_error": why.message,
                 "ready_since": None},
        event=EventData(kind="crashed", reason=why.reason, exit_code=info.code, signal=info.signal,
                        detail={"message": why.message}),
    )  # fmt: skip
    log.error(
        "pool %s engine crashed (%s): %s", view.id, why.reason, why.message,
        extra=w._extra(view, last_error=why.message, reason=why.reason, restart_count=view.restart_count),
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
    misses = 0
    while not w.stopping:
        w.kick_event.clear()
        kick = asyncio.ensure_future(w.kick_event.wait())
        done, _ = await asyncio.wait({exit_task, kick}, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
        kick.cancel()
        if exit_task in done:
            info: ExitInfo = exit_task.result()
            why = w.runtime.exit_failure(eng, info, expect_gpu=not view.spec.is_cpu, when="serving")
            await crash(w, await w._db(w.registry.get, view.id), why, info)
            return
        fresh = await w._db(w.registry.get, view.id)
        if fresh.state is not PoolState.READY or fresh.pid != eng.pid:
            return
        if kick in done:
            continue
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


__all__ = ["adopt", "crash", "watch_ready"]
