"""Steps for features/registry/registry.feature against the real store (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pytest_bdd import given, parsers, scenarios, then, when
from sqlalchemy import text

from poolmgr.clock import FakeClock
from poolmgr.errors import LeaseRefused, NotFoundError
from poolmgr.inflight import Drain
from poolmgr.lifecycle.effects import DrainRequested, Placed, PreloadStarted, PreloadSucceeded, ReadyInfo
from poolmgr.lifecycle.fsm import fire
from poolmgr.lifecycle.placing import CPU_PLACEMENT
from poolmgr.poolsfile import PoolSpec
from poolmgr.store import Registry

scenarios("registry/registry.feature")


@dataclass
class Ctx:
    registry: Registry | None = None
    clock: FakeClock = field(default_factory=FakeClock)
    lease_ids: list[str] = field(default_factory=list)

    @property
    def reg(self) -> Registry:
        assert self.registry is not None
        return self.registry


@pytest.fixture
def ctx() -> Iterator[Ctx]:
    c = Ctx()
    yield c
    if c.registry is not None:
        c.registry.close()


@given(parsers.parse("an empty registry on {database}"))
def empty_registry(ctx: Ctx, request: pytest.FixtureRequest, tmp_path: Path, database: str) -> None:
    if database == "sqlite":
        url = request.getfixturevalue("sqlite_url")
    else:
        from tests.conftest import _truncate_pg

        url = request.getfixturevalue("_pg_migrated")
        _truncate_pg(url)
    ctx.registry = Registry(url, node_id="node-a", clock=ctx.clock)
    assert ctx.reg.pools() == []


@given(parsers.parse('pool "{pool}" is registered with {slots:d} slots on device mask "{mask}"'))
@when(parsers.parse('pool "{pool}" is registered with {slots:d} slots on device mask "{mask}"'))
def register(ctx: Ctx, pool: str, slots: int, mask: str) -> None:
    ctx.reg.register(PoolSpec(id=pool, model="/m.gguf", slots=slots, device_mask=mask))


def _make_ready(reg: Registry, pool: str, slots: int) -> None:
    fire(reg, pool, Placed())
    fire(reg, pool, PreloadStarted(CPU_PLACEMENT))
    fire(reg, pool, PreloadSucceeded(ReadyInfo("http://127.0.0.1:9", None, slots)))
    assert reg.get(pool).ready


@given(parsers.parse('a ready pool "{pool}" with {slots:d} slots'))
def ready_pool(ctx: Ctx, pool: str, slots: int) -> None:
    ctx.reg.register(PoolSpec(id=pool, model="/m.gguf", slots=slots))
    _make_ready(ctx.reg, pool, slots)


@when(parsers.parse('pool "{pool}" becomes ready'))
def becomes_ready(ctx: Ctx, pool: str) -> None:
    _make_ready(ctx.reg, pool, ctx.reg.get(pool).spec.slots)


@given(parsers.parse('a lease on "{pool}"'))
def lease(ctx: Ctx, pool: str) -> None:
    ctx.lease_ids.append(ctx.reg.allocate_lease(pool, ttl_s=300).id)


@given(parsers.parse('a lease on "{pool}" for {secs:d} seconds'))
def lease_for(ctx: Ctx, pool: str, secs: int) -> None:
    ctx.lease_ids.append(ctx.reg.allocate_lease(pool, ttl_s=secs).id)


@when(parsers.parse('pool "{pool}" is deregistered'))
def deregister(ctx: Ctx, pool: str) -> None:
    ctx.reg.deregister(pool)


@when(parsers.parse('{n:d} leases are taken on "{pool}"'))
def take_leases(ctx: Ctx, n: int, pool: str) -> None:
    for _ in range(n):
        ctx.lease_ids.append(ctx.reg.allocate_lease(pool, ttl_s=300).id)


@when(parsers.parse('pool "{pool}" starts draining'))
def start_draining(ctx: Ctx, pool: str) -> None:
    fire(ctx.reg, pool, DrainRequested(Drain(ctx.clock.now(), 30_000)))


@when("the lease is released twice")
def release_twice(ctx: Ctx) -> None:
    lease_id = ctx.lease_ids[0]
    assert ctx.reg.release_lease("alpha", lease_id) is True
    assert ctx.reg.release_lease("alpha", lease_id) is False


@when(parsers.parse("{secs:d} seconds pass and expired leases are reaped"))
def reap(ctx: Ctx, secs: int) -> None:
    ctx.clock.advance(secs)
    assert ctx.reg.reap_expired_leases() == len(ctx.lease_ids)


@then(parsers.parse('pool "{pool}" is in state "{state}" with {total:d} slots total and {free:d} free'))
def state_and_slots(ctx: Ctx, pool: str, state: str, total: int, free: int) -> None:
    view = ctx.reg.get(pool)
    assert (view.state.value, view.slots_total, view.slots_free) == (state, total, free)


@then(parsers.parse('pool "{pool}" has device mask "{mask}" in the pool_registry view'))
def mask_in_view(ctx: Ctx, pool: str, mask: str) -> None:
    with ctx.reg.engine.connect() as conn:
        got = conn.execute(text("SELECT device_mask FROM pool_registry WHERE pool_id = :p"), {"p": pool}).scalar_one()
    assert got == mask


@then(parsers.parse('the audit of "{pool}" holds {n:d} row of kind "{kind}"'))
def audit_rows(ctx: Ctx, pool: str, n: int, kind: str) -> None:
    events = ctx.reg.events(pool_id=pool)
    assert [e.kind for e in events] == [kind] * n


@then(parsers.parse('reading pool "{pool}" says not found'))
def not_found(ctx: Ctx, pool: str) -> None:
    with pytest.raises(NotFoundError, match="not found"):
        ctx.reg.get(pool)


@then(parsers.parse('the active leases of pool "{pool}" are {n:d}'))
def active_leases(ctx: Ctx, pool: str, n: int) -> None:
    assert ctx.reg.active_leases(pool) == n


@then(parsers.parse('pool "{pool}" has {n:d} free slots'))
def free_slots(ctx: Ctx, pool: str, n: int) -> None:
    assert ctx.reg.get(pool).slots_free == n


@then(parsers.parse('a lease on "{pool}" is refused because it is draining'))
def refused(ctx: Ctx, pool: str) -> None:
    with pytest.raises(LeaseRefused, match="draining"):
        ctx.reg.allocate_lease(pool, ttl_s=30)


@then(parsers.parse('a lease on "{pool}" is refused because it has no free slot'))
def refused_full(ctx: Ctx, pool: str) -> None:
    with pytest.raises(LeaseRefused, match="no free slot"):
        ctx.reg.allocate_lease(pool, ttl_s=30)


@then(parsers.parse('the snapshot lists pools "{ids}" in that order'))
def sorted_snapshot(ctx: Ctx, ids: str) -> None:
    assert [p.id for p in ctx.reg.pools()] == [i.strip() for i in ids.split(",")]
