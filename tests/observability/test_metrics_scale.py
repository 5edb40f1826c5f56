"""/metrics at scale (issue 14): totals kept over a restart and a retention prune, a scrape that reads only new
audit rows, engine metrics fetched in the background, and a compact exposition that is exactly what
prometheus_client writes for the same families. On SQLite and PostgreSQL where a database is involved."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from sqlalchemy import func, select

from poolmgr.clock import FakeClock, utcnow
from poolmgr.devices import FakeNvmlBackend, Inventory, discover
from poolmgr.inflight import Reload
from poolmgr.lifecycle.effects import (
    BreakerOpened,
    PreloadStarted,
    ReloadRequested,
    ReloadStarted,
    Retried,
    TrialStarted,
)
from poolmgr.lifecycle.fsm import fire
from poolmgr.lifecycle.placing import CPU_PLACEMENT
from poolmgr.observability._engines import EngineMetrics, EngineScraper, EngineTarget, relabel
from poolmgr.observability.metrics import MetricsEndpoint, PoolMetricsCollector
from poolmgr.store import Registry
from poolmgr.store._models import AuditRollup, PoolEvent

from ._stack import H100_SNAPSHOT, Scrape
from .conftest import StackFactory
from .test_audit_metrics import READY, _backed_off, _crashed, _failed, _ready, _scrape

RECORDED = Path(__file__).parent / "fixtures" / "llama-server-b11434-metrics.txt"


def _endpoint(registry: Registry, **kw: Any) -> MetricsEndpoint:
    return MetricsEndpoint(PoolMetricsCollector(registry, node_id="node-a", inventory=Inventory, lag_s=0, **kw))


def _totals(registry: Registry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What a poolmgr started now on this database reports."""
    endpoint = _endpoint(registry)
    try:
        return _scrape(endpoint).counters_and_histograms()
    finally:
        endpoint.close()


def _history_across(registry: Registry, clock: FakeClock) -> Any:
    """Rows whose fold needs the rows before them, with a prune boundary in between: a crash before it and the
    restart it labels after it; a reload requested before it and finished after it; restarts in one storm
    window on both sides. Returns the boundary."""
    for pool_id in ("crashy", "reloading", "stormy"):
        _ready(registry, pool_id)
    fire(registry, "crashy", _crashed("vram_oom"))
    fire(registry, "crashy", _backed_off(clock, 250))
    old = _ready(registry, "gone").spec
    registry.deregister("gone")
    fire(registry, "reloading", ReloadRequested(Reload("/m2.gguf", old, clock.now(), 30_000, "cid-r")))
    for _ in range(2):
        fire(registry, "stormy", _crashed("signal"))
        fire(registry, "stormy", _backed_off(clock, 100))
        fire(registry, "stormy", Retried())
        fire(registry, "stormy", READY)
        clock.advance(10)
    boundary = clock.now()
    clock.advance(10)
    fire(registry, "crashy", Retried())  # restart reason: the vram_oom before the boundary
    fire(registry, "crashy", _failed("model_missing"))
    fire(registry, "reloading", ReloadStarted(Reload("/m2.gguf", old, clock.now(), 30_000, "cid-r"), {}))
    fire(registry, "reloading", PreloadStarted(CPU_PLACEMENT))
    clock.advance(2)
    fire(registry, "reloading", READY)  # the reload's duration: since the request before the boundary
    fire(registry, "stormy", _crashed("signal"))
    fire(registry, "stormy", BreakerOpened(clock.now() + timedelta(seconds=30), 30.0, "storm"))
    fire(registry, "stormy", TrialStarted())  # three restarts in the window: rate 3/min, two before the boundary
    clock.advance(3600)
    return boundary


