"""Operator requests (API and CLI): drain, reload, preload, breaker reset. Each is one effect through the one
write path, its precondition checked on the locked row (`expect`); the pool's worker does the slow part and
is kicked to start at once."""

from __future__ import annotations

from poolmgr.errors import ConflictError, IllegalTransition
from poolmgr.inflight import Drain, Reload
from poolmgr.lifecycle.effects import (
    BreakerReset,
    DrainRequested,
    PreloadRequested,
    ReloadRequested,
    StopRequested,
    cpu_start,
)
from poolmgr.lifecycle.fsm import fire
from poolmgr.states import ALL_STATES, PoolState
from poolmgr.store import PoolView, Registry

MAX_DEADLINE_MS = 24 * 3600 * 1000
_NOT_DRAINING = frozenset(ALL_STATES) - {PoolState.READY, PoolState.DRAINING}
_PRELOADABLE = frozenset(ALL_STATES) - {PoolState.DRAINING, PoolState.BREAKER_OPEN}


def _check_deadline(deadline_ms: int) -> None:
    if not 0 <= deadline_ms <= MAX_DEADLINE_MS:
        raise ValueError(f"deadline_ms must be between 0 and {MAX_DEADLINE_MS}, got {deadline_ms}")


def request_drain(registry: Registry, pool_id: str, *, deadline_ms: int, correlation_id: str | None) -> PoolView:
    """A ready pool drains (no new leases; stop at zero leases or the deadline). Any other pool just stops."""
    _check_deadline(deadline_ms)
    op = Drain(registry.clock.now(), deadline_ms, correlation_id)
    try:
        return fire(registry, pool_id, DrainRequested(op), expect=[PoolState.READY])
    except IllegalTransition as exc:
        if exc.state == PoolState.DRAINING.value:
            raise ConflictError(f"pool {pool_id!r} is already draining") from None
    try:
        return fire(registry, pool_id, StopRequested(correlation_id), expect=_NOT_DRAINING)
    except IllegalTransition as exc:  # became ready or draining in between: ask again
        raise ConflictError(f"pool {pool_id!r} changed to {exc.state} meanwhile: try again") from None


def request_reload(
    registry: Registry, pool_id: str, *, model: str, drain_deadline_ms: int, correlation_id: str | None
) -> PoolView:
    """Drain, then start `model`; if it fails, the old model is restarted (rollback)."""
    _check_deadline(drain_deadline_ms)
    if not model.strip():
        raise ValueError("model must be a non-empty path")
    view = registry.get(pool_id)
    op = Reload(model, view.spec, registry.clock.now(), drain_deadline_ms, correlation_id)
    try:
        return fire(registry, pool_id, ReloadRequested(op), expect=[PoolState.READY])
    except IllegalTransition as exc:
        raise ConflictError(f"pool {pool_id!r} is {exc.state}: only a ready pool can reload") from None


def request_preload(
    registry: Registry, pool_id: str, *, correlation_id: str | None, reason: str | None = None
) -> PoolView:
    """Start a stopped pool again (its worker places and preloads it; a CPU pool is placed, with its spawn intent,
    in this same transaction: effects.cpu_start). An operator's start is a fresh start: the failure counters of
    earlier runs are cleared. An open breaker is closed with breaker/reset, not here. `reason`: who asked, when
    not an operator (LOAD_ON_DEMAND: a request to the stopped pool); in the audit row."""
    try:
        return fire(registry, pool_id, PreloadRequested(correlation_id, reason), expect=_PRELOADABLE, then=cpu_start)
    except IllegalTransition as exc:
        if exc.state == PoolState.DRAINING.value:
            raise ConflictError(f"pool {pool_id!r} is draining: preload it once the drain has finished") from None
        raise ConflictError(
            f"pool {pool_id!r}: its circuit breaker is open: close it with POST /pools/{pool_id}/breaker/reset"
        ) from None


def reset_breaker(registry: Registry, pool_id: str, *, correlation_id: str | None) -> PoolView:
    """Close an open breaker by hand: the pool starts at once, its failure counters cleared."""
    try:
        return fire(registry, pool_id, BreakerReset(correlation_id), expect=[PoolState.BREAKER_OPEN])
    except IllegalTransition as exc:
        raise ConflictError(f"pool {pool_id!r}: breaker is not open (state {exc.state})") from None


__all__ = ["MAX_DEADLINE_MS", "request_drain", "request_preload", "request_reload", "reset_breaker"]
