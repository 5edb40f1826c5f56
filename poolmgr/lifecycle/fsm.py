"""The pool finite-state machine (`transitions`), persisted through the registry.

One `transitions.Machine` holds the table (`model=None`, `auto_transitions=False`, every edge a named trigger).
It is asked, never fired: the write path (Registry.apply) reads the pool row under its lock and asks
`target(state, trigger)`, which looks the edge up with `Machine.get_transitions`. We deliberately keep no
per-pool model object with a `state` attribute (the package's usual use): the database row is the state, and a
second copy in memory is exactly what a lost race or a second node would make disagree with it. Slow work never
runs in callbacks (there are none): the worker does it between triggers.

    discovered ─place→ placed ─start_preload→ preloading ─preload_ok→ ready ─drain→ draining ─drain_done→ stopped
                                                │                      │            │  └─reload→ placed
                                     preload_failed                  crash        crash
                                                ▼                      ▼            ▼
                         crashed ─back_off→ backoff ─retry→ preloading
                            │                  └─open_breaker→ breaker-open ─trial_start / reset_breaker→ preloading
                            └─rollback→ placed (a failed reload restarts the old model)
    stop: placed, preloading, ready, draining, crashed, backoff, breaker-open → stopped; place: stopped → placed
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from transitions import Machine

from poolmgr.errors import IllegalTransition
from poolmgr.states import ALL_STATES, PoolState, Trigger
from poolmgr.store import Effect, PoolView, Registry

S = PoolState
T = Trigger

EDGES: tuple[tuple[Trigger, tuple[PoolState, ...], PoolState], ...] = (
    (T.PLACE, (S.DISCOVERED, S.STOPPED), S.PLACED),
    (T.START_PRELOAD, (S.PLACED,), S.PRELOADING),
    (T.PRELOAD_OK, (S.PRELOADING,), S.READY),
    (T.PRELOAD_FAILED, (S.PLACED, S.PRELOADING), S.CRASHED),
    (T.CRASH, (S.READY, S.DRAINING), S.CRASHED),
    (T.BACK_OFF, (S.CRASHED,), S.BACKOFF),
    (T.RETRY, (S.BACKOFF,), S.PRELOADING),
    (T.OPEN_BREAKER, (S.CRASHED, S.BACKOFF), S.BREAKER_OPEN),
    (T.TRIAL_START, (S.BREAKER_OPEN,), S.PRELOADING),
    (T.RESET_BREAKER, (S.BREAKER_OPEN,), S.PRELOADING),
    (T.DRAIN, (S.READY,), S.DRAINING),
    (T.DRAIN_DONE, (S.DRAINING,), S.STOPPED),
    (T.RELOAD, (S.DRAINING,), S.PLACED),
    (T.ROLLBACK, (S.CRASHED, S.BACKOFF), S.PLACED),
    (T.STOP, (S.PLACED, S.PRELOADING, S.READY, S.DRAINING, S.CRASHED, S.BACKOFF, S.BREAKER_OPEN), S.STOPPED),
)


class PoolMachine:
    """The pool FSM (store.StateMachine): which state a trigger leads to from a stored state."""

    def __init__(self) -> None:
        self._machine = Machine(
            model=None,
            states=[s.value for s in ALL_STATES],
            transitions=[
                {"trigger": t.value, "source": [s.value for s in src], "dest": dst.value} for t, src, dst in EDGES
            ],
            initial=S.DISCOVERED.value,
            auto_transitions=False,
        )

    def target(self, pool_id: str, state: PoolState, trigger: Trigger) -> PoolState:
        """The state `trigger` leads to from `state`; IllegalTransition when there is no such edge."""
        edges = self._machine.get_transitions(trigger=trigger.value, source=state.value)
        if not edges:
            raise IllegalTransition(pool_id, trigger.value, state.value)
        return PoolState(edges[0].dest)


MACHINE = PoolMachine()


def fire(
    registry: Registry,
    pool_id: str,
    effect: Effect,
    *,
    expect: Collection[PoolState] | None = None,
    then: Callable[[PoolView], Effect | None] | None = None,
) -> PoolView:
    """Apply `effect` to a pool through the one write path, its trigger decided by this machine (synchronous:
    for operator requests and tests; the workers go through RetryingRegistry.apply). `then`: Registry.apply's."""
    return registry.apply(pool_id, effect, machine=MACHINE, expect=expect, then=then)


__all__ = ["EDGES", "MACHINE", "PoolMachine", "fire"]
