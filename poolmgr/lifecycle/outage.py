"""Database calls that wait out an outage: run in a thread, retried with tenacity while the database is away
(a PostgreSQL restart), saying what they wait for; poolmgr loses nothing meanwhile."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from typing import ParamSpec, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential

from poolmgr.lifecycle.effects import Noted
from poolmgr.lifecycle.fsm import MACHINE
from poolmgr.states import PoolState
from poolmgr.store import Effect, EventData, PoolView, Registry

log = logging.getLogger("poolmgr.reconciler")
_RECENT_EVENTS = 50
_FIRST_WAIT_S = 0.2  # after a first failed call; then exponential, at most 5 s
P = ParamSpec("P")
R = TypeVar("R")


def database_unavailable(exc: BaseException) -> bool:
    """The database is away (restarting, unreachable, connection dropped): worth waiting for, not a bug."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _log_wait(what: str) -> Callable[[RetryCallState], None]:
    """tenacity's before_sleep: the retry loop's attempts come after the first one `call` made on its own."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        _warn_waiting(what, state.attempt_number + 1, delay, exc)

    return before_sleep


def _warn_waiting(what: str, attempt: int, delay: float, exc: BaseException | None) -> None:
    first = str(exc).strip().splitlines()[0] if exc and str(exc).strip() else type(exc).__name__
    log.warning(
        "waiting for the database to answer %s (attempt %d, next try in %.1f s): %s", what, attempt, delay, first
    )


class RetryingRegistry:
    """The registry as the lifecycle uses it: every call in a thread, retried while the database is away."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        try:  # the steady case costs no retry loop (a node's heartbeat, every pool write)
            return await asyncio.to_thread(fn, *args, **kwargs)
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            first = exc
        what = getattr(fn, "__qualname__", None) or repr(fn)
        _warn_waiting(what, 1, _FIRST_WAIT_S, first)
        await asyncio.sleep(_FIRST_WAIT_S)
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(database_unavailable),
            wait=wait_exponential(multiplier=2 * _FIRST_WAIT_S, max=5),  # 0.4, 0.8, ... s: the sequence goes on
            before_sleep=_log_wait(what),
            reraise=True,
        ):
            with attempt:
                result = await asyncio.to_thread(fn, *args, **kwargs)
                log.warning("the database answers again (%s, attempt %d)", what, attempt.retry_state.attempt_number + 1)
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def apply(
        self,
        pool_id: str,
        effect: Effect,
        *,
        expect: Collection[PoolState] | None = None,
        then: Callable[[PoolView], Effect | None] | None = None,
    ) -> PoolView:
        """`effect` (and what `then` chains to it, in the same transaction) through the one write path, decided
        by the pool FSM."""
        return await self.call(self.registry.apply, pool_id, effect, machine=MACHINE, expect=expect, then=then)

    async def note_once(self, pool_id: str, event: EventData) -> None:
        """Append `event` as an audit row, once: a retry after a COMMIT whose answer was lost (the database went
        away) finds it already there since the pool's last state change and does not write it twice."""
        await self.call(_note_once, self.registry, pool_id, event)

    async def find(self, pool_id: str) -> PoolView | None:
        return await self.call(self.registry.find, pool_id)

    async def get(self, pool_id: str) -> PoolView:
        return await self.call(self.registry.get, pool_id)


def _note_once(registry: Registry, pool_id: str, event: EventData) -> None:
    for seen in reversed(registry.events(pool_id=pool_id, limit=_RECENT_EVENTS)):
        if seen.kind == event.kind and seen.detail == event.detail:
            return
        if seen.trigger is not None:
            break
    registry.apply(pool_id, Noted(event))


__all__ = ["RetryingRegistry", "database_unavailable"]
