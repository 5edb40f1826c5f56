"""Counters and histograms derived from the audit table, on SQLite and PostgreSQL: the rows the lifecycle
writes (through the real FSM and registry, on a fake clock) become the right series, read incrementally or
all at once, after a restart, and while the database is away."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from poolmgr.clock import FakeClock
from poolmgr.devices import Inventory
from poolmgr.engines import ExitInfo
from poolmgr.errors import PreloadFailed
from poolmgr.inflight import Drain, Reload
from poolmgr.lifecycle.effects import (
    BackedOff,
    BreakerOpened,
    BreakerReset,
    Crashed,
    DrainRequested,
    Noted,
    Placed,
    PreloadStarted,
    PreloadSucceeded,
    ReadyInfo,
    ReloadRequested,
    ReloadStarted,
    Retried,
    StartFailed,
    TrialStarted,
)
from poolmgr.lifecycle.fsm import fire
from poolmgr.lifecycle.placing import CPU_PLACEMENT
from poolmgr.observability._audit import AuditTally, Tally
from poolmgr.observability.metrics import MetricsEndpoint, PoolMetricsCollector
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import PoolState
from poolmgr.store import EventData, PoolView, Registry
from poolmgr.store._models import PoolEvent

from ._stack import Scrape

READY = PreloadSucceeded(ReadyInfo("http://127.0.0.1:9", None, 2))


def _endpoint(registry: Registry, **kw: float) -> MetricsEndpoint:
    return MetricsEndpoint(PoolMetricsCollector(registry, node_id="node-a", inventory=Inventory, **kw))


@pytest.fixture
def metrics(registry: Registry) -> Iterator[MetricsEndpoint]:
    endpoint = _endpoint(registry)
    yield endpoint
    endpoint.close()


def _scrape(endpoint: MetricsEndpoint) -> Scrape:
    body, content_type = endpoint()
    assert content_type.startswith("text/plain; version=0.0.4")
    return Scrape(body.decode())


def _starting(registry: Registry, pool_id: str, slots: int = 1) -> None:
    registry.register(PoolSpec(id=pool_id, model="/m.gguf", slots=slots))
    fire(registry, pool_id, Placed())
    fire(registry, pool_id, PreloadStarted(CPU_PLACEMENT))


def _ready(registry: Registry, pool_id: str) -> PoolView:
    _starting(registry, pool_id, slots=2)
    return fire(registry, pool_id, READY)


def _crashed(reason: str, code: int | None = None) -> Crashed:
    return Crashed(PreloadFailed(reason, f"engine died: {reason}"), ExitInfo(code=code))


def _failed(reason: str) -> StartFailed:
    return StartFailed(PreloadFailed(reason, f"preload failed: {reason}"))


def _backed_off(clock: FakeClock, backoff_ms: int, reason: str = "backoff step 1") -> BackedOff:
    return BackedOff(backoff_ms, clock.now() + timedelta(milliseconds=backoff_ms), reason)


def _crash(registry: Registry, clock: FakeClock, pool_id: str, reason: str, backoff_ms: int) -> None:
    """What the worker writes for a crash of a serving engine, its backoff and the restart after it."""
    fire(registry, pool_id, _crashed(reason, code=1))
    fire(registry, pool_id, _backed_off(clock, backoff_ms))
    clock.advance(backoff_ms / 1000)
    fire(registry, pool_id, Retried())
    fire(registry, pool_id, READY)


def test_driver_errors_count_as_crashes_and_driver_resets(
    registry: Registry, clock: FakeClock, metrics: MetricsEndpoint
) -> None:
    _ready(registry, "gpu")
    _crash(registry, clock, "gpu", "driver_error", 40)
    clock.advance(5)
    _crash(registry, clock, "gpu", "vram_oom", 90)
    # a failed preload whose engine died of a driver error is a crash too; a missing model is not
    fire(registry, "gpu", _crashed("exit"))
    fire(registry, "gpu", _backed_off(clock, 150))
    fire(registry, "gpu", Retried())
    fire(registry, "gpu", _failed("driver_error"))
    fire(registry, "gpu", _backed_off(clock, 300))
    fire(registry, "gpu", Retried())
    fire(registry, "gpu", _failed("model_missing"))
    s = _scrape(metrics)
    assert s.value("driver_reset_total", pool_id="gpu") == 2
    crashes = {x.labels["reason"]: x.value for x in s.series("engine_crash_total", pool_id="gpu")}
    assert crashes == {"driver_error": 2, "vram_oom": 1, "exit": 1}
    failures = {x.labels["reason"]: x.value for x in s.series("pool_preload_failure_total", pool_id="gpu")}
    assert failures == {"driver_error": 1, "model_missing": 1}
    restarts = {x.labels["reason"]: x.value for x in s.series("pool_restart_total", pool_id="gpu")}
    assert restarts == {"driver_error": 2, "vram_oom": 1, "exit": 1}  # each labelled by the failure before it
    assert s.value("backoff_delay_ms_count", pool_id="gpu") == 4
    assert s.value("backoff_delay_ms_sum", pool_id="gpu") == 40 + 90 + 150 + 300
    assert [s.value("backoff_delay_ms_bucket", pool_id="gpu", le=le) for le in ("50.0", "100.0", "250.0", "500.0")] == [
        1, 2, 3, 4
    ]  # fmt: skip
    # restarts 0.04 s, then 5.09 s later, then twice more at once: 1, 2, 3, 4 in the 60 s window
    assert s.value("restart_rate_sum", pool_id="gpu") == 1 + 2 + 3 + 4


def test_the_breaker_gauge_is_open_then_half_open_during_the_trial_then_closed(
    registry: Registry, clock: FakeClock, metrics: MetricsEndpoint
) -> None:
    _ready(registry, "p")
    fire(registry, "p", _crashed("signal"))
    fire(registry, "p", BreakerOpened(clock.now() + timedelta(seconds=30), 30.0, "5 consecutive failed starts"))
    assert _scrape(metrics).value("circuit_breaker_state", pool_id="p") == 1
    fire(registry, "p", TrialStarted())  # breaker_trial, restart_count 1
    half_open = _scrape(metrics)
    assert half_open.value("circuit_breaker_state", pool_id="p") == 2
    assert half_open.value("pool_restart_total", pool_id="p", reason="signal") == 1
    fire(registry, "p", READY)  # closes the breaker: breaker_trial False
    closed = _scrape(metrics)
    assert closed.value("circuit_breaker_state", pool_id="p") == 0
    assert closed.value("circuit_breaker_open_total", pool_id="p") == 1
    assert closed.value("pool_preload_success_total", pool_id="p", engine="llamacpp") == 2


def test_an_operator_reset_is_a_restart_labelled_operator_reset(
    registry: Registry, clock: FakeClock, metrics: MetricsEndpoint
) -> None:
    _starting(registry, "p")
    fire(registry, "p", _failed("timeout"))
    fire(registry, "p", BreakerOpened(clock.now() + timedelta(seconds=30), 30.0, "breaker opened"))
    fire(registry, "p", BreakerReset())
    s = _scrape(metrics)
    assert s.value("pool_restart_total", pool_id="p", reason="operator_reset") == 1
    assert s.series("engine_crash_total", pool_id="p") == []  # a timeout is a failed preload, not a crash
    assert s.value("pool_preload_failure_total", pool_id="p", engine="llamacpp", reason="timeout") == 1


def test_a_drain_aborted_by_a_crash_and_a_reload_are_counted_with_their_durations(
    registry: Registry, clock: FakeClock, metrics: MetricsEndpoint
) -> None:
    old = _ready(registry, "p").spec
    reload = Reload("/m2.gguf", old, clock.now(), 30_000, "cid-reload")
    fire(registry, "p", ReloadRequested(reload))
    clock.advance(0.4)
    fire(registry, "p", ReloadStarted(reload, {"duration_ms": 400, "outcome": "drained"}))
    fire(registry, "p", PreloadStarted(CPU_PLACEMENT))
    clock.advance(1.1)
    fire(registry, "p", READY)  # the Reload in flight: detail.reload_outcome = "success"
    fire(registry, "p", DrainRequested(Drain(clock.now(), 30_000, "cid-drain")))
    fire(registry, "p", _crashed("signal"))
    s = _scrape(metrics)
    assert s.value("pool_reload_total", pool_id="p", outcome="success") == 1
    assert s.value("pool_reload_duration_ms_sum", pool_id="p") == pytest.approx(1500)
    assert s.value("pool_reload_duration_ms_bucket", pool_id="p", le="1000.0") == 0
    assert s.value("pool_reload_duration_ms_bucket", pool_id="p", le="2500.0") == 1
    assert s.value("pool_drain_total", pool_id="p", outcome="drained") == 1
    assert s.value("pool_drain_total", pool_id="p", outcome="aborted") == 1
    assert s.value("pool_drain_duration_ms_sum", pool_id="p") == 400


def _history(registry: Registry, clock: FakeClock) -> None:
    for pool_id in ("a", "b"):
        _ready(registry, pool_id)
    for n in range(6):
        clock.advance(7)
        _crash(registry, clock, "a" if n % 2 else "b", ("signal", "exit", "host_oom")[n % 3], 100 * (n + 1))
        if n == 4:
            fire(registry, "a", Noted(EventData(kind="restart_storm")))


def _totals(tally: Tally) -> tuple[object, ...]:
    hist = {name: {p: (h.counts, h.total) for p, h in per.items()} for name, per in tally.histograms.items()}
    return tally.counters, hist


def test_incremental_reads_batched_reads_and_one_full_read_give_the_same_totals(
    registry: Registry, clock: FakeClock
) -> None:
    step = AuditTally(registry, node_id="node-a", lag_s=0, batch=3)
    snapshots = []
    for pool_id in ("a", "b"):
        _ready(registry, pool_id)
        snapshots.append(step.snapshot())
    for n in range(6):
        clock.advance(7)
        _crash(registry, clock, "a" if n % 2 else "b", ("signal", "exit", "host_oom")[n % 3], 100 * (n + 1))
        snapshots.append(step.snapshot())
    full = AuditTally(registry, node_id="node-a", lag_s=0).snapshot()
    unfolded = AuditTally(registry, node_id="node-a", lag_s=3600).snapshot()
    assert _totals(snapshots[-1]) == _totals(full) == _totals(unfolded)
    in_order = registry.engine.dialect.name == "sqlite"  # no lag there: nothing is left unfolded
    assert full.cursor == registry.events()[-1].id and unfolded.cursor == (full.cursor if in_order else 0)
    assert sum(full.counter("engine_crash_total").values()) == 6
    assert sum(snapshots[2].counter("engine_crash_total").values()) == 1  # each snapshot: the rows so far
    assert AuditTally(registry, node_id="another-node", lag_s=0).snapshot().counters == {}


def test_a_row_committed_after_a_higher_id_is_still_counted(registry: Registry, clock: FakeClock) -> None:
    """On PostgreSQL ids are taken at insert and rows become visible at commit: id 2 can appear after id 3.
    The ids of rows younger than the lag are held, and each scrape reads the ids after the cursor, so a late one
    is read (alone) and counted when it shows up. SQLite commits ids in order (one writer): there every row is
    folded at once and the cursor moves past it, whatever the lag."""
    tally = AuditTally(registry, node_id="node-a", lag_s=60)
    _ready(registry, "p")
    first = registry.events()[-1].id
    if registry.engine.dialect.name == "sqlite":
        assert tally.snapshot().cursor == first  # folded though younger than the lag: no re-reading
        return
    with registry.engine.begin() as conn:
        conn.execute(PoolEvent.__table__.insert(), [_row(first + 2, "p", clock, "open_breaker")])
    assert tally.snapshot().counter("circuit_breaker_open_total") == {("p",): 1}
    with registry.engine.begin() as conn:  # the slower transaction commits now
        conn.execute(PoolEvent.__table__.insert(), [_row(first + 1, "p", clock, "open_breaker")])
    assert tally.snapshot().counter("circuit_breaker_open_total") == {("p",): 2}
    clock.advance(120)  # both are folded once older than the lag; the totals stay
    assert tally.snapshot().counter("circuit_breaker_open_total") == {("p",): 2}
    assert tally.snapshot().cursor == first + 2


def test_rows_are_read_by_id_on_both_databases(registry: Registry, clock: FakeClock) -> None:
    """What a scrape reads for ids it has not folded (PostgreSQL's late rows): the rows of those ids, of this
    node, oldest first."""
    for pool_id in ("a", "b"):
        _ready(registry, pool_id)
    ids = registry.audit.ids_after("node-a", 0)
    assert ids == [e.id for e in registry.events()] and len(ids) >= 2
    rows = registry.audit.rows_in("node-a", [ids[-1], ids[0]])
    assert [r.id for r in rows] == [ids[0], ids[-1]] and rows[0].kind == registry.events()[0].kind
    assert registry.audit.rows_in("another-node", ids) == [] and registry.audit.rows_in("node-a", []) == []


def test_with_no_lag_a_row_stamped_after_the_scrape_began_is_folded_and_passed(
    registry: Registry, clock: FakeClock
) -> None:
    """A row whose `at` is after the scrape's horizon (written meanwhile, or the clock stepped back) is folded and
    the cursor moves past it when ids commit in order: nothing is held, every later scrape reads after it."""
    tally = AuditTally(registry, node_id="node-a", lag_s=0)
    _ready(registry, "p")
    clock.advance(60)
    _crash(registry, clock, "p", "exit", 100)
    clock.advance(-30)  # the clock stepped back: the crash row is "in the future"
    assert tally.snapshot().cursor == registry.events()[-1].id
    _crash(registry, clock, "p", "signal", 100)
    snap = tally.snapshot()
    assert sum(snap.counter("engine_crash_total").values()) == 2 and snap.cursor == registry.events()[-1].id


def _row(row_id: int, pool_id: str, clock: FakeClock, kind: str) -> dict[str, object]:
    states = {"from_state": PoolState.CRASHED.value, "to_state": PoolState.BREAKER_OPEN.value}
    return {"id": row_id, "pool_id": pool_id, "at": clock.now(), "kind": kind, "trigger": kind, "restart_count": 0,
            "node_id": "node-a", **states}  # fmt: skip


def test_counters_survive_a_restart_and_a_lost_database_keeps_the_last_totals(
    db_url: str, clock: FakeClock, tmp_path: Path
) -> None:
    registry = Registry(db_url, node_id="node-a", clock=clock)
    _history(registry, clock)
    first = _endpoint(registry)
    before = _scrape(first)
    assert before.value("poolmgr_metrics_db_up") == 1
    assert before.value("restart_storm_total", pool_id="a") == 1
    first.close()
    registry.close()

    restarted = Registry(db_url, node_id="node-a", clock=clock)  # a new poolmgr: nothing in memory
    second = _endpoint(restarted, lag_s=0)
    after = _scrape(second)
    assert after.counters_and_histograms() == before.counters_and_histograms()
    if db_url.startswith("sqlite"):
        restarted.engine.dispose()
        Path(db_url.removeprefix("sqlite:///")).rename(tmp_path / "gone.db")
        away = _scrape(second)
        assert away.value("poolmgr_metrics_db_up") == 0
        assert away.counters_and_histograms() == before.counters_and_histograms()
        assert away.series("pool_slots_total") == []  # no rows to read: no gauges rather than stale ones
    second.close()
    restarted.close()