def test_totals_are_the_same_after_a_restart_and_after_a_retention_prune(db_url: str, clock: FakeClock) -> None:
    registry = Registry(db_url, node_id="node-a", clock=clock)
    try:
        boundary = _history_across(registry, clock)
        running = _endpoint(registry)
        before = _scrape(running).counters_and_histograms()
        assert before[("pool_restart_total", (("pool_id", "crashy"), ("reason", "vram_oom")))] == 1
        assert before[("pool_reload_duration_ms_count", (("pool_id", "reloading"),))] == 1
        assert before[("restart_rate_sum", (("pool_id", "stormy"),))] == 1 + 2 + 3
        assert _totals(registry) == before  # a restart

        rows = len(registry.events())
        pruned = registry.prune_audit(boundary, batch=4)
        assert 0 < pruned < rows and all(e.at >= boundary for e in registry.events())
        assert _totals(registry) == before  # a restart after the prune: rollup + the remaining rows
        assert _scrape(running).counters_and_histograms() == before  # the running poolmgr never noticed

        fire(registry, "crashy", _backed_off(clock, 500))  # and both go on counting alike
        assert _scrape(running).counters_and_histograms() == _totals(registry) != before
        remaining = len(registry.events())
        assert registry.prune_audit(clock.now() + timedelta(days=1)) == remaining and registry.events() == []
        assert _totals(registry) == _scrape(running).counters_and_histograms()  # all of it in the rollup now
        running.close()
    finally:
        registry.close()


