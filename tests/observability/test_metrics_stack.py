"""GET /metrics of a running poolmgr whose pools went through preload, crash, backoff, restart, restart storm,
breaker, reload (success and rollback) and a forced drain: every seed metric, with the right labels and
values, in a scrape parsed by prometheus_client.parser; the same totals after a poolmgr restart."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from poolmgr.devices import Inventory
from poolmgr.observability._audit import BUCKETS
from poolmgr.observability.metrics import MetricsEndpoint, PoolMetricsCollector
from poolmgr.poolsfile import PoolSpec
from poolmgr.store import EventView, Registry

from ._stack import H100_SNAPSHOT, EngineFiles, Scrape, Stack, captured_logs
from .conftest import StackFactory

SEED_COUNTERS = {
    "pool_preload_success_total": {"pool_id", "engine"},
    "pool_preload_failure_total": {"pool_id", "engine", "reason"},
    "pool_restart_total": {"pool_id", "reason"},
    "pool_drain_total": {"pool_id", "outcome"},
    "pool_reload_total": {"pool_id", "outcome"},
    "engine_crash_total": {"pool_id", "reason"},
    "circuit_breaker_open_total": {"pool_id"},
    "restart_storm_total": {"pool_id"},
    "driver_reset_total": {"pool_id"},
}
SEED_GAUGES = {
    "pool_slots_total": {"pool_id"},
    "pool_slots_free": {"pool_id"},
    "pool_active_leases": {"pool_id"},
    "device_vram_total_bytes": {"device_id"},
    "device_vram_free_bytes": {"device_id"},
    "circuit_breaker_state": {"pool_id"},
}
SEED_HISTOGRAMS = ("pool_drain_duration_ms", "pool_reload_duration_ms", "backoff_delay_ms", "restart_rate")
MAIN, STORM, BAD = "obs-main", "obs-storm", "obs-bad"


def _kill_when_ready(st: Stack, pool_id: str, restarts: int) -> None:
    status = st.wait_for(pool_id, lambda s: s["ready"] and s["restart_count"] == restarts, f"ready #{restarts}")
    os.kill(status["pid"], signal.SIGKILL)


def _drive(st: Stack, files: EngineFiles) -> dict[str, Any]:
    """Every lifecycle path, one after another; returns what the test needs to know about the engine."""
    st.wait_state(BAD, "breaker-open")  # model missing twice, threshold 2
    _kill_when_ready(st, MAIN, 0)  # crash → backoff → restart
    for n in range(3):  # two restarts in the window, then a storm opens the breaker
        _kill_when_ready(st, STORM, n)
    st.wait_state(STORM, "breaker-open")
    st.wait_for(MAIN, lambda s: s["ready"] and s["restart_count"] == 1, "ready after the restart")

    for model, outcome in ((files.model("other.gguf"), "success"), (files.missing(), "rolled_back")):
        resp = st.http.post(f"/pools/{MAIN}/reload", json={"model": str(model), "drain_deadline_ms": 5000})
        assert resp.status_code == 202, resp.text
        st.wait_event(MAIN, lambda e, o=outcome: (e.detail or {}).get("reload_outcome") == o and e.kind == "preload_ok",
                      f"reload {outcome}")  # fmt: skip
    st.wait_state(MAIN, "ready")
    assert st.http.post(f"/pools/{MAIN}/leases", json={"ttl_s": 60}).status_code == 201
    assert st.http.post(f"/pools/{MAIN}/drain", json={"deadline_ms": 150}).status_code == 202
    st.wait_state(MAIN, "stopped")
    assert st.http.post(f"/pools/{MAIN}/preload").status_code == 202
    status = st.wait_state(MAIN, "ready")
    assert st.http.post(f"/pools/{MAIN}/leases", json={"ttl_s": 60}).status_code == 201
    assert status["endpoint_url"].endswith(f"/pools/{MAIN}/engine")  # the node's data plane, not the engine
    done = st.http.post(f"/pools/{MAIN}/engine/completion", json={"prompt": "one two three", "n_predict": 4})
    assert done.status_code == 200  # through the data plane, which tells the engine-metrics fetcher
    with st.engine(MAIN) as engine:
        return {"engine_metrics": engine.get("/metrics").text}


def _rows(events: list[EventView], pool_id: str, kind: str) -> list[EventView]:
    return [e for e in events if e.pool_id == pool_id and e.kind == kind]


def _assert_seed_families(scrape: Scrape) -> None:
    for name, labels in SEED_COUNTERS.items():
        family = name.removesuffix("_total")
        assert scrape.type_of(family) == "counter", name
        assert scrape.series(name), f"{name} has no sample"
        assert all(set(s.labels) == labels for s in scrape.series(name)), name
    for name, labels in SEED_GAUGES.items():
        assert scrape.type_of(name) == "gauge", name
        assert scrape.series(name) and all(set(s.labels) == labels for s in scrape.series(name)), name
    for name in SEED_HISTOGRAMS:
        assert scrape.type_of(name) == "histogram", name
        buckets = scrape.series(name + "_bucket", pool_id=MAIN)
        assert [float(s.labels["le"]) for s in buckets] == [*BUCKETS[name], float("inf")], name
        counts = [s.value for s in buckets]
        assert counts == sorted(counts), f"{name}: buckets are not cumulative"
        assert counts[-1] == scrape.value(name + "_count", pool_id=MAIN)


def _assert_counters(scrape: Scrape, events: list[EventView]) -> None:
    main_crash = _rows(events, MAIN, "crashed")[0].reason or ""
    storm_reasons = {e.reason for e in _rows(events, STORM, "crashed")}
    assert main_crash in ("signal", "exit") and storm_reasons <= {"signal", "exit"}
    v = scrape.value
    # initial, after the restart, the reloaded model, the rolled-back model, the preload after the drain
    assert (
        v("pool_preload_success_total", pool_id=MAIN, engine="llamacpp") == 5 == len(_rows(events, MAIN, "preload_ok"))
    )
    assert v("pool_preload_success_total", pool_id=BAD, engine="llamacpp") == 0
    # A missing model fails with its own line: model_missing (health_failure when the engine is gone before
    # poolmgr sees it exit, a race of the lifecycle layer): the labels are what the audit rows say.
    for pool_id, failures in ((BAD, 2), (MAIN, 1)):
        reasons = Counter(e.reason for e in _rows(events, pool_id, "preload_failed"))
        assert sum(reasons.values()) == failures and set(reasons) <= {"model_missing", "health_failure"}
        for reason, n in reasons.items():
            assert v("pool_preload_failure_total", pool_id=pool_id, engine="llamacpp", reason=reason) == n
        assert scrape.total("pool_preload_failure_total", pool_id=pool_id) == failures
    bad_first = _rows(events, BAD, "preload_failed")[0].reason or ""
    assert v("pool_restart_total", pool_id=MAIN, reason=main_crash) == 1
    assert v("pool_restart_total", pool_id=BAD, reason=bad_first) == 1
    assert scrape.total("pool_restart_total", pool_id=STORM) == 2
    assert v("engine_crash_total", pool_id=MAIN, reason=main_crash) == 1
    assert scrape.total("engine_crash_total", pool_id=STORM) == 3
    assert scrape.series("engine_crash_total", pool_id=BAD) == []  # a missing model is no crash
    assert [v("circuit_breaker_open_total", pool_id=p) for p in (MAIN, STORM, BAD)] == [0, 1, 1]
    assert [v("restart_storm_total", pool_id=p) for p in (MAIN, STORM, BAD)] == [0, 1, 0]
    assert [v("driver_reset_total", pool_id=p) for p in (MAIN, STORM, BAD)] == [0, 0, 0]
    assert v("pool_drain_total", pool_id=MAIN, outcome="drained") == 2  # the drains of the two reloads
    assert v("pool_drain_total", pool_id=MAIN, outcome="forced") == 1
    assert v("pool_reload_total", pool_id=MAIN, outcome="success") == 1
    assert v("pool_reload_total", pool_id=MAIN, outcome="rolled_back") == 1


def _assert_histograms(scrape: Scrape, events: list[EventView]) -> None:
    for pool_id in (MAIN, STORM, BAD):
        delays = [e.backoff_ms or 0 for e in _rows(events, pool_id, "back_off")]
        assert scrape.value("backoff_delay_ms_count", pool_id=pool_id) == len(delays) > 0
        assert scrape.value("backoff_delay_ms_sum", pool_id=pool_id) == sum(delays)
        below = scrape.value("backoff_delay_ms_bucket", pool_id=pool_id, le="250.0")
        assert below == len([d for d in delays if d <= 250]) == len(delays)  # BACKOFF_MAX_MS=200
    drains = [e.detail or {} for e in _rows(events, MAIN, "drained")]
    assert scrape.value("pool_drain_duration_ms_count", pool_id=MAIN) == 3
    assert scrape.value("pool_drain_duration_ms_sum", pool_id=MAIN) == sum(d["duration_ms"] for d in drains)
    forced = next(d for d in drains if d["outcome"] == "forced")
    assert forced["duration_ms"] >= 150 and forced["final_leases"] == 1
    requested = [e.at for e in _rows(events, MAIN, "reload_requested")]
    finished = [e.at for e in _rows(events, MAIN, "preload_ok") if (e.detail or {}).get("reload_outcome")]
    expected_ms = sum((end - start).total_seconds() * 1000 for start, end in zip(requested, finished, strict=True))
    assert scrape.value("pool_reload_duration_ms_count", pool_id=MAIN) == 2
    assert scrape.value("pool_reload_duration_ms_sum", pool_id=MAIN) == pytest.approx(expected_ms)
    # restarts per minute in the 60 s storm window, at each restart: 1, then 2
    assert scrape.value("restart_rate_count", pool_id=STORM) == 2
    assert scrape.value("restart_rate_sum", pool_id=STORM) == 3.0
    assert scrape.value("restart_rate_bucket", pool_id=STORM, le="1.0") == 1


def _assert_gauges(scrape: Scrape, st: Stack) -> None:
    for pool_id in (MAIN, STORM, BAD):
        status = st.status(pool_id)
        assert scrape.value("pool_slots_total", pool_id=pool_id) == status["slots_total"]
        assert scrape.value("pool_slots_free", pool_id=pool_id) == status["slots_free"]
        assert scrape.value("pool_active_leases", pool_id=pool_id) == status["active_leases"]
    assert (scrape.value("pool_active_leases", pool_id=MAIN), scrape.value("pool_slots_free", pool_id=MAIN)) == (1, 1)
    assert [scrape.value("circuit_breaker_state", pool_id=p) for p in (MAIN, STORM, BAD)] == [0, 1, 1]
    for dev in json.loads(H100_SNAPSHOT.read_text())["devices"]:
        mem = dev["memory_info_v2"]
        assert scrape.value("device_vram_total_bytes", device_id=dev["uuid"]) == mem["total"]
        assert scrape.value("device_vram_free_bytes", device_id=dev["uuid"]) == mem["free"]


def _assert_engine_metrics(scrape: Scrape, engine_text: str) -> None:
    own = Scrape(engine_text)
    tokens = own.value("llamacpp:prompt_tokens_total")
    assert tokens is not None and tokens > 0
    assert scrape.value("llamacpp:prompt_tokens_total", pool_id=MAIN) == tokens  # re-labelled, same value
    assert scrape.value("pool_engine_metrics_up", pool_id=MAIN) == 1
    engine_samples = [s for s in scrape.samples if s.name.startswith("llamacpp:")]
    assert engine_samples and {s.labels.get("pool_id") for s in engine_samples} == {MAIN}  # only serving pools


def test_a_pool_driven_through_its_lifecycle_shows_every_seed_metric_and_keeps_them_over_a_restart(
    stack_factory: StackFactory, engine_files: EngineFiles, db_url: str
) -> None:
    good = str(engine_files.model("good.gguf"))
    specs = [
        PoolSpec(id=MAIN, model=good, slots=2),
        PoolSpec(id=STORM, model=good),
        PoolSpec(id=BAD, model=str(engine_files.missing())),
    ]
    with captured_logs():
        st = stack_factory(db_url, specs)
        seen = _drive(st, engine_files)
        tokens = Scrape(seen["engine_metrics"]).value("llamacpp:prompt_tokens_total")
        scrape = st.scrape_until(  # engines are fetched in the background: one fetch after the completion
            lambda s: s.value("llamacpp:prompt_tokens_total", pool_id=MAIN) == tokens, "the engine's tokens"
        )
        events = st.events()
        _assert_seed_families(scrape)
        _assert_counters(scrape, events)
        _assert_histograms(scrape, events)
        _assert_gauges(scrape, st)
        _assert_engine_metrics(scrape, seen["engine_metrics"])
        # the audit's totals survive a restart; the proxied requests' counters are this process's (documented)
        before = {k: v for k, v in scrape.counters_and_histograms().items() if not k[0].startswith("pool_request")}
        assert len(before) < len(scrape.counters_and_histograms())  # the completion went through the data plane
        st.stop()

        # A new poolmgr's /metrics on the same database (folding every row at once this time) reports the same
        # totals. (Not a whole new serve: one with an empty pools file would remove the pools, one with the same
        # file would start them again and add rows.)
        node_id = st.cfg.node_id
        reader = Registry(db_url, node_id=node_id)
        try:
            endpoint = MetricsEndpoint(PoolMetricsCollector(reader, node_id=node_id, inventory=Inventory, lag_s=0))
            again = Scrape(endpoint()[0].decode())
        finally:
            reader.close()
    assert again.counters_and_histograms() == before


def test_a_stuck_engine_never_stalls_the_scrape(
    stack_factory: StackFactory, engine_files: EngineFiles, sqlite_url: str
) -> None:
    good = str(engine_files.model("good.gguf"))
    st = stack_factory(sqlite_url, [PoolSpec(id="obs-stuck", model=good), PoolSpec(id="obs-fine", model=good)],
                       engine_timeout_s=0.3)  # fmt: skip
    stuck = st.wait_state("obs-stuck", "ready")
    st.wait_state("obs-fine", "ready")
    st.scrape_until(lambda s: s.value("pool_engine_metrics_up", pool_id="obs-stuck") == 1, "the engine fetched")
    os.kill(stuck["pid"], signal.SIGSTOP)  # accepts connections (the kernel does), never answers
    # a request in flight on it through the data plane: an engine with work is fetched each round (an idle one
    # is not fetched again: nothing of its numbers can move)
    url = f"{st.http.base_url}/pools/obs-stuck/engine/completion"
    body = {"prompt": "hi", "n_predict": 1}
    asking = threading.Thread(target=_quietly, args=(httpx.post, url), kwargs={"json": body, "timeout": 8})
    asking.start()
    slowest, deadline = 0.0, time.monotonic() + 5
    try:
        while True:  # until a background fetch has timed out on it
            started = time.monotonic()
            scrape = st.scrape()
            slowest = max(slowest, time.monotonic() - started)
            if scrape.value("pool_engine_metrics_up", pool_id="obs-stuck") == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        os.kill(stuck["pid"], signal.SIGCONT)
        asking.join(10)
    assert slowest < 0.3 + 0.7  # every scrape serves the last fetches: none waits on the stuck engine
    assert scrape.value("pool_engine_metrics_up", pool_id="obs-stuck") == 0
    assert scrape.value("pool_engine_metrics_up", pool_id="obs-fine") == 1
    assert scrape.series("llamacpp:requests_processing", pool_id="obs-stuck") == []
    assert scrape.value("llamacpp:requests_processing", pool_id="obs-fine") == 0
    assert scrape.value("pool_slots_total", pool_id="obs-stuck") == 1  # the rest of the scrape is all there


def _quietly(call: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    with contextlib.suppress(httpx.HTTPError):
        call(*args, **kwargs)
