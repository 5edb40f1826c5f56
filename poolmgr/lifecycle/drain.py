"""Drain (B-DRAIN) and the drain half of reload (B-RELOAD): no new leases, wait for active leases to end or
the deadline, stop the engine (forced past the deadline), then stop the pool or start the new model."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from poolmgr.lifecycle.watch import adopt_if_alive
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import DesiredState, PoolState, Trigger
from poolmgr.store import EventData, PoolView

if TYPE_CHECKING:
    from poolmgr.lifecycle.worker import PoolWorker

log = logging.getLogger("poolmgr.pool")
_LEASE_POLL_S = 0.05


async def run_drain(w: PoolWorker, view: PoolView) -> None:
    # After a poolmgr restart: go on draining the engine that outlived it. One that ended meanwhile (the
    # previous poolmgr stopped it, most likely) leaves nothing to wait for: the drain finishes at once.
    gone = view.pid is not None and await adopt_if_alive(w, view) is None
    if gone:
        log.warning("pool %s: its engine ended while poolmgr was not running; finishing the drain", view.id,
                    extra=w._extra(view))  # fmt: skip
    if view.active_leases > 0:
        log.warning(
            "pool %s draining with %d lease(s) still held: waiting for them until the deadline", view.id,
            view.active_leases, extra={**w._extra(view), "active_leases": view.active_leases},
        )  # fmt: skip
    hung = _HangCheck(w)
    while not gone and view.active_leases > 0 and not w.drain_deadline_passed(view) and not w.stopping:
        await w._sleep_or_kick(_LEASE_POLL_S)
        w.kick_event.clear()  # before the read: a kick after it ends the next sleep at once
        view = await w._db(w.registry.get, view.id)
        if view.state is not PoolState.DRAINING:
            return
        eng = w.engine
        if eng is not None and not w.runtime.launcher.is_alive(eng.pid, eng.start_time):
            # The engine died mid-drain: its leases serve no one, so there is nothing left to wait for.
            log.warning("pool %s: its engine pid %s ended during the drain; finishing it now", view.id, eng.pid,
                        extra=w._extra(view, pid=eng.pid))  # fmt: skip
            break
        if await hung.now(view):
            # A hung engine finishes no lease: waiting for the deadline would only keep the pool out longer.
            log.warning("pool %s: its engine stopped answering during the drain (%s); stopping it now", view.id,
                        hung.last, extra=w._extra(view, last_error=hung.last))  # fmt: skip
            break
    if w.stopping:
        return
    forced = view.active_leases > 0
    await w._kill_recorded(view)
    op = view.pending_op or {"op": "drain"}
    started = _parse(op.get("started_at")) or view.updated_at
    detail = {
        "force_stopped": forced,
        "duration_ms": int((w.clock.now() - started).total_seconds() * 1000),
        "final_leases": view.active_leases,
        "outcome": "forced" if forced else "drained",
    }
    common: dict[str, Any] = {"pid": None, "pid_start_time": None, "endpoint_url": None, "drain_deadline_at": None}
    if op.get("op") == "reload":
        new = PoolSpec.from_json({**view.spec.to_json(), "model": op["model"]})
        await w.fire(
            Trigger.RELOAD, view, clear_leases=True,
            updates={**common, "spec": new.to_json(), "model": new.model},
            event=EventData(kind="drained", reason=f"reload to {new.model}", correlation_id=op.get("correlation_id"),
                            detail=detail),
        )  # fmt: skip
    else:
        await w.fire(
            Trigger.DRAIN_DONE, view, clear_leases=True,
            updates={**common, "desired_state": DesiredState.STOPPED.value, "pending_op": None},
            event=EventData(kind="drained", reason="drain finished", correlation_id=op.get("correlation_id"),
                            detail=detail),
        )  # fmt: skip
    log.info(
        "pool %s drained (forced=%s, %d ms, %d leases left)", view.id, forced, detail["duration_ms"],
        view.active_leases, extra={**w._extra(view), "correlation_id": op.get("correlation_id"), **detail},
    )  # fmt: skip
    await asyncio.sleep(0)


class _HangCheck:
    """Health probes of a draining engine at the usual interval; hung after the usual number of misses."""

    def __init__(self, w: PoolWorker) -> None:
        self.w = w
        self.interval = w.runtime.cfg.health_check_interval_ms / 1000.0
        self.threshold = w.runtime.cfg.health_failure_threshold
        self.due = time.monotonic() + self.interval
        self.misses = 0
        self.last = ""

    async def now(self, view: PoolView) -> bool:
        if not view.endpoint_url or time.monotonic() < self.due:
            return False
        self.due = time.monotonic() + self.interval
        ok, self.last = await self.w.runtime.health_ok(view.endpoint_url)
        self.misses = 0 if ok else self.misses + 1
        return self.misses >= self.threshold


def _parse(value: Any) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value))


__all__ = ["run_drain"]
