"""Operator requests (API and CLI): drain, reload, preload, breaker reset. Each is one short transaction;
the pool's worker does the slow part and is kicked to start at once."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from poolmgr.errors import ConflictError, IllegalTransition
from poolmgr.lifecycle.fsm import MACHINE
from poolmgr.states import ENGINE_STATES, DesiredState, PoolState, Trigger
from poolmgr.store import EventData, PoolView, Registry

MAX_DEADLINE_MS = 24 * 3600 * 1000


def _check_deadline(deadline_ms: int) -> None:
    if not 0 <= deadline_ms <= MAX_DEADLINE_MS:
        raise ValueError(f"deadline_ms must be between 0 and {MAX_DEADLINE_MS}, got {deadline_ms}")


def request_drain(registry: Registry, pool_id: str, *, deadline_ms: int, correlation_id: str | None) -> PoolView:
    """A ready pool drains (no new leases; stop at zero leases or the deadline). Any other pool just stops."""
    _check_deadline(deadline_ms)
    view = registry.get(pool_id)
    now = registry.clock.now()
    if view.state is PoolState.READY:
        op = {
            "op": "drain",
            "started_at": now.isoformat(),
            "correlation_id": correlation_id,
            "deadline_ms": deadline_ms,
        }
        return MACHINE.fire(
            registry, pool_id, Trigger.DRAIN, expect_state=PoolState.READY,
            updates={"drain_deadline_at": now + timedelta(milliseconds=deadline_ms), "pending_op": op,
                     "desired_state": DesiredState.STOPPED.value},
            event=EventData(reason=f"drain requested, deadline {deadline_ms} ms", correlation_id=correlation_id,
                            detail={"deadline_ms": deadline_ms}),
        )  # fmt: skip
    if view.state is PoolState.DRAINING:
        raise ConflictError(f"pool {pool_id!r} is already draining")
    return registry.update(
        pool_id, desired_state=DesiredState.STOPPED.value,
        event=EventData(kind="stop_requested", reason=f"drain requested in state {view.state.value}",
                        correlation_id=correlation_id),
    )  # fmt: skip


def request_reload(
    registry: Registry, pool_id: str, *, model: str, drain_deadline_ms: int, correlation_id: str | None
) -> PoolView:
    """Drain, then start `model`; if it fails, the old model is restarted (rollback)."""
    _check_deadline(drain_deadline_ms)
    if not model.strip():
        raise ValueError("model must be a non-empty path")
    view = registry.get(pool_id)
    if view.state is not PoolState.READY:
        raise ConflictError(f"pool {pool_id!r} is {view.state.value}: only a ready pool can reload")
    now = registry.clock.now()
    op: dict[str, Any] = {
        "op": "reload", "model": model, "old_spec": view.spec.to_json(), "started_at": now.isoformat(),
        "correlation_id": correlation_id, "deadline_ms": drain_deadline_ms,
    }  # fmt: skip
    return MACHINE.fire(
        registry, pool_id, Trigger.DRAIN, expect_state=PoolState.READY,
        updates={"drain_deadline_at": now + timedelta(milliseconds=drain_deadline_ms), "pending_op": op},
        event=EventData(kind="reload_requested", reason=f"reload to {model}", correlation_id=correlation_id,
                        detail={"model": model, "old_model": view.model, "drain_deadline_ms": drain_deadline_ms}),
    )  # fmt: skip


def request_preload(registry: Registry, pool_id: str, *, correlation_id: str | None) -> PoolView:
    """Start a stopped pool again (its worker places and preloads it). An operator's start is a fresh start: the
    failure counters of earlier runs are cleared. An open breaker is closed with breaker/reset, not here."""
    view = registry.get(pool_id)
    if view.state is PoolState.DRAINING:
        raise ConflictError(f"pool {pool_id!r} is draining: preload it once the drain has finished")
    if view.state is PoolState.BREAKER_OPEN:
        raise ConflictError(
            f"pool {pool_id!r}: its circuit breaker is open: close it with POST /pools/{pool_id}/breaker/reset"
        )
    # The preload this starts carries the request's correlation id (pending_op) into its audit rows and log lines.
    starts = correlation_id and view.pending_op is None and view.state not in ENGINE_STATES
    op: dict[str, Any] = {"pending_op": {"op": "preload", "correlation_id": correlation_id}} if starts else {}
    if view.state is PoolState.STOPPED:
        op.update(consecutive_failures=0, breaker_trial=False, breaker_timeout_s=0.0, backoff_step=0)
    return registry.update(
        pool_id, desired_state=DesiredState.RUNNING.value, **op,
        event=EventData(kind="preload_requested", reason=f"preload requested in state {view.state.value}",
                        correlation_id=correlation_id),
    )  # fmt: skip


def reset_breaker(registry: Registry, pool_id: str, *, correlation_id: str | None) -> PoolView:
    """Close an open breaker by hand: the pool starts at once, its failure counters cleared."""
    try:
        return MACHINE.fire(
            registry, pool_id, Trigger.RESET_BREAKER, expect_state=PoolState.BREAKER_OPEN,
            updates={"breaker_until": None, "breaker_timeout_s": 0.0, "breaker_trial": False,
                     "consecutive_failures": 0, "backoff_step": 0, "spawn_intent_at": registry.clock.now(),
                     "desired_state": DesiredState.RUNNING.value},
            event=EventData(reason="breaker reset by operator", correlation_id=correlation_id),
        )  # fmt: skip
    except IllegalTransition as exc:
        raise ConflictError(f"pool {pool_id!r}: breaker is not open (state {exc.state})") from None


__all__ = ["request_drain", "request_preload", "request_reload", "reset_breaker"]
