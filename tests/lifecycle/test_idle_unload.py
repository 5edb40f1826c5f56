"""`idle_unload_s` on the injected clock: the real reconciler and worker, a real (fake llama-server) engine, and a
clock that only the test moves past the idle time. A pool is unloaded once it has had no request through the data
plane and no lease for that long — never while one keeps it busy — and the audit says it was idle."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from poolmgr.clock import FakeClock
from poolmgr.lifecycle.reconciler import Reconciler
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import PoolState
from poolmgr.store import EventView, Registry
from tests.lifecycle.conftest import MakeEngineDir
from tests.lifecycle.test_fake_clock_deadlines import _cfg, _run, _until

IDLE_S = 60.0
_STILL_S = 0.4  # real time the worker gets to act on a clock step that must change nothing


class HeldClock(FakeClock):
    """A fake clock whose short sleeps (the drain's polls) pass at once, as FakeClock's do, while a sleep
    longer than `free_s` (the idle timer) lasts until the test has moved the clock past its end."""

    def __init__(self, free_s: float = 0.5) -> None:
        super().__init__()
        self.free_s = free_s

    async def sleep(self, seconds: float) -> None:
        if seconds <= self.free_s:
            await super().sleep(seconds)
            return
        until = self.monotonic() + seconds
        while self.monotonic() < until:
            await asyncio.sleep(0.01)


async def _ready_and_watched(rec: Reconciler, registry: Registry, pool_id: str) -> None:
    await _until(lambda: registry.get(pool_id).state is PoolState.READY, 20, "ready")
    await _until(lambda: rec.runtime.prober.watching() == 1, 5, "the engine watched")  # its idle timer runs


async def _stays_ready(registry: Registry, pool_id: str) -> None:
    await asyncio.sleep(_STILL_S)
    assert registry.get(pool_id).state is PoolState.READY


def _idle_events(registry: Registry, pool_id: str) -> tuple[EventView, EventView]:
    """The audit rows of the unload: the drain it started, and the drain's end."""
    events = registry.events(pool_id=pool_id)
    (unload,) = [e for e in events if e.reason == "idle_unload"]
    (drained,) = [e for e in events if e.kind == "drained"]
    return unload, drained


def _spec(engine_dir: Any, pool_id: str) -> PoolSpec:
    return PoolSpec(id=pool_id, model=str(engine_dir / "tiny.gguf"), idle_unload_s=IDLE_S)


def test_an_idle_pool_is_unloaded_once_idle_unload_s_has_passed_on_the_clock(
    sqlite_url: str, make_engine_dir: MakeEngineDir
) -> None:
    engine_dir = make_engine_dir()
    clock = HeldClock()

    async def body(rec: Reconciler, registry: Registry) -> None:
        await _ready_and_watched(rec, registry, "idle")
        ready = registry.get("idle")
        assert ready.pid is not None and ready.pid_start_time is not None
        clock.advance(IDLE_S - 1)
        await _stays_ready(registry, "idle")
        clock.advance(2)
        await _until(lambda: registry.get("idle").state is PoolState.STOPPED, 10, "unloaded")
        assert not rec.runtime.launcher.is_alive(ready.pid, ready.pid_start_time)  # the engine stopped

    registry = _run(_cfg(engine_dir), sqlite_url, clock, _spec(engine_dir, "idle"), body)
    try:
        unload, drained = _idle_events(registry, "idle")
        assert (unload.from_state, unload.to_state, unload.trigger) == ("ready", "draining", "drain")
        idle = unload.detail or {}
        assert IDLE_S <= idle["idle_s"] < IDLE_S + 2 and idle["idle_unload_s"] == IDLE_S
        detail = drained.detail or {}
        assert (detail["reason"], detail["outcome"], detail["cut_requests"]) == ("idle_unload", "drained", 0)
        view = registry.get("idle")
        assert view.pid is None and view.pending_op is None
    finally:
        registry.close()


def test_a_request_in_flight_keeps_the_pool_loaded_and_the_idle_time_counts_from_its_end(
    sqlite_url: str, make_engine_dir: MakeEngineDir
) -> None:
    engine_dir = make_engine_dir()
    clock = HeldClock()

    async def body(rec: Reconciler, registry: Registry) -> None:
        await _ready_and_watched(rec, registry, "busy")
        traffic = rec.runtime.traffic.get("busy")
        done = asyncio.Event()

        async def request() -> None:  # a long generation through the data plane's gate
            async with traffic.admit() as ticket:
                await ticket.run(done.wait())

        running = asyncio.ensure_future(request())
        await _until(lambda: traffic.in_flight == 1, 5, "the request admitted")
        clock.advance(3 * IDLE_S)  # idle_unload_s three times over, with the request still running
        await _stays_ready(registry, "busy")
        done.set()
        await running
        assert traffic.in_flight == 0
        clock.advance(IDLE_S - 1)  # counted from the request's end, not from the last look
        await _stays_ready(registry, "busy")
        clock.advance(2)
        await _until(lambda: registry.get("busy").state is PoolState.STOPPED, 10, "unloaded")

    registry = _run(_cfg(engine_dir), sqlite_url, clock, _spec(engine_dir, "busy"), body)
    try:
        unload, drained = _idle_events(registry, "busy")
        assert IDLE_S <= (unload.detail or {})["idle_s"] < IDLE_S + 2
        assert (drained.detail or {})["outcome"] == "drained"
    finally:
        registry.close()


def test_a_held_lease_keeps_the_pool_loaded_and_the_idle_time_counts_from_its_release(
    sqlite_url: str, make_engine_dir: MakeEngineDir
) -> None:
    engine_dir = make_engine_dir()
    clock = HeldClock()

    async def body(rec: Reconciler, registry: Registry) -> None:
        await _ready_and_watched(rec, registry, "leased")
        lease = registry.allocate_lease("leased", ttl_s=24 * 3600)
        clock.advance(3 * IDLE_S)
        await _stays_ready(registry, "leased")
        assert registry.release_lease("leased", lease.id)
        rec.kick("leased")  # as the API does after a release
        await asyncio.sleep(_STILL_S)  # the worker sees the release
        clock.advance(IDLE_S - 1)
        await _stays_ready(registry, "leased")
        clock.advance(2)
        await _until(lambda: registry.get("leased").state is PoolState.STOPPED, 10, "unloaded")

    registry = _run(_cfg(engine_dir), sqlite_url, clock, _spec(engine_dir, "leased"), body)
    try:
        unload, drained = _idle_events(registry, "leased")
        assert IDLE_S <= (unload.detail or {})["idle_s"] < IDLE_S + 2
        assert (drained.detail or {})["final_leases"] == 0
    finally:
        registry.close()


def test_a_pool_without_idle_unload_s_is_never_unloaded(sqlite_url: str, make_engine_dir: MakeEngineDir) -> None:
    engine_dir = make_engine_dir()
    clock = HeldClock()
    spec = PoolSpec(id="always", model=str(engine_dir / "tiny.gguf"))

    async def body(rec: Reconciler, registry: Registry) -> None:
        await _ready_and_watched(rec, registry, "always")
        started = time.monotonic()
        clock.advance(365 * 24 * 3600)
        await _stays_ready(registry, "always")
        assert time.monotonic() - started < 5

    registry = _run(_cfg(engine_dir), sqlite_url, clock, spec, body)
    try:
        assert not [e for e in registry.events(pool_id="always") if e.reason == "idle_unload"]
    finally:
        registry.close()
