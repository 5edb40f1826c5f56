"""Operator actions racing with engine crashes, hangs and wake-ups: the real reconciler and worker in-process,
the engine a real process (the fake llama-server, unsandboxed), the registry a SQLite file."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from poolmgr.lifecycle import operations
from poolmgr.lifecycle.effects import StopRequested
from poolmgr.lifecycle.fsm import fire
from poolmgr.lifecycle.reconciler import Reconciler
from poolmgr.lifecycle.runtime import EngineRuntime
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig
from poolmgr.states import PoolState
from poolmgr.store import PoolView, Registry
from tests.e2e.conftest import kill_engines
from tests.lifecycle.conftest import MakeEngineDir


@pytest.fixture
def engine_dir(make_engine_dir: MakeEngineDir) -> Path:
    return make_engine_dir()


def _cfg(engine_dir: Path, **kw: Any) -> PoolManagerConfig:
    base: dict[str, Any] = {
        "state_dir": engine_dir / "state", "llama_server": str(engine_dir / "llama-server"),
        "health_check_interval_ms": 50, "health_check_timeout_ms": 200, "backoff_initial_ms": 60_000,
        "backoff_max_ms": 60_000, "stop_grace_ms": 300,
    }  # fmt: skip
    return PoolManagerConfig(**{**base, **kw})


async def _until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    for _ in range(int(timeout / 0.02)):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {what}")


def _run(
    cfg: PoolManagerConfig,
    url: str,
    spec: PoolSpec,
    body: Callable[[Reconciler, Registry], Awaitable[None]],
    *,
    before: Callable[[Registry], None] | None = None,
) -> Registry:
    registry = Registry(url, node_id=cfg.node_id)

    async def scenario() -> None:
        rec = Reconciler(cfg, registry, runtime=EngineRuntime(cfg, isolate=False))
        if before is not None:
            registry.register(spec)
            before(registry)
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


async def _ready(registry: Registry, pool_id: str) -> int:
    await _until(lambda: registry.get(pool_id).state is PoolState.READY, 10, f"{pool_id} ready")
    pid = registry.get(pool_id).pid
    assert pid is not None
    return pid


def test_an_engine_crash_ends_its_leases(sqlite_url: str, engine_dir: Path) -> None:
    """A crashed engine serves no one: its leases end with it, so the restarted engine has every slot free."""
    spec = PoolSpec(id="crashy", model=str(engine_dir / "tiny.gguf"), slots=2)

    async def body(rec: Reconciler, registry: Registry) -> None:
        pid = await _ready(registry, "crashy")
        registry.allocate_lease("crashy", ttl_s=600)
        assert registry.get("crashy").active_leases == 1
        os.kill(pid, signal.SIGKILL)
        await _until(lambda: registry.get("crashy").state is PoolState.BACKOFF, 5, "crashy backing off")
        # (checked before shutdown, whose recorded stop ends every lease anyway)
        assert [e.kind for e in registry.events(pool_id="crashy") if e.kind == "crashed"] == ["crashed"]
        assert registry.active_leases("crashy") == 0
        assert registry.get("crashy").active_leases == 0

    _run(_cfg(engine_dir), sqlite_url, spec, body).close()


def test_frequent_kicks_do_not_starve_the_health_checks_of_a_hung_engine(sqlite_url: str, engine_dir: Path) -> None:
    """Lease releases kick the worker; a steady stream of them must not stop health checks: a hung engine is
    still found and counted as a crash."""
    spec = PoolSpec(id="hung", model=str(engine_dir / "tiny.gguf"))

    async def body(rec: Reconciler, registry: Registry) -> None:
        pid = await _ready(registry, "hung")
        os.kill(pid, signal.SIGSTOP)  # hung: it neither answers nor exits
        stop = asyncio.Event()

        async def kicker() -> None:
            while not stop.is_set():
                rec.kick("hung")
                await asyncio.sleep(0.01)

        task = asyncio.ensure_future(kicker())
        try:
            await _until(
                lambda: any(e.kind == "crashed" for e in registry.events(pool_id="hung")), 5, "hung engine crashed"
            )
        finally:
            stop.set()
            await task

    registry = _run(_cfg(engine_dir), sqlite_url, spec, body)
    try:
        crashed = [e for e in registry.events(pool_id="hung") if e.kind == "crashed"]
        assert len(crashed) == 1 and crashed[0].reason == "health_failure"
    finally:
        registry.close()


def test_a_preload_that_lands_while_the_worker_reads_the_pool_is_not_lost(sqlite_url: str, engine_dir: Path) -> None:
    """The API's preload (desired running + kick) lands between the worker's read of a stopped pool and its
    wait for a kick: the worker must still start the pool, not sleep forever on the stale read."""
    spec = PoolSpec(id="idle", model=str(engine_dir / "tiny.gguf"))

    def stopped(registry: Registry) -> None:
        fire(registry, "idle", StopRequested())

    async def body(rec: Reconciler, registry: Registry) -> None:
        worker = rec.workers["idle"]
        await asyncio.sleep(0.2)  # the worker has looked and now waits for a kick
        assert registry.get("idle").state is PoolState.DISCOVERED
        store = worker.store
        real_find = store.find
        injected = False

        async def racing_find(pool_id: str) -> PoolView | None:
            nonlocal injected
            result = await real_find(pool_id)
            if not injected:
                injected = True  # the request commits and kicks after the worker's read, before it waits
                await asyncio.to_thread(operations.request_preload, registry, "idle", correlation_id="req-1")
                worker.kick()
            return result

        store.find = racing_find  # type: ignore[method-assign]
        worker.kick()  # a spurious wake-up (a lease reaped, say): the worker reads the pool again
        await _until(lambda: registry.get("idle").state is PoolState.READY, 5, "idle started after preload")

    registry = _run(_cfg(engine_dir), sqlite_url, spec, body, before=stopped)
    registry.close()


def test_an_engine_that_dies_during_a_drain_ends_the_drain_at_once(sqlite_url: str, engine_dir: Path) -> None:
    """A drain waiting on a lease (long deadline) whose engine dies has nothing left to wait for: it stops
    now, not when the deadline passes, and records no engine."""
    spec = PoolSpec(id="drainy", model=str(engine_dir / "tiny.gguf"))

    async def body(rec: Reconciler, registry: Registry) -> None:
        pid = await _ready(registry, "drainy")
        registry.allocate_lease("drainy", ttl_s=600)
        operations.request_drain(registry, "drainy", deadline_ms=600_000, correlation_id="req-2")
        rec.kick("drainy")
        await asyncio.sleep(0.2)
        assert registry.get("drainy").state is PoolState.DRAINING
        os.kill(pid, signal.SIGKILL)
        await _until(lambda: registry.get("drainy").state is PoolState.STOPPED, 3, "drainy stopped")

    registry = _run(_cfg(engine_dir), sqlite_url, spec, body)
    try:
        view = registry.get("drainy")
        assert view.pid is None and view.endpoint_url is None and not view.draining
        drained = [e for e in registry.events(pool_id="drainy") if e.kind == "drained"]
        assert len(drained) == 1 and drained[0].correlation_id == "req-2"
    finally:
        registry.close()


def test_an_engine_that_dies_as_a_reload_is_requested_goes_on_to_the_new_model(
    sqlite_url: str, engine_dir: Path
) -> None:
    """The engine exits just as a reload is accepted: the worker sees the exit with the pool already draining.
    The reload goes on with the new model; it is not mistaken for a failed reload and rolled back."""
    spec = PoolSpec(id="swap", model=str(engine_dir / "tiny.gguf"))
    new_model = engine_dir / "tiny2.gguf"
    shutil.copy(engine_dir / "tiny.gguf", new_model)

    async def body(rec: Reconciler, registry: Registry) -> None:
        pid = await _ready(registry, "swap")
        await asyncio.sleep(0.3)  # the worker now watches the ready engine
        # no kick: the worker's watch wakes for the exit alone, and finds the pool draining for the reload
        operations.request_reload(registry, "swap", model=str(new_model), drain_deadline_ms=600_000,
                                  correlation_id="req-3")  # fmt: skip
        os.kill(pid, signal.SIGKILL)
        await _until(
            lambda: any(e.trigger == "preload_ok" and e.correlation_id == "req-3"
                        for e in registry.events(pool_id="swap")), 10, "swap reloaded",
        )  # fmt: skip
        view = registry.get("swap")
        assert view.state is PoolState.READY and view.model == str(new_model)
        assert not [e for e in registry.events(pool_id="swap") if e.trigger == "rollback"]

    _run(_cfg(engine_dir, health_check_interval_ms=60_000), sqlite_url, spec, body).close()


def test_an_engine_binary_that_cannot_be_executed_is_a_failed_preload(sqlite_url: str, engine_dir: Path) -> None:
    """exec fails (a script whose interpreter is missing): a failed preload with its reason that backs off,
    not a worker that dies and restarts every second with the pool stuck in preloading."""
    broken = engine_dir / "broken-server"
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    spec = PoolSpec(id="noexec", model=str(engine_dir / "tiny.gguf"))

    async def body(rec: Reconciler, registry: Registry) -> None:
        await _until(lambda: registry.get("noexec").state is PoolState.BACKOFF, 3, "noexec backing off")
        failed = [e for e in registry.events(pool_id="noexec") if e.kind == "preload_failed"]
        assert len(failed) == 1 and failed[0].reason == "spawn_failed"
        view = registry.get("noexec")
        assert view.pid is None and "cannot start" in (view.last_error or "")

    _run(_cfg(engine_dir, llama_server=str(broken)), sqlite_url, spec, body).close()


def test_an_engine_that_hangs_during_a_drain_is_force_stopped_without_waiting_for_the_deadline(
    sqlite_url: str, engine_dir: Path
) -> None:
    """A drain waiting on a lease whose engine stops answering (SIGSTOP) force-stops it after the usual number
    of missed health checks, not at a deadline ten minutes away."""
    spec = PoolSpec(id="frozen", model=str(engine_dir / "tiny.gguf"))

    async def body(rec: Reconciler, registry: Registry) -> None:
        pid = await _ready(registry, "frozen")
        registry.allocate_lease("frozen", ttl_s=600)
        operations.request_drain(registry, "frozen", deadline_ms=600_000, correlation_id="req-hang")
        rec.kick("frozen")
        await asyncio.sleep(0.2)
        assert registry.get("frozen").state is PoolState.DRAINING
        os.kill(pid, signal.SIGSTOP)
        await _until(lambda: registry.get("frozen").state is PoolState.STOPPED, 5, "frozen stopped")

    registry = _run(_cfg(engine_dir), sqlite_url, spec, body)
    try:
        drained = [e for e in registry.events(pool_id="frozen") if e.kind == "drained"]
        assert len(drained) == 1 and drained[0].detail is not None
        assert drained[0].detail["force_stopped"] is True and drained[0].detail["final_leases"] == 1
        assert drained[0].detail["duration_ms"] < 10_000
        assert registry.get("frozen").pid is None
    finally:
        registry.close()
