"""Operator requests on the registry: preload after a stop is a fresh start; an open breaker needs a reset."""

from __future__ import annotations

from dataclasses import replace

import pytest

from poolmgr.errors import ConflictError
from poolmgr.lifecycle.effects import Placed, Stopped, cpu_start
from poolmgr.lifecycle.fsm import fire
from poolmgr.lifecycle.operations import request_preload
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import DesiredState, Trigger
from poolmgr.store import Registry
from tests.pool_steps import step


def _pool(registry: Registry, *triggers: Trigger) -> None:
    registry.register(PoolSpec(id="p", model="/m.gguf"))
    step(registry, "p", *triggers)


def test_preload_of_a_stopped_pool_clears_the_failure_memory_of_earlier_runs(registry: Registry) -> None:
    _pool(registry, Trigger.PLACE, Trigger.START_PRELOAD, Trigger.PRELOAD_FAILED, Trigger.OPEN_BREAKER)
    # a history of failures: five failed starts, backoff step 4, an open breaker, stopped mid half-open trial
    for _ in range(4):
        step(registry, "p", Trigger.TRIAL_START, Trigger.PRELOAD_FAILED, Trigger.BACK_OFF, Trigger.OPEN_BREAKER)
    failing = step(registry, "p", Trigger.TRIAL_START)
    assert (failing.consecutive_failures, failing.breaker_trial, failing.backoff_step) == (5, True, 4)
    assert failing.breaker_timeout_s > 0
    fire(registry, "p", Stopped())
    view = request_preload(registry, "p", correlation_id="op-1")
    assert view.desired_state is DesiredState.RUNNING
    assert (view.consecutive_failures, view.breaker_timeout_s, view.breaker_trial, view.backoff_step) == (
        0,
        0,
        False,
        0,
    )
    # a CPU pool is placed, with its spawn intent, in the request's own transaction (effects.cpu_start)
    last = registry.events(pool_id="p")[-3:]
    assert [(e.kind, e.correlation_id) for e in last] == [
        ("preload_requested", "op-1"), ("place", None), ("start_preload", None)
    ]  # fmt: skip
    assert registry.get("p").state.value == "preloading" and registry.get("p").spawn_intent_at is not None


def test_preload_of_a_pool_with_an_open_breaker_is_refused_with_the_way_out(registry: Registry) -> None:
    _pool(registry, Trigger.PLACE, Trigger.START_PRELOAD, Trigger.PRELOAD_FAILED, Trigger.OPEN_BREAKER)
    n = len(registry.events(pool_id="p"))
    with pytest.raises(ConflictError, match=r"circuit breaker is open: close it with POST /pools/p/breaker/reset"):
        request_preload(registry, "p", correlation_id=None)
    assert len(registry.events(pool_id="p")) == n


def test_a_cpu_pools_start_is_chained_only_when_nothing_else_must_come_first(registry: Registry) -> None:
    """effects.cpu_start places a CPU pool in the request's transaction — not a GPU pool (its place row is its
    claim), not a pool being removed, not one whose stopped row still records an engine (the worker's sweep
    settles that first)."""
    registry.register(PoolSpec(id="cpu", model="/m.gguf"))
    registry.register(PoolSpec(id="gpu", model="/m.gguf", device_mask="0"))
    assert isinstance(cpu_start(registry.get("cpu")), Placed)
    assert cpu_start(registry.get("gpu")) is None
    removing = registry.mark_removed("cpu")
    assert removing.removed_at is not None and cpu_start(removing) is None
    stopped_with_pid = replace(registry.get("gpu"), spec=registry.get("cpu").spec, pid=4242, removed_at=None)
    assert cpu_start(stopped_with_pid) is None
