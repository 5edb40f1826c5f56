"""Draining a pool, a part of its worker (B-DRAIN, and the drain half of B-RELOAD): no new leases and no new
requests (the data plane refuses them, or holds them for the reloaded engine), wait for the active leases and the
requests in flight to end or the deadline (on the injected clock) — at the deadline the requests still running are
cut — then hand the worker the effect that ends the drain — `Drained` (the pool stops) or `ReloadStarted` (the new
model starts) — for it to stop the engine and fire it. A hung engine (the usual health misses) or one that died
ends the wait early."""

from __future__ import annotations

import logging
from typing import Any

from poolmgr.engines import SpawnedEngine
from poolmgr.inflight import Drain, Reload
from poolmgr.lifecycle.effects import Drained, ReloadStarted
from poolmgr.lifecycle.port import PoolPort
from poolmgr.states import PoolState
from poolmgr.store import PoolView

log = logging.getLogger("poolmgr.pool")
_LEASE_POLL_S = 0.05


class Drainer:
    def __init__(self, port: PoolPort) -> None:
        self.port = port

    async def run(
        self, view: PoolView, eng: SpawnedEngine | None, *, engine_gone: bool
    ) -> Drained | ReloadStarted | None:
        """The effect that ends the drain, once it may end; None if the drain is no longer this part's (the pool
        left `draining`, or poolmgr is shutting down)."""
        port = self.port
        if engine_gone:
            log.warning("pool %s: its engine ended while poolmgr was not running; finishing the drain", view.id,
                        extra=port.log_extra(view))  # fmt: skip
        elif view.active_leases > 0:
            log.warning(
                "pool %s draining with %d lease(s) still held: waiting for them until the deadline", view.id,
                view.active_leases, extra={**port.log_extra(view), "active_leases": view.active_leases},
            )  # fmt: skip
        waited = await self._wait(view, eng) if not engine_gone else view
        if waited is None or port.stopping:
            return None
        return self._ending(waited)

    async def _wait(self, view: PoolView, eng: SpawnedEngine | None) -> PoolView | None:
        """Until no lease is held, the deadline passed, or the engine died or hung: the pool as it then is."""
        port = self.port
        hung = _HangCheck(port)
        traffic = port.runtime.traffic.get(view.id)
        while (
            (view.active_leases > 0 or traffic.in_flight > 0) and not self._deadline_passed(view) and not port.stopping
        ):
            await port.wait(_LEASE_POLL_S)
            view = await port.read()
            if view.state is not PoolState.DRAINING:
                return None
            if eng is not None and not port.runtime.launcher.is_alive(eng.pid, eng.start_time):
                # The engine died mid-drain: its leases serve no one, so there is nothing left to wait for.
                log.warning("pool %s: its engine pid %s ended during the drain; finishing it now", view.id, eng.pid,
                            extra=port.log_extra(view, pid=eng.pid))  # fmt: skip
                break
            if await hung.now(view):
                # A hung engine finishes no lease: waiting for the deadline would only keep the pool out longer.
                log.warning("pool %s: its engine stopped answering during the drain (%s); stopping it now", view.id,
                            hung.last, extra=port.log_extra(view, last_error=hung.last))  # fmt: skip
                break
        return view

    def _deadline_passed(self, view: PoolView) -> bool:
        return view.drain_deadline_at is not None and self.port.clock.now() >= view.drain_deadline_at

    def _ending(self, view: PoolView) -> Drained | ReloadStarted:
        op = view.pending_op
        started = op.started_at if isinstance(op, Drain | Reload) else view.updated_at
        cut = self.port.runtime.traffic.get(view.id).cut()
        if cut:
            log.warning("pool %s: drain deadline passed with %d request(s) still running: cut them", view.id, cut,
                        extra={**self.port.log_extra(view), "cut_requests": cut})  # fmt: skip
        forced = view.active_leases > 0 or cut > 0
        detail: dict[str, Any] = {
            "force_stopped": forced,
            "duration_ms": int((self.port.clock.now() - started).total_seconds() * 1000),
            "final_leases": view.active_leases,
            "cut_requests": cut,
            "outcome": "forced" if forced else "drained",
        }
        if isinstance(op, Drain) and op.reason is not None:
            detail["reason"] = op.reason  # poolmgr's own drain (an idle pool unloaded)
        if isinstance(op, Reload):
            return ReloadStarted(op, detail)
        return Drained(detail)


class _HangCheck:
    """Health probes of a draining engine at the usual interval; hung after the usual number of misses."""

    def __init__(self, port: PoolPort) -> None:
        cfg = port.runtime.cfg
        self.port = port
        self.interval = cfg.health_check_interval_ms / 1000.0
        self.threshold = cfg.health_failure_threshold
        self.due = port.clock.monotonic() + self.interval
        self.misses = 0
        self.last = ""

    async def now(self, view: PoolView) -> bool:
        clock = self.port.clock
        if clock.monotonic() < self.due:
            return False
        self.due = clock.monotonic() + self.interval
        ok, self.last = await self.port.runtime.health_ok(view.id)
        self.misses = 0 if ok else self.misses + 1
        return self.misses >= self.threshold


__all__ = ["Drainer"]
