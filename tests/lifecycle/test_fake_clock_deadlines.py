"""Health cadence, drain deadlines and preload timeouts run on the injected clock: the real reconciler and
worker with a fake clock and a real (fake llama-server) engine. Real time never decides any of them."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from poolmgr.clock import FakeClock
from poolmgr.lifecycle import operations
from poolmgr.lifecycle.reconciler import Reconciler
from poolmgr.lifecycle.traffic import Cut
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig
from poolmgr.states import PoolState
from poolmgr.store import Registry
from tests.e2e.conftest import kill_engines
from tests.lifecycle.conftest import MakeEngineDir

INTERVAL_MS = 1000
THRESHOLD = 3


def _cfg(engine_dir: Path, **kw: Any) -> PoolManagerConfig:
    base: dict[str, Any] = {
        "state_dir": engine_dir / "state", "llama_server": str(engine_dir / "llama-server"),
        "health_check_interval_ms": INTERVAL_MS, "health_failure_threshold": THRESHOLD,
        "health_check_timeout_ms": 200, "backoff_initial_ms": 3_600_000, "backoff_max_ms": 3_600_000,
        "stop_grace_ms": 300,
    }  # fmt: skip
    return PoolManagerConfig(**{**base, **kw})


async def _until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)


def _run(
    cfg: PoolManagerConfig, url: str, clock: FakeClock, spec: PoolSpec,
    body: Callable[[Reconciler, Registry], Awaitable[None]],
) -> Registry:  # fmt: skip
    registry = Registry(url, node_id=cfg.node_id, clock=clock)

    async def scenario() -> None:
        rec = Reconciler(cfg, registry)
        await rec.start([spec])
        try:
            await body(rec, registry)
        finally:
            await rec.shutdown(keep_engines=False)

    try:
        asyncio.run(scenario())
    finally:
        kill_engines([spec.id])
    return registry


def test_a_hung_engine_is_found_threshold_timeouts_after_its_first_unanswered_probe(
    sqlite_url: str, make_engine_dir: MakeEngineDir
) -> None:
    """Probes go once per interval of the injected clock; once one goes unanswered for its timeout (real time:
    the engine's I/O), the next goes at once: the hang is a crash `threshold` timeouts later, without the clock
    moving another interval — and not while the clock stands still before that first probe."""
    engine_dir = make_engine_dir()
    spec = PoolSpec(id="hangs", model=str(engine_dir / "tiny.gguf"))
    clock = FakeClock()
    stopped: list[int] = []

    def crashed(registry: Registry) -> bool:
        return any(e.kind == "crashed" for e in registry.events(pool_id="hangs"))

    async def body(rec: Reconciler, registry: Registry) -> None:
        await _until(lambda: registry.get("hangs").state is PoolState.READY, 20, "ready")
        # READY is written before the worker starts watching: a clock step taken in between would be one the
        # prober never saw (its first probe is a phase of the interval after the watch begins)
        await _until(lambda: rec.runtime.prober.watching() == 1, 5, "the engine watched")
        pid = registry.get("hangs").pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # alive to the pidfd, silent to /health: a hang
        stopped.append(pid)
        await asyncio.sleep(1.0)  # however much real time passes: no probe is due on the clock
        assert not crashed(registry)
        clock.advance(INTERVAL_MS / 1000)  # the next probe goes, unanswered; then one a timeout (200 ms)
        await asyncio.sleep(0.1)
        assert not crashed(registry)
        await _until(lambda: crashed(registry), 5, "the hang found")

    registry = _run(_cfg(engine_dir), sqlite_url, clock, spec, body)
    try:
        (crash,) = [e for e in registry.events(pool_id="hangs") if e.kind == "crashed"]
        assert crash.reason == "health_failure" and f"{THRESHOLD} times in a row" in (crash.detail or {})["message"]
        assert "no answer within 0.2 s" in (crash.detail or {})["message"]
    finally:
        registry.close()
        for pid in stopped:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # the hung engine was stopped (killed), not left behind


def test_a_drain_whose_lease_is_never_released_ends_at_its_deadline_on_the_clock(
    sqlite_url: str, make_engine_dir: MakeEngineDir
) -> None:
    engine_dir = make_engine_dir()
    spec = PoolSpec(id="holds", model=str(engine_dir / "tiny.gguf"))
    deadline_ms = 20_000  # more clock time than this test may take in real time

    async def body(rec: Reconciler, registry: Registry) -> None:
        await _until(lambda: registry.get("holds").state is PoolState.READY, 20, "ready")
        registry.allocate_lease("holds", ttl_s=3600)
        started = time.monotonic()
        operations.request_drain(registry, "holds", deadline_ms=deadline_ms, correlation_id="drain-9")
        rec.kick("holds")  # as the API does after every request
        await _until(lambda: registry.get("holds").state is PoolState.STOPPED, 15, "drained at the deadline")
        assert time.monotonic() - started < deadline_ms / 1000

    registry = _run(_cfg(engine_dir), sqlite_url, FakeClock(), spec, body)
    try:
        (drained,) = [e for e in registry.events(pool_id="holds") if e.kind == "drained"]
        detail = drained.detail or {}
        assert detail["force_stopped"] is True and detail["final_leases"] == 1 and detail["outcome"] == "forced"
        assert detail["cut_requests"] == 0
        # Ended at the first look at the clock past the deadline (the drain looks every 50 ms).
        assert deadline_ms <= detail["duration_ms"] < deadline_ms + 100
        assert registry.get("holds").active_leases == 0
    finally:
        registry.close()


def test_a_drain_waits_for_a_request_in_flight_and_cuts_it_at_its_deadline_on_the_clock(
    sqlite_url: str, make_engine_dir: MakeEngineDir
) -> None:
    """No lease held, one request still running through the data plane: the drain waits for it (not for real
    time) and, at the deadline, cuts it; the audit row says how many requests were cut."""
    engine_dir = make_engine_dir()
    spec = PoolSpec(id="busy", model=str(engine_dir / "tiny.gguf"))
    deadline_ms = 20_000

    async def body(rec: Reconciler, registry: Registry) -> None:
        await _until(lambda: registry.get("busy").state is PoolState.READY, 20, "ready")
        traffic = rec.runtime.traffic.get("busy")

        async def request() -> None:  # a generation that outlasts any deadline
            async with traffic.admit() as ticket:
                await ticket.run(asyncio.sleep(3600))

        running = asyncio.ensure_future(request())
        await _until(lambda: traffic.in_flight == 1, 5, "the request admitted")
        started = time.monotonic()
        operations.request_drain(registry, "busy", deadline_ms=deadline_ms, correlation_id="drain-10")
        rec.kick("busy")
        await _until(lambda: registry.get("busy").state is PoolState.STOPPED, 15, "drained at the deadline")
        assert time.monotonic() - started < deadline_ms / 1000
        with pytest.raises(Cut):
            await running
        assert traffic.in_flight == 0

    registry = _run(_cfg(engine_dir), sqlite_url, FakeClock(), spec, body)
    try:
        (drained,) = [e for e in registry.events(pool_id="busy") if e.kind == "drained"]
        detail = drained.detail or {}
        assert (detail["cut_requests"], detail["final_leases"], detail["force_stopped"]) == (1, 0, True)
        assert detail["outcome"] == "forced"
        assert deadline_ms <= detail["duration_ms"] < deadline_ms + 100
    finally:
        registry.close()


def test_a_preload_times_out_on_the_clock_not_on_the_wall(sqlite_url: str, make_engine_dir: MakeEngineDir) -> None:
    engine_dir = make_engine_dir(env="FAKE_ENGINE_MODE=hang")  # its socket answers 503 "Loading model", never 200
    spec = PoolSpec(id="slow", model=str(engine_dir / "tiny.gguf"))
    clock = FakeClock()

    async def body(rec: Reconciler, registry: Registry) -> None:
        await _until(lambda: registry.get("slow").pid is not None, 20, "spawned")
        await asyncio.sleep(1.5)  # three times the preload timeout of real time: the clock has not moved
        view = registry.get("slow")
        assert view.state is PoolState.PRELOADING and view.consecutive_failures == 0
        clock.advance(0.6)
        failed = lambda: any(e.kind == "preload_failed" for e in registry.events(pool_id="slow"))  # noqa: E731
        await _until(failed, 5, "timed out")

    registry = _run(_cfg(engine_dir, preload_timeout_ms=500), sqlite_url, clock, spec, body)
    try:
        failed = [e for e in registry.events(pool_id="slow") if e.kind == "preload_failed"]
        assert failed and {e.reason for e in failed} == {"timeout"}
    finally:
        registry.close()
