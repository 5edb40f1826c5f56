"""Steps of features/observability/metrics.feature (B-METRICS-001..010), against one running poolmgr (the fake
llama-server as its engine, the recorded H100 as its GPU) shared by the scenarios of this module."""

from __future__ import annotations

import json
import os
import signal
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from poolmgr.engines import ExitInfo
from poolmgr.errors import PreloadFailed
from poolmgr.lifecycle.effects import Crashed, Placed, PreloadStarted, PreloadSucceeded, ReadyInfo
from poolmgr.lifecycle.fsm import fire
from poolmgr.lifecycle.placing import CPU_PLACEMENT
from poolmgr.poolsfile import PoolSpec
from poolmgr.store import EventView, migrate

from ._stack import H100_SNAPSHOT, EngineFiles, Scrape, Stack, kill_engines, make_config

scenarios("observability/metrics.feature")

GOOD, BAD = "obs-b-good", "obs-b-bad"


@pytest.fixture(scope="module")
def running(engine_files: EngineFiles) -> Iterator[Stack]:
    state = Path(tempfile.mkdtemp(prefix="state-", dir=engine_files.root))
    state.chmod(0o755)
    url = f"sqlite:///{state / 'poolmgr.db'}"
    migrate(url)
    specs = [PoolSpec(id=GOOD, model=str(engine_files.model("good.gguf")), slots=2),
             PoolSpec(id=BAD, model=str(engine_files.missing()))]  # fmt: skip
    stack = Stack(make_config(url, state, engine_files.server), specs).start()
    try:
        yield stack
    finally:
        stack.stop()
        kill_engines([GOOD, BAD])


@pytest.fixture
def ctx() -> dict[str, Any]:
    return {}


def _scrape(ctx: dict[str, Any]) -> Scrape:
    scrape: Scrape = ctx["scrape"]
    return scrape


def _rows(stack: Stack, pool_id: str, kind: str) -> list[EventView]:
    return [e for e in stack.events(pool_id) if e.kind == kind]


@given(
    parsers.parse(
        'a running poolmgr on the recorded H100 with a pool "{good}" of {slots:d} slots and a pool "{bad}" whose '
        "model is missing"
    ),
    target_fixture="stack",
)
def a_running_poolmgr(running: Stack, good: str, slots: int, bad: str) -> Stack:
    assert running.wait_for(good, lambda s: s["ready"], "ready")["slots_total"] == slots
    assert running.status(bad)["model"].endswith("missing.gguf")
    return running


@given(parsers.parse('the engine of "{pool_id}" was killed once and came back'))
def killed_once(stack: Stack, pool_id: str) -> None:
    if not _rows(stack, pool_id, "crashed"):  # the first scenario does it; the others find it done
        os.kill(stack.status(pool_id)["pid"], signal.SIGKILL)
    stack.wait_for(pool_id, lambda s: s["ready"] and s["restart_count"] == 1, "back after one restart")
    assert len(_rows(stack, pool_id, "crashed")) == 1


@given(parsers.parse('the circuit breaker of "{pool_id}" is open'))
def breaker_open(stack: Stack, pool_id: str) -> None:
    assert stack.wait_state(pool_id, "breaker-open")["restart_count"] == 1


@given(parsers.parse('the engine of a pool "{pool_id}" died of a GPU driver error'))
def driver_error(stack: Stack, pool_id: str) -> None:
    """The rows the worker writes for it (this pool has no worker: nothing else touches it)."""
    reg = stack.registry
    assert reg is not None
    reg.register(PoolSpec(id=pool_id, model="/models/gpu.gguf", device_mask="0"))
    for effect in (Placed(), PreloadStarted(CPU_PLACEMENT), PreloadSucceeded(ReadyInfo("http://127.0.0.1:9", None, 1))):
        fire(reg, pool_id, effect)
    why = PreloadFailed("driver_error", "CUDA error: unspecified launch failure")  # detail: {"message": ...}
    fire(reg, pool_id, Crashed(why, ExitInfo(code=1)))
    assert reg.get(pool_id).state.value == "crashed"


@when("Prometheus scrapes /metrics")
def scrape(stack: Stack, ctx: dict[str, Any]) -> None:
    ctx["scrape"] = stack.scrape()


@when(parsers.parse('a lease is taken on "{pool_id}"'))
def take_lease(stack: Stack, ctx: dict[str, Any], pool_id: str) -> None:
    resp = stack.http.post(f"/pools/{pool_id}/leases", json={"ttl_s": 60})
    assert resp.status_code == 201, resp.text
    ctx["lease"] = (pool_id, resp.json()["lease_id"])


@when("the lease is released")
def release_lease(stack: Stack, ctx: dict[str, Any]) -> None:
    pool_id, lease_id = ctx.pop("lease")
    assert stack.http.delete(f"/pools/{pool_id}/leases/{lease_id}").status_code == 200


@then(parsers.parse('pool_preload_success_total of "{pool_id}" for engine "{engine}" equals its preload_ok audit rows'))
def success_equals_rows(stack: Stack, ctx: dict[str, Any], pool_id: str, engine: str) -> None:
    rows = len(_rows(stack, pool_id, "preload_ok"))
    assert rows == 2  # the first start and the one after the crash
    assert _scrape(ctx).value("pool_preload_success_total", pool_id=pool_id, engine=engine) == rows