def test_a_scrape_reads_the_history_once_then_only_rows_after_its_cursor(
    registry: Registry, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    _ready(registry, "p")
    clock.advance(120)
    calls: list[tuple[str, Any]] = []
    history, after = registry.audit.history, registry.audit.rows_after
    monkeypatch.setattr(registry.audit, "history", lambda *a: calls.append(("history", None)) or history(*a))
    monkeypatch.setattr(registry.audit, "rows_after", lambda n, a, lim: calls.append(("after", a)) or after(n, a, lim))
    ids = registry.audit.ids_after
    monkeypatch.setattr(registry.audit, "ids_after", lambda n, a: calls.append(("ids", a)) or ids(n, a))
    endpoint = MetricsEndpoint(PoolMetricsCollector(registry, node_id="node-a", inventory=Inventory))
    last = registry.events()[-1].id
    endpoint()
    fire(registry, "p", _crashed("signal"))  # young: on PostgreSQL its id is held until older than the lag
    endpoint()
    clock.advance(120)
    endpoint()
    endpoint()
    if registry.engine.dialect.name == "sqlite":  # ids commit in order: folded at once
        assert calls == [("history", None), ("after", last), ("after", last + 1), ("after", last + 1)]
    else:
        # the young row is folded once; the next scrape reads the ids after the cursor (a late row would show
        # there), then the cursor moves past it
        assert calls == [("history", None), ("after", last), ("ids", last), ("after", last + 1)]
    endpoint.close()


def test_histograms_appear_only_for_pools_with_an_observation(registry: Registry, clock: FakeClock) -> None:
    for pool_id in ("quiet-1", "quiet-2", "busy"):
        _ready(registry, pool_id)
    fire(registry, "busy", _crashed("exit"))
    fire(registry, "busy", _backed_off(clock, 300))
    endpoint = _endpoint(registry)
    s = _scrape(endpoint)
    endpoint.close()
    assert {x.labels["pool_id"] for x in s.series("backoff_delay_ms_count")} == {"busy"}
    for name in ("pool_drain_duration_ms", "pool_reload_duration_ms", "restart_rate"):
        assert s.type_of(name) == "histogram" and s.series(name + "_count") == []  # typed, no zero series
    # counters of one pool label still start at 0 for every pool (increase() sees the first event)
    assert [s.value("restart_storm_total", pool_id=p) for p in ("quiet-1", "quiet-2", "busy")] == [0, 0, 0]
    assert len(s.samples) < 3 * 30  # was 3 * 85: 64 histogram samples per pool


@pytest.fixture
def engines(monkeypatch: pytest.MonkeyPatch) -> Iterator[EngineMetrics]:
    """EngineMetrics whose engines answer with the recorded llama-server scrape (no process)."""
    text = RECORDED.read_text()
    monkeypatch.setattr(EngineScraper, "fetch", lambda self, t: relabel(text, t.pool_id))
    targets = [
        EngineTarget(p, f"http://127.0.0.1:9200/pools/{p}/engine", f"/var/lib/poolmgr/work/{p}/engine.sock")
        for p in ("busy", "quiet-1")
    ]
    metrics = EngineMetrics(lambda: targets, interval_s=3600)
    metrics.fetch_now()
    yield metrics
    metrics.close()


def test_the_exposition_is_what_prometheus_client_writes_for_the_same_families(
    registry: Registry, clock: FakeClock, engines: EngineMetrics
) -> None:
    for pool_id in ("quiet-1", "busy"):
        _ready(registry, pool_id)
    fire(registry, "busy", _crashed("exit"))
    fire(registry, "busy", _backed_off(clock, 1_234_567))
    fire(registry, "busy", Retried())
    fire(registry, "busy", _failed('odd "reason" \\ with\na newline'))
    inventory = discover(FakeNvmlBackend(H100_SNAPSHOT), warn=False)
    collector = PoolMetricsCollector(registry, node_id="node-a", inventory=lambda: inventory, engines=engines)
    endpoint = MetricsEndpoint(collector)
    body, _ = endpoint()
    assert generate_latest(endpoint.registry) == body  # byte for byte
    s = Scrape(body.decode())
    assert s.value("pool_preload_failure_total", pool_id="busy", reason='odd "reason" \\ with\na newline') == 1
    assert s.value("backoff_delay_ms_sum", pool_id="busy") == 1_234_567
    # busy is crashed: its engine's numbers are left out at once; quiet-1 serves
    assert {x.labels["pool_id"] for x in s.series("llamacpp:prompt_tokens_total")} == {"quiet-1"}
    assert s.label_values("pool_engine_metrics_up", "pool_id") == {"quiet-1"}


def test_engine_metrics_are_served_from_the_last_fetch_and_only_for_serving_pools(engines: EngineMetrics) -> None:
    assert engines.up() == {"busy": True, "quiet-1": True}
    assert engines.text().count("# TYPE llamacpp:prompt_tokens_total counter") == 1  # one family for both
    engines.serving({"busy": "http://127.0.0.1:9"})  # quiet-1 stopped serving: gone from the next scrape at once
    assert engines.up() == {"busy": True}
    assert 'pool_id="quiet-1"' not in engines.text() and 'pool_id="busy"' in engines.text()


def test_an_idle_engine_is_not_fetched_again_until_it_answers_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the data plane's request counts, the fetcher skips an engine that answered nothing since its last
    good fetch: idle pools cost no fetch. A request answered, one in flight or a restarted engine (new pid, read
    when the fetcher is told the targets changed) is fetched again on the next round."""
    text = RECORDED.read_text()
    fetched: list[str] = []
    monkeypatch.setattr(EngineScraper, "fetch", lambda self, t: fetched.append(t.pool_id) or relabel(text, t.pool_id))
    activity = {"idle": (0, 0), "busy": (0, 0)}
    pids = {"idle": 10, "busy": 20}

    def targets() -> list[EngineTarget]:
        return [EngineTarget(p, f"http://n/pools/{p}/engine", f"/s/{p}.sock", pid=pid) for p, pid in pids.items()]

    metrics = EngineMetrics(targets, interval_s=0.05, activity=activity.__getitem__)
    metrics.start()
    try:
        _until(lambda: {"idle", "busy"} <= set(fetched), "the first fetch of each")
        time.sleep(0.5)  # ten intervals, nothing answered
        assert sorted(fetched) == ["busy", "idle"]
        activity["busy"] = (3, 0)  # answered three requests
        _until(lambda: fetched.count("busy") == 2, "busy fetched again")
        activity["busy"] = (3, 1)  # a request in flight: fetched each round while it runs
        _until(lambda: fetched.count("busy") >= 4, "busy fetched while a request runs")
        pids["idle"] = 11  # restarted: its counters start over; the traffic board said its gate closed and opened
        metrics.refresh()
        _until(lambda: fetched.count("idle") == 2, "the restarted engine fetched")
        assert metrics.up() == {"idle": True, "busy": True}
    finally:
        metrics.close()


class _CountingEvent(threading.Event):
    """The fetcher's wake-up event, counting the thread's waits (one per wake-up)."""

    waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return super().wait(timeout)


def _parked_idle_pools(
    monkeypatch: pytest.MonkeyPatch, n: int, interval_s: float
) -> tuple[EngineMetrics, list[str], dict[str, tuple[int, int]], list[int]]:
    """A started EngineMetrics over n pools that answered nothing since their first fetch, all of them parked.
    Returns it, the pools fetched in order, their activity and [activity calls]."""
    fetched: list[str] = []
    monkeypatch.setattr(EngineScraper, "fetch", lambda self, t: fetched.append(t.pool_id) or [])
    activity = {f"p{i}": (0, 0) for i in range(n)}
    calls = [0]

    def read(pool_id: str) -> tuple[int, int]:
        calls[0] += 1
        return activity[pool_id]

    targets = [EngineTarget(p, f"http://n/pools/{p}/engine", f"/s/{p}.sock", pid=1) for p in activity]
    metrics = EngineMetrics(lambda: targets, interval_s=interval_s, activity=read)
    metrics._wake = _CountingEvent()
    metrics.start()
    _until(lambda: len(metrics._parked) == n, "every idle pool parked")
    assert sorted(fetched) == sorted(activity)  # once each
    return metrics, fetched, activity, calls


def test_idle_pools_are_looked_at_in_one_pass_not_one_wake_up_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle node's fetcher wakes a few times an interval however many pools it has (it woke once per pool
    and interval: 100 pools over 5 intervals were 500 wake-ups)."""
    n, interval_s, intervals = 100, 0.3, 5
    metrics, fetched, _, calls = _parked_idle_pools(monkeypatch, n, interval_s)
    wake = metrics._wake
    assert isinstance(wake, _CountingEvent)
    try:
        waits, calls[0] = wake.waits, 0
        time.sleep(interval_s * intervals)
        wakes = wake.waits - waits
        passes_bound = intervals * 3 * 2  # three passes an interval, twice over for a slow or busy machine
        assert wakes <= passes_bound, wakes
        assert n <= calls[0] <= (passes_bound + 2) * n  # whole passes over the parked pools
        assert len(fetched) == n  # nothing fetched again
    finally:
        metrics.close()


def test_a_parked_pool_that_answers_a_request_is_fetched_within_a_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A parked pool is looked at every interval/3: one that answered a request is fetched within that (plus
    the spread over the pools found in the same pass, none here), then parked again; the others stay parked."""
    interval_s = 0.9
    metrics, fetched, activity, _ = _parked_idle_pools(monkeypatch, 20, interval_s)
    try:
        activity["p7"] = (1, 0)
        moved = time.monotonic()
        _until(lambda: fetched.count("p7") == 2, "p7 fetched again")
        assert time.monotonic() - moved < interval_s / 3 + 0.6  # bound + slack for a loaded machine
        _until(lambda: len(metrics._parked) == 20, "p7 parked again")
        assert len(fetched) == 21 and fetched.count("p7") == 2
    finally:
        metrics.close()


def test_a_pool_that_comes_due_while_its_fetch_runs_is_fetched_again_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An engine slower than the interval: never two fetches of it at once, the next one as soon as it ends."""
    running: list[str] = []
    overlapped: list[str] = []
    fetched: list[str] = []

    def slow(self: EngineScraper, t: EngineTarget) -> list[Any]:
        if t.pool_id in running:
            overlapped.append(t.pool_id)
        running.append(t.pool_id)
        time.sleep(0.1)
        running.remove(t.pool_id)
        fetched.append(t.pool_id)
        return []

    monkeypatch.setattr(EngineScraper, "fetch", slow)
    target = EngineTarget("slow", "http://n/pools/slow/engine", "/s/slow.sock")
    metrics = EngineMetrics(lambda: [target], interval_s=0.02, activity=lambda p: (0, 1))  # a request in flight
    metrics.start()
    try:
        _until(lambda: len(fetched) >= 4, "fetched one after the other")
        assert overlapped == []
    finally:
        metrics.close()


def _until(pred: Callable[[], bool], what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.01)


def test_serve_prunes_the_audit_beyond_the_retention_and_keeps_the_totals(
    stack_factory: StackFactory, sqlite_url: str
) -> None:
    writer = Registry(sqlite_url, node_id="obs-node", clock=FakeClock(utcnow() - timedelta(days=100)))
    _ready(writer, "retired")  # a poolmgr of 100 days ago
    fire(writer, "retired", _crashed("host_oom"))
    writer.deregister("retired")
    writer.close()
    st = stack_factory(sqlite_url, [], POOL_MANAGERD_AUDIT_RETENTION_DAYS="30")
    assert st.registry is not None
    deadline = time.monotonic() + 10
    while st.registry.events() and time.monotonic() < deadline:  # the first housekeeping round prunes
        time.sleep(0.05)
    assert st.registry.events() == []
    with st.registry.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(AuditRollup)).scalar_one() > 0
        assert conn.execute(select(func.count()).select_from(PoolEvent)).scalar_one() == 0
    scrape = st.scrape()
    assert scrape.value("engine_crash_total", pool_id="retired", reason="host_oom") == 1
    assert scrape.value("pool_preload_success_total", pool_id="retired", engine="unknown") == 1


