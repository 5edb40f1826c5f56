"""Every write of a pool row, as a small frozen record (store.Effect): the FSM trigger it fires (or none, for a
fact that changes no state), the columns it writes and the audit row it leaves. `Registry.apply` applies any of
them the same way: lock the row, let the machine decide, compare-and-swap, insert the audit row.

    transitions                                     facts (no state change)
    Placed             discovered|stopped → placed  EngineRecorded   pid + start time, right after the spawn
    PreloadStarted     placed → preloading          EngineForgotten  no engine recorded any more
    PreloadSucceeded   preloading → ready
    StartFailed        placed|preloading → crashed  ErrorNoted       last_error of a failed step
    Crashed            ready|draining → crashed     Noted            an audit row only (adopted, restart_storm)
    BackedOff          crashed → backoff            StopRequested    desired stopped (drain of a non-ready pool)
    Retried            backoff → preloading         PreloadRequested desired running (operator's preload)
    BreakerOpened      crashed|backoff → breaker    VramRefreshed    VRAM of the pool's devices
    TrialStarted       breaker-open → preloading    MarkedStopped    engine gone and desired stopped, state kept
    BreakerReset       breaker-open → preloading
    DrainRequested     ready → draining             (Drain op)
    IdleUnload         ready → draining             (Drain op, reason idle_unload)
    ReloadRequested    ready → draining             (Reload op)
    Drained            draining → stopped
    ReloadStarted      draining → placed            (new spec)
    RolledBack         crashed|backoff → placed     (old spec, Rollback op)
    Stopped            any running state → stopped
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

from poolmgr.engines import ExitInfo
from poolmgr.errors import PreloadFailed
from poolmgr.inflight import IDLE_UNLOAD, Drain, Preload, Reload, Rollback
from poolmgr.lifecycle.placing import CPU_PLACEMENT, Placement
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import ENGINE_STATES, DesiredState, PoolState, Trigger
from poolmgr.store import Effect, EventData, PoolColumns, PoolView

T = Trigger
# The columns that say which engine serves the pool: cleared together whenever that engine is gone.
NO_ENGINE: PoolColumns = {"pid": None, "pid_start_time": None, "endpoint_url": None}
STOPPED_BY_OPERATOR = "stopped by operator"


@dataclass(frozen=True)
class ReadyInfo:
    """What a preload learned from the engine once it answered."""

    endpoint_url: str
    engine_version: str | None
    slots_total: int


# -- the way up ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placed(Effect):
    trigger: ClassVar[Trigger | None] = T.PLACE


@dataclass(frozen=True)
class PreloadStarted(Effect):
    """Placed on its devices; the spawn intent is written ahead of the spawn (invariant 2)."""

    trigger: ClassVar[Trigger | None] = T.START_PRELOAD
    placement: Placement

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        p = self.placement
        return {"spawn_intent_at": now, "split_plan": p.split_plan, "vram_total_bytes": p.vram_total_bytes,
                "vram_free_bytes": p.vram_free_bytes, "compute_capability": p.compute_capability}  # fmt: skip


def cpu_start(view: PoolView) -> Effect | None:
    """What follows, in the same transaction, once a CPU pool is to run (`Registry.apply(…, then=cpu_start)`):
    place, then start_preload — the spawn intent, written ahead. A CPU pool claims no device, so its placement
    reads nothing and need not wait for a commit of its own; a GPU pool's place row is its claim on the devices,
    committed before placement reads the other pools' claims (the worker does that), so it gets None here."""
    if not view.spec.is_cpu or view.desired_state is not DesiredState.RUNNING or view.removed_at is not None:
        return None
    if view.pid is not None:  # an engine is still recorded: the worker's first look (its sweep) settles it first
        return None
    if view.state in (PoolState.DISCOVERED, PoolState.STOPPED):
        return Placed()
    if view.state is PoolState.PLACED:
        return PreloadStarted(CPU_PLACEMENT)
    return None


@dataclass(frozen=True)
class EngineRecorded(Effect):
    pid: int
    start_time: int

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return {"pid": self.pid, "pid_start_time": self.start_time}