@then(parsers.parse('pool_preload_success_total of "{pool_id}" for engine "{engine}" is {value:d}'))
def success_is(ctx: dict[str, Any], pool_id: str, engine: str, value: int) -> None:
    assert _scrape(ctx).value("pool_preload_success_total", pool_id=pool_id, engine=engine) == value


@then(parsers.parse('pool_preload_failure_total of "{pool_id}" counts its preload_failed audit rows per reason'))
def failures_per_reason(stack: Stack, ctx: dict[str, Any], pool_id: str) -> None:
    reasons = Counter(e.reason for e in _rows(stack, pool_id, "preload_failed"))
    assert sum(reasons.values()) == 2  # the threshold of the breaker
    series = {s.labels["reason"]: s.value for s in _scrape(ctx).series("pool_preload_failure_total", pool_id=pool_id)}
    assert series == dict(reasons)


@then("every pool_preload_failure_total sample has the labels pool_id, engine and reason")
def failure_labels(ctx: dict[str, Any]) -> None:
    samples = _scrape(ctx).series("pool_preload_failure_total")
    assert samples and all(set(s.labels) == {"pool_id", "engine", "reason"} for s in samples)


def _snapshot_devices() -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = json.loads(H100_SNAPSHOT.read_text())["devices"]
    assert devices
    return devices


@then("device_vram_total_bytes of every GPU of the NVML snapshot is its total memory")
def vram_total(ctx: dict[str, Any]) -> None:
    for dev in _snapshot_devices():
        assert _scrape(ctx).value("device_vram_total_bytes", device_id=dev["uuid"]) == dev["memory_info_v2"]["total"]


@then("device_vram_free_bytes of every GPU of the NVML snapshot is its free memory")
def vram_free(ctx: dict[str, Any]) -> None:
    for dev in _snapshot_devices():
        assert _scrape(ctx).value("device_vram_free_bytes", device_id=dev["uuid"]) == dev["memory_info_v2"]["free"]


@then(parsers.parse('driver_reset_total of "{pool_id}" is {value:d}'))
def driver_resets(ctx: dict[str, Any], pool_id: str, value: int) -> None:
    assert _scrape(ctx).value("driver_reset_total", pool_id=pool_id) == value


@then(parsers.parse('engine_crash_total of "{pool_id}" with reason "{reason}" is {value:d}'))
def crashes(ctx: dict[str, Any], pool_id: str, reason: str, value: int) -> None:
    assert _scrape(ctx).value("engine_crash_total", pool_id=pool_id, reason=reason) == value


@then(parsers.parse('pool_restart_total of "{pool_id}" with the reason of its crash is {value:d}'))
def restarts_after_crash(stack: Stack, ctx: dict[str, Any], pool_id: str, value: int) -> None:
    reason = _rows(stack, pool_id, "crashed")[0].reason or ""
    assert reason in ("signal", "exit")
    assert _scrape(ctx).value("pool_restart_total", pool_id=pool_id, reason=reason) == value
    assert _scrape(ctx).total("pool_restart_total", pool_id=pool_id) == value


@then(parsers.parse('pool_restart_total of "{pool_id}" with the reason of its first failure is {value:d}'))
def restarts_after_failure(stack: Stack, ctx: dict[str, Any], pool_id: str, value: int) -> None:
    reason = _rows(stack, pool_id, "preload_failed")[0].reason or ""
    assert _scrape(ctx).value("pool_restart_total", pool_id=pool_id, reason=reason) == value


@then(parsers.parse('backoff_delay_ms of "{pool_id}" counts and sums its back_off audit rows'))
def backoff_histogram(stack: Stack, ctx: dict[str, Any], pool_id: str) -> None:
    delays = [e.backoff_ms for e in _rows(stack, pool_id, "back_off")]
    assert len(delays) == 1 and all(d is not None and 45 <= d <= 55 for d in delays)  # 50 ms ±10 %
    assert _scrape(ctx).value("backoff_delay_ms_count", pool_id=pool_id) == len(delays)
    assert _scrape(ctx).value("backoff_delay_ms_sum", pool_id=pool_id) == sum(d or 0 for d in delays)
    assert _scrape(ctx).value("backoff_delay_ms_bucket", pool_id=pool_id, le="50.0") == sum(
        1 for d in delays if d and d <= 50
    )


@then(parsers.parse('the backoff_delay_ms buckets of "{pool_id}" are cumulative up to +Inf'))
def cumulative(ctx: dict[str, Any], pool_id: str) -> None:
    buckets = _scrape(ctx).series("backoff_delay_ms_bucket", pool_id=pool_id)
    values = [b.value for b in buckets]
    assert buckets[-1].labels["le"] == "+Inf" and values == sorted(values)
    assert values[-1] == _scrape(ctx).value("backoff_delay_ms_count", pool_id=pool_id)


@then(
    parsers.re(
        r'(?P<gauge>pool_slots_total|pool_slots_free|pool_active_leases) of "(?P<pool_id>[^"]+)" is (?P<value>\d+)'
    ),
    converters={"value": int},
)
def gauge_is(ctx: dict[str, Any], gauge: str, pool_id: str, value: int) -> None:
    assert _scrape(ctx).families[gauge].type == "gauge"
    assert _scrape(ctx).value(gauge, pool_id=pool_id) == value


@then("pool_slots_total of every pool is what its status says")
def slots_match_status(stack: Stack, ctx: dict[str, Any]) -> None:
    for pool_id in (GOOD, BAD):
        assert _scrape(ctx).value("pool_slots_total", pool_id=pool_id) == stack.status(pool_id)["slots_total"]
