"""The SQLite fast path of Registry.transition writes exactly what the SQLAlchemy paths read back."""

from __future__ import annotations

from datetime import timedelta

import pytest

from poolmgr.clock import FakeClock
from poolmgr.errors import IllegalTransition, NotFoundError
from poolmgr.lifecycle.fsm import MACHINE
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import PoolState, Trigger
from poolmgr.store import EventData, Registry


def test_a_fast_transition_reads_back_identically_through_the_orm(sqlite_url: str, clock: FakeClock) -> None:
    reg = Registry(sqlite_url, node_id="n", clock=clock)
    assert reg._sqlite is not None
    reg.register(PoolSpec(id="p", model="/m.gguf", slots=3, extra_args=("--temp", "0")))
    MACHINE.fire(reg, "p", Trigger.PLACE)
    updates = {
        "spawn_intent_at": clock.now(), "split_plan": {"device_uuids": ["GPU-1"], "ratios": [1.0]},
        "pending_op": {"op": "preload", "correlation_id": "c"}, "vram_total_bytes": 80 << 30, "last_error": None,
        "breaker_trial": True, "breaker_timeout_s": 1.5, "next_restart_at": clock.now() + timedelta(seconds=3),
    }  # fmt: skip
    view = MACHINE.fire(
        reg, "p", Trigger.START_PRELOAD, updates=updates,
        event=EventData(reason="why", backoff_ms=7, correlation_id="c", detail={"k": [1, 2]}),
    )  # fmt: skip
    assert reg.get("p") == view  # read back by the ORM
    assert view.state is PoolState.PRELOADING and view.breaker_trial is True and view.live is True
    assert view.split_plan == {"device_uuids": ["GPU-1"], "ratios": [1.0]}
    assert view.next_restart_at == clock.now() + timedelta(seconds=3)
    ev = reg.events(pool_id="p")[-1]
    assert (ev.trigger, ev.reason, ev.backoff_ms, ev.correlation_id, ev.detail) == ("start_preload", "why", 7, "c",
                                                                                   {"k": [1, 2]})  # fmt: skip
    assert ev.at == clock.now()
    # None into JSON and datetime columns, then a transition that clears leases
    MACHINE.fire(reg, "p", Trigger.PRELOAD_OK, updates={"slots_total": 3, "pending_op": None, "split_plan": None})
    reg.allocate_lease("p", ttl_s=30)
    stopped = MACHINE.fire(reg, "p", Trigger.STOP, updates={"next_restart_at": None}, clear_leases=True)
    assert reg.get("p") == stopped
    assert stopped.active_leases == 0 and reg.leases("p") == []
    assert stopped.pending_op is None and stopped.split_plan is None and stopped.next_restart_at is None
    reg.close()


def test_fast_path_errors_write_nothing(sqlite_url: str) -> None:
    reg = Registry(sqlite_url, node_id="n")
    reg.register(PoolSpec(id="p", model="/m.gguf"))
    before, n = reg.get("p"), len(reg.events())
    with pytest.raises(IllegalTransition):
        MACHINE.fire(reg, "p", Trigger.DRAIN)
    with pytest.raises(NotFoundError):
        MACHINE.fire(reg, "nope", Trigger.PLACE)
    assert reg.get("p") == before and len(reg.events()) == n
    MACHINE.fire(reg, "p", Trigger.PLACE)  # the connection is usable afterwards
    assert reg.get("p").state is PoolState.PLACED
    reg.close()