@dataclass(frozen=True)
class PreloadSucceeded(Effect):
    """Ready: the failure counters and the breaker close, the operation in flight (reload, rollback) ends."""

    trigger: ClassVar[Trigger | None] = T.PRELOAD_OK
    ready: ReadyInfo

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        r = self.ready
        return {
            "endpoint_url": r.endpoint_url, "engine_version": r.engine_version, "slots_total": r.slots_total,
            "ready_since": now, "consecutive_failures": 0, "breaker_trial": False, "breaker_timeout_s": 0.0,
            "breaker_until": None, "last_error": None, "heartbeat_at": now, "pending_op": None,
            "next_restart_at": None,
        }  # fmt: skip

    def audit(self, before: PoolView) -> EventData:
        detail: dict[str, Any] = {"endpoint_url": self.ready.endpoint_url}
        if isinstance(before.pending_op, Reload):
            detail["reload_outcome"] = "success"
        elif isinstance(before.pending_op, Rollback):
            detail["reload_outcome"] = "rolled_back"
        return EventData(reason="ready", correlation_id=before.correlation_id, detail=detail)


@dataclass(frozen=True)
class StartFailed(Effect):
    """A preload failed (engine exit, timeout, isolation, placement, an internal error)."""

    trigger: ClassVar[Trigger | None] = T.PRELOAD_FAILED
    why: PreloadFailed

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return {**NO_ENGINE, "last_error": self.why.message, "consecutive_failures": before.consecutive_failures + 1}

    def audit(self, before: PoolView) -> EventData:
        return EventData(kind="preload_failed", reason=self.why.reason, correlation_id=before.correlation_id,
                         detail={"message": self.why.message})  # fmt: skip


# -- the way down --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Crashed(Effect):
    """The serving engine is gone: its leases end with it."""

    trigger: ClassVar[Trigger | None] = T.CRASH
    clears_leases: ClassVar[bool] = True
    why: PreloadFailed
    exit: ExitInfo = field(default_factory=ExitInfo)
    stable: bool = False  # it had served BACKOFF_STABLE_SECS: the backoff starts over (decided at the crash)

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        cols: PoolColumns = {**NO_ENGINE, "last_error": self.why.message, "ready_since": None}
        if self.stable:
            cols["backoff_step"] = 0
        return cols

    def audit(self, before: PoolView) -> EventData:
        return EventData(kind="crashed", reason=self.why.reason, exit_code=self.exit.code, signal=self.exit.signal,
                         detail={"message": self.why.message})  # fmt: skip


@dataclass(frozen=True)
class BackedOff(Effect):
    trigger: ClassVar[Trigger | None] = T.BACK_OFF
    delay_ms: int
    next_at: datetime
    reason: str

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return {"backoff_step": before.backoff_step + 1, "next_restart_at": self.next_at}

    def audit(self, before: PoolView) -> EventData:
        return EventData(reason=self.reason, backoff_ms=self.delay_ms)


@dataclass(frozen=True)
class Retried(Effect):
    trigger: ClassVar[Trigger | None] = T.RETRY

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return {"restart_count": before.restart_count + 1, "spawn_intent_at": now}

    def audit(self, before: PoolView) -> EventData:
        return EventData(reason="restart after backoff")


@dataclass(frozen=True)
class BreakerOpened(Effect):
    trigger: ClassVar[Trigger | None] = T.OPEN_BREAKER
    until: datetime
    timeout_s: float
    reason: str

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return {"breaker_until": self.until, "breaker_timeout_s": self.timeout_s, "breaker_trial": False,
                "next_restart_at": None}  # fmt: skip

    def audit(self, before: PoolView) -> EventData:
        return EventData(reason=self.reason, detail={"timeout_s": self.timeout_s})


@dataclass(frozen=True)
class TrialStarted(Effect):
    """The breaker's timeout passed: one half-open trial start."""

    trigger: ClassVar[Trigger | None] = T.TRIAL_START

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return {"breaker_trial": True, "restart_count": before.restart_count + 1, "spawn_intent_at": now}

    def audit(self, before: PoolView) -> EventData:
        return EventData(reason="breaker half-open: one trial start")


