"""Registry operations (B-REG) on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import text

from poolmgr.clock import FakeClock, utcnow
from poolmgr.errors import IllegalTransition, LeaseRefused, NotFoundError
from poolmgr.inflight import Drain
from poolmgr.lifecycle.effects import (
    DrainRequested,
    ErrorNoted,
    Placed,
    PreloadStarted,
    PreloadSucceeded,
    ReadyInfo,
    Stopped,
)
from poolmgr.lifecycle.fsm import fire
from poolmgr.lifecycle.placing import CPU_PLACEMENT
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import PoolState
from poolmgr.store import PoolView, Registry


def _preloading(registry: Registry, pool_id: str = "p1", slots: int = 2) -> PoolView:
    registry.register(PoolSpec(id=pool_id, model="/m.gguf", slots=slots))
    fire(registry, pool_id, Placed())
    return fire(registry, pool_id, PreloadStarted(CPU_PLACEMENT))


def _ready_pool(registry: Registry, pool_id: str = "p1", slots: int = 2) -> None:
    _preloading(registry, pool_id, slots)
    fire(registry, pool_id, PreloadSucceeded(ReadyInfo("http://127.0.0.1:9", None, slots)))


def _drain() -> DrainRequested:
    return DrainRequested(Drain(utcnow(), 30_000))


def test_register_creates_discovered_pool_with_audit_row(registry: Registry) -> None:
    view = registry.register(PoolSpec(id="p1", model="/m.gguf", slots=3, device_mask="cpu"))
    assert view.state is PoolState.DISCOVERED
    assert (view.slots_total, view.slots_free, view.active_leases, view.restart_count) == (3, 0, 0, 0)
    assert view.device_mask == "cpu"
    assert [e.kind for e in registry.events(pool_id="p1")] == ["registered"]


def test_register_twice_keeps_state_and_updates_spec(registry: Registry) -> None:
    registry.register(PoolSpec(id="p1", model="/a.gguf"))
    fire(registry, "p1", Placed())
    view = registry.register(PoolSpec(id="p1", model="/b.gguf"))
    assert view.state is PoolState.PLACED
    assert view.model == "/b.gguf"
    assert registry.register(PoolSpec(id="p1", model="/b.gguf")).version == view.version


def test_deregister_removes_pool_and_keeps_its_audit(registry: Registry) -> None:
    registry.register(PoolSpec(id="p1", model="/m.gguf"))
    registry.deregister("p1")
    assert registry.find("p1") is None
    assert [e.kind for e in registry.events(pool_id="p1")] == ["registered", "deregistered"]


def test_unknown_pool_is_not_found_never_a_crash(registry: Registry) -> None:
    with pytest.raises(NotFoundError, match="pool 'nope' not found"):
        registry.get("nope")
    with pytest.raises(NotFoundError):
        fire(registry, "nope", Placed())
    with pytest.raises(NotFoundError):
        registry.deregister("nope")
    assert registry.active_leases("nope") == 0


def test_snapshots_are_sorted_by_pool_id(registry: Registry) -> None:
    for pid in ("zeta", "alpha", "mid"):
        registry.register(PoolSpec(id=pid, model="/m.gguf"))
    assert [p.id for p in registry.pools()] == ["alpha", "mid", "zeta"]


def _free_in_view(registry: Registry, pool_id: str) -> int:
    with registry.engine.connect() as conn:
        q = text("SELECT slots_free FROM pool_registry WHERE pool_id = :p")
        return int(conn.execute(q, {"p": pool_id}).scalar_one())


def test_slots_are_clamped_to_zero_and_total(registry: Registry) -> None:
    """slots_free is derived (total minus leases while ready, else 0): never above the total, never below zero,
    in the PoolView and in the pool_registry view alike."""
    registry.register(PoolSpec(id="p1", model="/m.gguf", slots=4))
    assert registry.get("p1").slots_free == 0 == _free_in_view(registry, "p1")  # not ready: nothing free
    _ready_pool(registry, "p1", slots=4)
    assert registry.get("p1").slots_free == 4 == _free_in_view(registry, "p1")
    for _ in range(4):
        registry.allocate_lease("p1", ttl_s=30)
    with pytest.raises(LeaseRefused, match="no free slot"):
        registry.allocate_lease("p1", ttl_s=30)
    assert registry.get("p1").slots_free == 0 == _free_in_view(registry, "p1")
    _ready_pool(registry, "p2", slots=2)
    assert registry.get("p2").slots_free == 2 == _free_in_view(registry, "p2")


def test_health_and_last_error_are_recorded(registry: Registry, clock: FakeClock) -> None:
    """A serving pool's heartbeat is its node's (one write per node, none per pool); a stopped one keeps the
    last it had."""
    _preloading(registry)
    assert registry.get("p1").live is True
    ready = fire(registry, "p1", PreloadSucceeded(ReadyInfo("http://127.0.0.1:9", None, 2)))
    assert ready.heartbeat_at == clock.now()  # ready: known up now
    clock.advance(5)
    registry.heartbeat_node("host")
    view = registry.get("p1")
    assert view.heartbeat_at == clock.now()
    with registry.engine.connect() as conn:  # the view says the same (as stored text on SQLite)
        in_view = conn.execute(text("SELECT heartbeat_at FROM pool_registry WHERE pool_id = 'p1'")).scalar_one()
    assert str(in_view).replace("T", " ").startswith(clock.now().strftime("%Y-%m-%d %H:%M:%S"))
    clock.advance(5)
    stopped = fire(registry, "p1", Stopped())
    registry.heartbeat_node("host")
    assert registry.get("p1").heartbeat_at == clock.now() - timedelta(seconds=5) == stopped.heartbeat_at
    assert fire(registry, "p1", ErrorNoted("health check failed: boom")).last_error == "health check failed: boom"


def test_lease_allocate_and_release_follow_slots(registry: Registry) -> None:
    _ready_pool(registry, slots=2)
    lease = registry.allocate_lease("p1", ttl_s=30)
    view = registry.get("p1")
    assert (view.active_leases, view.slots_free) == (1, 1)
    assert registry.release_lease("p1", lease.id) is True
    assert registry.release_lease("p1", lease.id) is False  # never below zero
    view = registry.get("p1")
    assert (view.active_leases, view.slots_free) == (0, 2)


def test_lease_refused_while_draining_and_count_unchanged(registry: Registry) -> None:
    _ready_pool(registry)
    registry.allocate_lease("p1", ttl_s=30)
    fire(registry, "p1", _drain())
    with pytest.raises(LeaseRefused, match="draining"):
        registry.allocate_lease("p1", ttl_s=30)
    assert registry.get("p1").active_leases == 1


def test_lease_refused_when_not_ready_or_full(registry: Registry) -> None:
    registry.register(PoolSpec(id="p1", model="/m.gguf"))
    with pytest.raises(LeaseRefused, match="not ready"):
        registry.allocate_lease("p1", ttl_s=30)
    _ready_pool(registry, "p2", slots=1)
    registry.allocate_lease("p2", ttl_s=30)
    with pytest.raises(LeaseRefused, match="no free slot"):
        registry.allocate_lease("p2", ttl_s=30)


def test_expired_leases_are_reaped(registry: Registry, clock: FakeClock) -> None:
    _ready_pool(registry, slots=2)
    registry.allocate_lease("p1", ttl_s=10)
    registry.allocate_lease("p1", ttl_s=100)
    assert registry.heartbeat_node("host").expired_leases is False  # the heartbeat's transaction says whether to reap
    clock.advance(11)
    other = Registry(registry.url, node_id="node-b", clock=clock)
    try:
        assert (
            other.heartbeat_node("host-b").expired_leases is False and other.reap_expired_leases() == 0
        )  # not node-b's pool
    finally:
        other.close()
    assert registry.heartbeat_node("host").expired_leases is True
    assert registry.reap_expired_leases() == 1
    view = registry.get("p1")
    assert (view.active_leases, view.slots_free) == (1, 1)
    assert registry.events(pool_id="p1")[-1].kind == "preload_ok"  # leases leave no audit row: leases is theirs


def test_two_writers_racing_on_one_pool_one_wins_no_lost_or_doubled_event(db_url: str) -> None:
    setup = Registry(db_url, node_id="node-a")
    _ready_pool(setup)
    n_before = len(setup.events(pool_id="p1"))
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def writer() -> None:
        reg = Registry(db_url, node_id="node-a")
        barrier.wait()
        try:
            fire(reg, "p1", _drain())
            outcomes.append("won")
        except IllegalTransition:
            outcomes.append("lost")
        finally:
            reg.close()

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["lost"] * 7 + ["won"]
    events = setup.events(pool_id="p1")
    assert len(events) == n_before + 1
    assert events[-1].trigger == "drain"
    assert setup.get("p1").state is PoolState.DRAINING
    setup.close()


def test_concurrent_leases_never_exceed_slots(db_url: str) -> None:
    setup = Registry(db_url, node_id="node-a")
    _ready_pool(setup, slots=3)
    got: list[str] = []
    barrier = threading.Barrier(6)

    def taker() -> None:
        reg = Registry(db_url, node_id="node-a")
        barrier.wait()
        try:
            got.append(reg.allocate_lease("p1", ttl_s=30).id)
        except LeaseRefused:
            pass
        finally:
            reg.close()

    threads = [threading.Thread(target=taker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    view = setup.get("p1")
    assert len(got) == 3 and (view.active_leases, view.slots_free) == (3, 0)
    setup.close()


def test_state_check_constraint_rejects_unknown_state(registry: Registry) -> None:
    registry.register(PoolSpec(id="p1", model="/m.gguf"))
    with pytest.raises(Exception, match=r"(?i)check"), registry.engine.begin() as conn:
        conn.execute(text("UPDATE pools SET state = 'bogus' WHERE id = 'p1'"))
    assert registry.get("p1").state is PoolState.DISCOVERED


def test_pool_registry_view_is_the_read_contract(registry: Registry) -> None:
    _ready_pool(registry, slots=2)
    with registry.engine.connect() as conn:
        row = conn.execute(
            text("SELECT pool_id, state, ready, draining, slots_total, slots_free, device_mask FROM pool_registry")
        ).one()
    assert tuple(row) == ("p1", "ready", True, False, 2, 2, "cpu")
