"""Operator requests on the registry: preload after a stop is a fresh start; an open breaker needs a reset."""

from __future__ import annotations

import pytest

from poolmgr.errors import ConflictError
from poolmgr.lifecycle.fsm import MACHINE
from poolmgr.lifecycle.operations import request_preload
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import DesiredState, Trigger
from poolmgr.store import Registry


def _pool(registry: Registry, *triggers: Trigger) -> None:
    registry.register(PoolSpec(id="p", model="/m.gguf"))
    for trig in triggers:
        MACHINE.fire(registry, "p", trig)


def test_preload_of_a_stopped_pool_clears_the_failure_memory_of_earlier_runs(registry: Registry) -> None:
    _pool(registry, Trigger.PLACE, Trigger.START_PRELOAD, Trigger.PRELOAD_FAILED, Trigger.OPEN_BREAKER)
    registry.update("p", consecutive_failures=5, breaker_timeout_s=600.0, breaker_trial=True, backoff_step=4)
    MACHINE.fire(registry, "p", Trigger.STOP)
    view = request_preload(registry, "p", correlation_id="op-1")
    assert view.desired_state is DesiredState.RUNNING
    assert (view.consecutive_failures, view.breaker_timeout_s, view.breaker_trial, view.backoff_step) == (
        0,
        0,
        False,
        0,
    )
    assert registry.events(pool_id="p")[-1].correlation_id == "op-1"


def test_preload_of_a_pool_with_an_open_breaker_is_refused_with_the_way_out(registry: Registry) -> None:
    _pool(registry, Trigger.PLACE, Trigger.START_PRELOAD, Trigger.PRELOAD_FAILED, Trigger.OPEN_BREAKER)
    n = len(registry.events(pool_id="p"))
    with pytest.raises(ConflictError, match=r"circuit breaker is open: close it with POST /pools/p/breaker/reset"):
        request_preload(registry, "p", correlation_id=None)
    assert len(registry.events(pool_id="p")) == n