@dataclass(frozen=True)
class BreakerReset(Effect):
    """An operator closed the breaker: the pool starts at once, its failure counters cleared."""

    trigger: ClassVar[Trigger | None] = T.RESET_BREAKER
    correlation_id: str | None = None

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return {"breaker_until": None, "breaker_timeout_s": 0.0, "breaker_trial": False, "consecutive_failures": 0,
                "backoff_step": 0, "spawn_intent_at": now, "desired_state": DesiredState.RUNNING.value}  # fmt: skip

    def audit(self, before: PoolView) -> EventData:
        return EventData(reason="breaker reset by operator", correlation_id=self.correlation_id)


# -- drain, reload, rollback -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DrainRequested(Effect):
    trigger: ClassVar[Trigger | None] = T.DRAIN
    op: Drain

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return {"drain_deadline_at": self.op.started_at + timedelta(milliseconds=self.op.deadline_ms),
                "pending_op": self.op.to_json(), "desired_state": DesiredState.STOPPED.value}  # fmt: skip

    def audit(self, before: PoolView) -> EventData:
        ms = self.op.deadline_ms
        return EventData(reason=f"drain requested, deadline {ms} ms", correlation_id=self.op.correlation_id,
                         detail={"deadline_ms": ms})  # fmt: skip


@dataclass(frozen=True)
class IdleUnload(DrainRequested):
    """A ready pool had no request and no lease for its `idle_unload_s`: it drains (nothing to wait for) and
    stops; its Drain op carries the reason (IDLE_UNLOAD), which the data plane's gate reads."""

    idle_s: float = 0.0

    def audit(self, before: PoolView) -> EventData:
        detail = {"idle_s": round(self.idle_s, 3), "idle_unload_s": before.spec.idle_unload_s,
                  "deadline_ms": self.op.deadline_ms}  # fmt: skip
        return EventData(reason=IDLE_UNLOAD, detail=detail)


@dataclass(frozen=True)
class ReloadRequested(Effect):
    trigger: ClassVar[Trigger | None] = T.DRAIN
    op: Reload

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return {"drain_deadline_at": self.op.started_at + timedelta(milliseconds=self.op.deadline_ms),
                "pending_op": self.op.to_json()}  # fmt: skip

    def audit(self, before: PoolView) -> EventData:
        detail = {"model": self.op.model, "old_model": before.model, "drain_deadline_ms": self.op.deadline_ms}
        return EventData(kind="reload_requested", reason=f"reload to {self.op.model}",
                         correlation_id=self.op.correlation_id, detail=detail)  # fmt: skip


_DRAIN_ENDS: PoolColumns = {**NO_ENGINE, "drain_deadline_at": None}


@dataclass(frozen=True)
class Drained(Effect):
    """The drain finished (leases ended, or the deadline forced it): the pool stops."""

    trigger: ClassVar[Trigger | None] = T.DRAIN_DONE
    clears_leases: ClassVar[bool] = True
    detail: dict[str, Any]

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return {**_DRAIN_ENDS, "desired_state": DesiredState.STOPPED.value, "pending_op": None}

    def audit(self, before: PoolView) -> EventData:
        return EventData(kind="drained", reason="drain finished", correlation_id=before.correlation_id,
                         detail=self.detail)  # fmt: skip


@dataclass(frozen=True)
class ReloadStarted(Effect):
    """The old engine drained: the pool is placed again with the new model (the Reload op stays in flight)."""

    trigger: ClassVar[Trigger | None] = T.RELOAD
    clears_leases: ClassVar[bool] = True
    op: Reload
    detail: dict[str, Any]

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        new = self.op.new_spec or PoolSpec.from_json({**before.spec.to_json(), "model": self.op.model})
        return {**_DRAIN_ENDS, "spec": new.to_json()}

    def audit(self, before: PoolView) -> EventData:
        return EventData(kind="drained", reason=f"reload to {self.op.model}", correlation_id=self.op.correlation_id,
                         detail=self.detail)  # fmt: skip


@dataclass(frozen=True)
class RolledBack(Effect):
    """The reload's new model failed: the old spec starts again."""

    trigger: ClassVar[Trigger | None] = T.ROLLBACK
    op: Reload

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return {"spec": self.op.old_spec.to_json(), "pending_op": self.op.rolled_back().to_json()}

    def audit(self, before: PoolView) -> EventData:
        return EventData(reason=f"reload to {self.op.model} failed: restarting {self.op.old_spec.model}",
                         correlation_id=self.op.correlation_id, detail={"reload_outcome": "rolled_back"})  # fmt: skip


