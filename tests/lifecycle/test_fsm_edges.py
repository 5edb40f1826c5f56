"""One test per FSM edge, named after it, on SQLite and PostgreSQL: state + exactly one audit row."""

from __future__ import annotations

import pytest

from poolmgr.errors import IllegalTransition
from poolmgr.lifecycle.fsm import EDGES, fire
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import ALL_STATES, PoolState, Trigger
from poolmgr.store import Registry
from tests.pool_steps import EFFECT_FOR, step

S = PoolState
T = Trigger

# A legal path from `discovered` to every state, so each edge can be tested from a real stored state.
PATH_TO: dict[PoolState, list[Trigger]] = {
    S.DISCOVERED: [],
    S.PLACED: [T.PLACE],
    S.PRELOADING: [T.PLACE, T.START_PRELOAD],
    S.READY: [T.PLACE, T.START_PRELOAD, T.PRELOAD_OK],
    S.DRAINING: [T.PLACE, T.START_PRELOAD, T.PRELOAD_OK, T.DRAIN],
    S.CRASHED: [T.PLACE, T.START_PRELOAD, T.PRELOAD_FAILED],
    S.BACKOFF: [T.PLACE, T.START_PRELOAD, T.PRELOAD_FAILED, T.BACK_OFF],
    S.BREAKER_OPEN: [T.PLACE, T.START_PRELOAD, T.PRELOAD_FAILED, T.OPEN_BREAKER],
    S.STOPPED: [T.PLACE, T.STOP],
}


def _pool_in(registry: Registry, state: PoolState) -> str:
    registry.register(PoolSpec(id="p1", model="/m.gguf"))
    step(registry, "p1", *PATH_TO[state])
    assert registry.get("p1").state is state
    return "p1"


def _edge_cases() -> list[object]:
    cases = []
    for trig, sources, dest in EDGES:
        for src in sources:
            name = f"test_transition_{src.value.replace('-', '_')}_to_{dest.value.replace('-', '_')}_on_{trig.value}"
            cases.append(pytest.param(src, trig, dest, id=name))
    return cases


@pytest.mark.parametrize(("src", "trig", "dest"), _edge_cases())
def test_transition_edge_persists_state_and_one_audit_row(
    registry: Registry, src: PoolState, trig: Trigger, dest: PoolState
) -> None:
    pid = _pool_in(registry, src)
    before = registry.get(pid)
    n_events = len(registry.events(pool_id=pid))
    effect = EFFECT_FOR[trig]()
    assert effect.trigger is trig
    audit = effect.audit(before)
    after = fire(registry, pid, effect)
    assert after.state is dest
    assert after.version == before.version + 1
    assert registry.get(pid).state is dest
    events = registry.events(pool_id=pid)
    assert len(events) == n_events + 1
    ev = events[-1]
    assert (ev.from_state, ev.to_state, ev.trigger) == (src.value, dest.value, trig.value)
    if audit is not None:  # the audit row says what the effect says
        assert (ev.reason, ev.correlation_id, ev.backoff_ms) == (audit.reason, audit.correlation_id, audit.backoff_ms)
    assert after.ready is (dest is S.READY)
    assert after.draining is (dest is S.DRAINING)


def _illegal_cases() -> list[object]:
    legal = {(src, trig) for trig, sources, _ in EDGES for src in sources}
    return [
        pytest.param(src, trig, id=f"{src.value}-{trig.value}")
        for src in ALL_STATES
        for trig in Trigger
        if (src, trig) not in legal
    ]


@pytest.mark.parametrize(("src", "trig"), _illegal_cases())
def test_illegal_trigger_raises_and_writes_nothing(sqlite_url: str, src: PoolState, trig: Trigger) -> None:
    registry = Registry(sqlite_url, node_id="node-a")
    pid = _pool_in(registry, src)
    before = registry.get(pid)
    n_events = len(registry.events(pool_id=pid))
    with pytest.raises(IllegalTransition, match=f"trigger '{trig.value}' is not allowed from state '{src.value}'"):
        fire(registry, pid, EFFECT_FOR[trig]())
    assert registry.get(pid) == before
    assert len(registry.events(pool_id=pid)) == n_events
    registry.close()


def test_every_state_on_the_design_card_is_reachable() -> None:
    reachable = {S.DISCOVERED} | {dest for _, _, dest in EDGES}
    assert reachable == set(ALL_STATES)
