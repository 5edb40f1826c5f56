"""The SQLite WriteTx of the one write path (Registry.apply: the DB-API cursor inside BEGIN IMMEDIATE) writes
exactly what the SQLAlchemy paths read back.

The effects here are the store's contract, not the lifecycle's: any columns and any audit row, so that every
column type (datetime, JSON, None into JSON and datetime, bool, float, big int) goes through the fast statements."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import ClassVar

import pytest
from sqlalchemy import text

from poolmgr.clock import FakeClock
from poolmgr.errors import IllegalTransition, NotFoundError
from poolmgr.inflight import Drain, Preload
from poolmgr.lifecycle.effects import DrainRequested, Placed
from poolmgr.lifecycle.fsm import MACHINE, fire
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import PoolState, Trigger
from poolmgr.store import Effect, EventData, PoolColumns, PoolView, Registry


@dataclass(frozen=True)
class _Write(Effect):
    """Whatever columns and audit row a test asks for."""

    values: PoolColumns = field(default_factory=PoolColumns)
    event: EventData | None = None

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return self.values

    def audit(self, before: PoolView) -> EventData | None:
        return self.event


@dataclass(frozen=True)
class _StartPreload(_Write):
    trigger: ClassVar[Trigger | None] = Trigger.START_PRELOAD


@dataclass(frozen=True)
class _PreloadOk(_Write):
    trigger: ClassVar[Trigger | None] = Trigger.PRELOAD_OK


@dataclass(frozen=True)
class _Stop(_Write):
    trigger: ClassVar[Trigger | None] = Trigger.STOP
    clears_leases: ClassVar[bool] = True


def _lease_rows(reg: Registry, pool_id: str) -> int:
    with reg.engine.connect() as conn:
        return int(conn.execute(text("SELECT COUNT(*) FROM leases WHERE pool_id = :p"), {"p": pool_id}).scalar_one())


def test_a_sqlite_write_reads_back_identically_through_sqlalchemy(sqlite_url: str, clock: FakeClock) -> None:
    reg = Registry(sqlite_url, node_id="n", clock=clock)
    assert reg._raw.sqlite
    reg.register(PoolSpec(id="p", model="/m.gguf", slots=3, extra_args=("--temp", "0")))
    fire(reg, "p", Placed())
    updates: PoolColumns = {
        "spawn_intent_at": clock.now(), "split_plan": {"device_uuids": ["GPU-1"], "ratios": [1.0]},
        "pending_op": Preload("c").to_json(), "vram_total_bytes": 80 << 30, "last_error": None,
        "breaker_trial": True, "breaker_timeout_s": 1.5, "next_restart_at": clock.now() + timedelta(seconds=3),
    }  # fmt: skip
    event = EventData(reason="why", backoff_ms=7, correlation_id="c", detail={"k": [1, 2]})
    view = fire(reg, "p", _StartPreload(updates, event))
    assert reg.get("p") == view  # read back by SQLAlchemy
    assert view.state is PoolState.PRELOADING and view.breaker_trial is True and view.live is True
    assert view.split_plan == {"device_uuids": ["GPU-1"], "ratios": [1.0]}
    assert view.next_restart_at == clock.now() + timedelta(seconds=3)
    ev = reg.events(pool_id="p")[-1]  # read back by the ORM
    assert (ev.trigger, ev.reason, ev.backoff_ms, ev.correlation_id, ev.detail) == ("start_preload", "why", 7, "c",
                                                                                   {"k": [1, 2]})  # fmt: skip
    assert ev.at == clock.now()
    # None into JSON and datetime columns, then a transition that clears leases
    fire(reg, "p", _PreloadOk({"slots_total": 3, "pending_op": None, "split_plan": None}))
    reg.allocate_lease("p", ttl_s=30)
    stopped = fire(reg, "p", _Stop({"next_restart_at": None}))
    assert reg.get("p") == stopped
    assert stopped.active_leases == 0 and _lease_rows(reg, "p") == 0
    assert stopped.pending_op is None and stopped.split_plan is None and stopped.next_restart_at is None
    reg.close()


def test_sqlite_write_errors_write_nothing(sqlite_url: str) -> None:
    reg = Registry(sqlite_url, node_id="n")
    reg.register(PoolSpec(id="p", model="/m.gguf"))
    before, n = reg.get("p"), len(reg.events())
    with pytest.raises(IllegalTransition):
        fire(reg, "p", DrainRequested(Drain(reg.clock.now(), 30_000)))
    with pytest.raises(NotFoundError):
        fire(reg, "nope", Placed())
    assert reg.get("p") == before and len(reg.events()) == n
    fire(reg, "p", Placed())  # the connection is usable afterwards
    assert reg.get("p").state is PoolState.PLACED
    reg.close()


def test_chained_effects_commit_together_with_an_audit_row_each_or_not_at_all(registry: Registry) -> None:
    """`then` chains effects into the first one's transaction (a 0 ms backoff's crash → back_off → retry):
    every step gets its own audit row and version, and a step that fails takes the whole chain back."""
    registry.register(PoolSpec(id="p", model="/m.gguf"))
    n = len(registry.events())
    steps = iter([_StartPreload(), _PreloadOk({"slots_total": 2})])
    view = registry.apply("p", Placed(), machine=MACHINE, then=lambda _v: next(steps, None))
    stored = registry.get("p")
    assert view.state is stored.state is PoolState.READY and view.slots_total == stored.slots_total == 2
    written = registry.events()[n:]
    assert [e.trigger for e in written] == ["place", "start_preload", "preload_ok"]
    assert [(e.from_state, e.to_state) for e in written] == [
        ("discovered", "placed"), ("placed", "preloading"), ("preloading", "ready")
    ]  # fmt: skip
    assert view.version == stored.version

    before, n = registry.get("p"), len(registry.events())
    illegal = iter([_StartPreload()])  # ready → start_preload: refused, so the drain before it is not kept either
    with pytest.raises(IllegalTransition):
        registry.apply(
            "p", DrainRequested(Drain(registry.clock.now(), 30_000)), machine=MACHINE, then=lambda _v: next(illegal)
        )
    assert registry.get("p") == before and len(registry.events()) == n