# -- stop --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stopped(Effect):
    """The pool stops (its engine, if any, already stopped): by an operator, a retirement, a shutdown."""

    trigger: ClassVar[Trigger | None] = T.STOP
    clears_leases: ClassVar[bool] = True
    reason: str = STOPPED_BY_OPERATOR
    desired: DesiredState | None = None

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        cols: PoolColumns = {**NO_ENGINE}
        if self.desired is not None:
            cols["desired_state"] = self.desired.value
        return cols

    def audit(self, before: PoolView) -> EventData:
        return EventData(reason=self.reason)


@dataclass(frozen=True)
class MarkedStopped(Effect):
    """A pool already stopped is retired: no engine recorded, desired stopped, the reason audited."""

    reason: str

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return {**NO_ENGINE, "desired_state": DesiredState.STOPPED.value}

    def audit(self, before: PoolView) -> EventData:
        return EventData(reason=self.reason)


@dataclass(frozen=True)
class EngineForgotten(Effect):
    """No engine is recorded for the pool any more (it was stopped, or found dead)."""

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return {**NO_ENGINE}


def adoption_event(pid: int, start_time: int) -> EventData:
    """The audit row of an engine that outlived the previous poolmgr and was taken over (pid AND start time)."""
    return EventData(kind="adopted", reason="engine outlived the previous poolmgr",
                     detail={"pid": pid, "start_time": start_time, "adoption_id": uuid.uuid4().hex})  # fmt: skip


# -- operator requests and other facts ---------------------------------------------------------------------
@dataclass(frozen=True)
class StopRequested(Effect):
    """A drain asked of a pool that is not ready: it just stops (its worker sees desired = stopped)."""

    correlation_id: str | None = None

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return {"desired_state": DesiredState.STOPPED.value}

    def audit(self, before: PoolView) -> EventData:
        return EventData(kind="stop_requested", reason=f"drain requested in state {before.state.value}",
                         correlation_id=self.correlation_id)  # fmt: skip


@dataclass(frozen=True)
class PreloadRequested(Effect):
    """An operator's preload: desired running. A stopped pool starts afresh (failure counters cleared); a pool
    with nothing in flight carries the request's correlation id into the preload it starts."""

    correlation_id: str | None = None
    reason: str | None = None  # LOAD_ON_DEMAND for a request's start; None for an operator's

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        cols: PoolColumns = {"desired_state": DesiredState.RUNNING.value}
        if self.correlation_id and before.pending_op is None and before.state not in ENGINE_STATES:
            cols["pending_op"] = Preload(self.correlation_id).to_json()
        if before.state is PoolState.STOPPED:
            cols["consecutive_failures"], cols["backoff_step"] = 0, 0
            cols["breaker_trial"], cols["breaker_timeout_s"] = False, 0.0
        return cols

    def audit(self, before: PoolView) -> EventData:
        why = f"{self.reason}: " if self.reason else ""
        return EventData(kind="preload_requested", reason=f"{why}preload requested in state {before.state.value}",
                         correlation_id=self.correlation_id)  # fmt: skip


@dataclass(frozen=True)
class ErrorNoted(Effect):
    message: str

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return {"last_error": self.message}


@dataclass(frozen=True)
class Noted(Effect):
    """An audit row and nothing else (an engine adopted, a restart storm)."""

    event: EventData

    def audit(self, before: PoolView) -> EventData:
        return self.event


@dataclass(frozen=True)
class VramRefreshed(Effect):
    total: int
    free: int

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return {"vram_total_bytes": self.total, "vram_free_bytes": self.free}


__all__ = [
    "NO_ENGINE",
    "STOPPED_BY_OPERATOR",
    "BackedOff",
    "BreakerOpened",
    "BreakerReset",
    "Crashed",
    "DrainRequested",
    "Drained",
    "EngineForgotten",
    "EngineRecorded",
    "ErrorNoted",
    "IdleUnload",
    "MarkedStopped",
    "Noted",
    "Placed",
    "PreloadRequested",
    "PreloadStarted",
    "PreloadSucceeded",
    "ReadyInfo",
    "Retried",
    "RolledBack",
    "StartFailed",
    "StopRequested",
    "Stopped",
    "TrialStarted",
    "VramRefreshed",
    "adoption_event",
    "cpu_start",
]
