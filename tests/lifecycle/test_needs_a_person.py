"""What needs a person is logged at critical: an engine killed by the kernel OOM killer inside its pool's memory
limit (a real cgroup, a real OOM kill) fails with reason host_oom, logged critical; a plain kill is an error."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import pytest

from poolmgr.isolation import doctor
from poolmgr.lifecycle.reconciler import Reconciler
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig
from poolmgr.states import PoolState
from poolmgr.store import Registry
from tests.e2e.conftest import kill_engines
from tests.lifecycle.conftest import MakeEngineDir

_FAILED = ("crashed", "preload_failed")


def _failure_lines(caplog: pytest.LogCaptureFixture, pool_id: str) -> list[logging.LogRecord]:
    said = (f"pool {pool_id} engine crashed", f"pool {pool_id} preload failed")
    return [r for r in caplog.records if r.getMessage().startswith(said)]


def _serve_until_crashed(
    cfg: PoolManagerConfig, url: str, spec: PoolSpec, kill: bool, caplog: pytest.LogCaptureFixture
) -> list[str]:
    """Serve `spec` until its engine failed and the worker logged it (the line follows the audit row: shutting
    down in between would cancel the worker before it logs)."""
    registry = Registry(url, node_id=cfg.node_id)

    async def scenario() -> None:
        rec = Reconciler(cfg, registry)
        await rec.start([spec])
        try:
            deadline = time.monotonic() + 30
            ready_at: float | None = None
            while not (
                any(e.kind in _FAILED for e in registry.events(pool_id=spec.id)) and _failure_lines(caplog, spec.id)
            ):
                view = registry.get(spec.id)
                if kill and view.state is PoolState.READY and view.pid:
                    ready_at = ready_at or time.monotonic()
                    if time.monotonic() - ready_at > 0.5:  # watched by then: its exit status is seen
                        os.kill(view.pid, signal.SIGKILL)
                assert time.monotonic() < deadline, registry.get(spec.id)
                await asyncio.sleep(0.05)
        finally:
            await rec.shutdown(keep_engines=False)

    try:
        asyncio.run(scenario())
        return [e.reason or "" for e in registry.events(pool_id=spec.id) if e.kind in _FAILED]
    finally:
        registry.close()
        kill_engines([spec.id])


def test_a_kernel_oom_kill_is_critical_a_plain_kill_is_an_error(
    sqlite_url: str, make_engine_dir: MakeEngineDir, caplog: pytest.LogCaptureFixture
) -> None:
    cgroups = " ".join(row.detail for row in doctor() if row.name.startswith("cgroup") and row.supported)
    if os.geteuid() != 0 or "memory" not in cgroups:
        pytest.skip("needs root and a memory cgroup controller to set the pool's memory limit")
    hog_dir = make_engine_dir(env="FAKE_ENGINE_MODE=hog")  # allocates memory without end once ready
    cfg = PoolManagerConfig(state_dir=hog_dir / "state", llama_server=str(hog_dir / "llama-server"),
                            backoff_initial_ms=3_600_000, backoff_max_ms=3_600_000, stop_grace_ms=300)  # fmt: skip
    hog = PoolSpec(id="hog", model=str(hog_dir / "tiny.gguf"), isolation={"memory_max": 128 * 1024 * 1024})
    with caplog.at_level(logging.INFO, logger="poolmgr.pool"):
        assert _serve_until_crashed(cfg, sqlite_url, hog, kill=False, caplog=caplog) == ["host_oom"]
        plain_dir = make_engine_dir()
        cfg = PoolManagerConfig(state_dir=plain_dir / "state", llama_server=str(plain_dir / "llama-server"),
                                backoff_initial_ms=3_600_000, backoff_max_ms=3_600_000, stop_grace_ms=300)  # fmt: skip
        plain = PoolSpec(id="plain", model=str(plain_dir / "tiny.gguf"))
        assert _serve_until_crashed(cfg, sqlite_url, plain, kill=True, caplog=caplog) == ["signal"]
    # The hog dies as soon as it is ready: while serving (a crash) or still in its preload's bookkeeping.
    (oom,) = _failure_lines(caplog, "hog")
    assert oom.levelno == logging.CRITICAL and vars(oom)["reason"] == "host_oom"
    (killed,) = _failure_lines(caplog, "plain")
    assert killed.levelno == logging.ERROR and vars(killed)["signal"] == 9
