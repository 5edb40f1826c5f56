"""What a write to a pool row is: an `Effect` names its FSM trigger (or none, for a fact about the pool that
changes no state), the columns it writes and the audit row it leaves. The lifecycle defines the effects
(lifecycle/effects.py); the store applies any of them the same way (store/_write.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypedDict

from poolmgr.states import PoolState, Trigger

if TYPE_CHECKING:
    from poolmgr.store._views import PoolView


class PoolColumns(TypedDict, total=False):
    """The columns of a pool row an effect may write (the rest are the registry's own or derived)."""

    spec: dict[str, Any]  # the PoolSpec as JSON: model, engine and device_mask are projected from it
    desired_state: str
    last_error: str | None
    heartbeat_at: datetime | None
    engine_version: str | None
    slots_total: int
    restart_count: int
    endpoint_url: str | None
    pid: int | None
    pid_start_time: int | None
    spawn_intent_at: datetime | None
    ready_since: datetime | None
    backoff_step: int
    next_restart_at: datetime | None
    consecutive_failures: int
    breaker_timeout_s: float
    breaker_until: datetime | None
    breaker_trial: bool
    vram_total_bytes: int | None
    vram_free_bytes: int | None
    compute_capability: str | None
    split_plan: dict[str, Any] | None
    pending_op: dict[str, Any] | None  # an inflight.Operation as JSON
    drain_deadline_at: datetime | None


@dataclass(frozen=True)
class EventData:
    """What an audit row says beyond the state change itself."""

    kind: str | None = None
    reason: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    backoff_ms: int | None = None
    correlation_id: str | None = None
    detail: dict[str, Any] | None = None


class Effect:
    """Base of every effect: a frozen record of what happened to one pool.

    `trigger`: the FSM edge it fires (None: the state stays). `clears_leases`: the engine is gone, its leases end
    with it. `columns(before, now)`: the values it writes, given the row as it was. `audit(before)`: its audit row
    (None: none; a state change always leaves one)."""

    trigger: ClassVar[Trigger | None] = None
    clears_leases: ClassVar[bool] = False

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return {}

    def audit(self, before: PoolView) -> EventData | None:
        return None


class StateMachine(Protocol):
    def target(self, pool_id: str, state: PoolState, trigger: Trigger) -> PoolState:
        """The state `trigger` leads to from `state`; raises IllegalTransition when there is no such edge."""
        ...


__all__ = ["Effect", "EventData", "PoolColumns", "StateMachine"]