def test_a_part_of_the_exposition_is_written_again_only_when_its_inputs_change(
    registry: Registry, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1,000-pool scrape writes nothing again while nothing changed: each part (the pools' gauges, the audit
    totals, the request counts) is kept with what it was written from; a change of any input shows at once."""
    import poolmgr.observability.metrics as M
    from poolmgr.lifecycle.traffic import TrafficBoard

    writes: dict[str, int] = {}
    for name in ("_pool_gauges", "_audit_families", "_request_metrics"):
        real = getattr(M, name)
        monkeypatch.setattr(
            M, name, lambda *a, _r=real, _n=name: writes.__setitem__(_n, writes.get(_n, 0) + 1) or _r(*a)
        )
    for pool_id in ("a", "b"):
        _ready(registry, pool_id)
    board = TrafficBoard(queue_timeout_s=1, socket_for=lambda _pool: "")
    board.get("a")
    endpoint = MetricsEndpoint(PoolMetricsCollector(registry, node_id="node-a", inventory=Inventory, lag_s=0,
                                                    traffic=board))  # fmt: skip
    first = endpoint()[0]
    assert endpoint()[0] == first and writes == {"_pool_gauges": 1, "_audit_families": 1, "_request_metrics": 1}
    board.get("a").record(200, 0.01, 0.005)  # a request answered: only the request part is written again
    after_request = Scrape(endpoint()[0].decode())
    assert after_request.value("pool_requests_total", pool_id="a", code="200") == 1
    assert writes == {"_pool_gauges": 1, "_audit_families": 1, "_request_metrics": 2}
    fire(registry, "b", _crashed("exit"))  # a row and an audit row: the pools' part and the totals
    after_crash = Scrape(endpoint()[0].decode())
    assert after_crash.value("engine_crash_total", pool_id="b", reason="exit") == 1
    assert after_crash.value("pool_state", pool_id="b", state="crashed") == 1
    assert writes == {"_pool_gauges": 2, "_audit_families": 2, "_request_metrics": 2}
    body, _ = endpoint()
    assert generate_latest(endpoint.registry) == body  # byte for byte what prometheus_client writes
    assert writes == {"_pool_gauges": 2, "_audit_families": 2, "_request_metrics": 2}
    endpoint.close()


def test_targets_that_could_not_be_read_are_read_again_after_an_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pools are read when told and every 300 s; a read that failed (the database away) is tried again
    after an interval, so an engine that began serving meanwhile is not left out for five minutes."""
    fetched: list[str] = []
    monkeypatch.setattr(EngineScraper, "fetch", lambda self, t: fetched.append(t.pool_id) or [])
    reads = {"n": 0}

    def targets() -> list[EngineTarget]:
        reads["n"] += 1
        if reads["n"] == 1:
            raise RuntimeError("the database is away")
        return [EngineTarget("p", "http://n/pools/p/engine", "/s/p.sock", pid=1)]

    metrics = EngineMetrics(targets, interval_s=0.2)
    metrics.start()
    try:
        _until(lambda: fetched == ["p"], "the engine fetched after the failed read")
        assert reads["n"] == 2
    finally:
        metrics.close()
