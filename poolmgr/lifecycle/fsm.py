"""The pool finite-state machine (`transitions`), persisted through the registry.

One `Machine` serves every pool (`model=None`, `auto_transitions=False`); the state lives in the database.
Firing a trigger re-reads the pool row inside a transaction, asks the machine whether the trigger is legal
from the stored state, and writes the new state and one audit row together (see Registry.transition).

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

import threading
from typing import Any

from transitions import Machine, MachineError

from poolmgr.errors import IllegalTransition
from poolmgr.states import ALL_STATES, PoolState, Trigger
from poolmgr.store import Decision, EventData, PoolView, Registry

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


class _Probe:
    """A throw-away model: the machine tells us the target state of a trigger from a given state."""

    state: str

    def __init__(self, state: str) -> None:
        self.state = state


class PoolMachine:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, _Probe] = {}
        self._machine = Machine(
            model=None,
            states=[s.value for s in ALL_STATES],
            transitions=[
                {"trigger": t.value, "source": [s.value for s in src], "dest": dst.value} for t, src, dst in EDGES
            ],
            initial=S.DISCOVERED.value,
            auto_transitions=False,
            send_event=False,
        )

    def _model(self, pool_id: str) -> _Probe:
        # One long-lived model per pool (adding a model to the machine is the expensive part).
        with self._lock:
            probe = self._models.get(pool_id)
            if probe is None:
                probe = self._models[pool_id] = _Probe(S.DISCOVERED.value)
                self._machine.add_model(probe, initial=S.DISCOVERED.value)
            return probe

    def target(self, pool_id: str, state: PoolState, trigger: Trigger) -> PoolState:
        """The state `trigger` leads to from `state`; IllegalTransition when there is no such edge."""
        probe = self._model(pool_id)
        with self._lock:
            self._machine.set_state(state.value, model=probe)
            try:
                getattr(probe, trigger.value)()
            except (MachineError, AttributeError):
                raise IllegalTransition(pool_id, trigger.value, state.value) from None
            return PoolState(probe.state)

    def allowed(self, state: PoolState) -> list[Trigger]:
        return [t for t, src, _ in EDGES if state in src]

    def fire(
        self,
        registry: Registry,
        pool_id: str,
        trigger: Trigger,
        *,
        event: EventData | None = None,
        updates: dict[str, Any] | None = None,
        expect_state: PoolState | None = None,
        clear_leases: bool = False,
    ) -> PoolView:
        """Fire `trigger` on the stored pool; persist the new state + audit row atomically.

        `expect_state`: only fire if the pool is still in this state (else IllegalTransition, nothing written).
        """

        def decide(view: PoolView) -> Decision:
            if expect_state is not None and view.state is not expect_state:
                raise IllegalTransition(pool_id, trigger.value, view.state.value)
            dest = self.target(pool_id, view.state, trigger)
            return Decision(
                to_state=dest,
                trigger=trigger.value,
                updates=dict(updates or {}),
                event=event or EventData(),
                clear_leases=clear_leases,
            )

        view, _ = registry.transition(pool_id, decide)
        return view


MACHINE = PoolMachine()

__all__ = ["EDGES", "MACHINE", "PoolMachine"]
