"""The real reconciler and worker on a fake clock: backoff sleeps, breaker timeouts and the storm window
advance instantly, while the engine is a real process (the fake llama-server) that crashes soon after it
becomes ready."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from poolmgr.clock import FakeClock
from poolmgr.lifecycle.reconciler import Reconciler
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig
from poolmgr.store import EventView, PoolView, Registry
from tests.e2e.conftest import kill_engines
from tests.lifecycle.conftest import MakeEngineDir


@pytest.fixture
def engine_dir(make_engine_dir: MakeEngineDir) -> Path:
    """The fake engine, and a model telling it to crash (SIGSEGV) 1.5 s after it is ready."""
    path = make_engine_dir(env="FAKE_ENGINE_CRASH_AFTER_MS=1500")
    (path / "crashy.gguf").write_bytes(
        b"GGUF" + b"\x03\x00\x00\x00" + b"\0" * 56 + b"\nfake-engine-mode: crash_after\n"
    )
    (path / "crashy.gguf").chmod(0o644)
    return path


def _run(
    cfg: PoolManagerConfig, url: str, clock: FakeClock, spec: PoolSpec, until: str, times: int = 1,
    also: Callable[[], bool] = lambda: True,
) -> list[EventView]:  # fmt: skip
    """Run the reconciler until `times` audit rows with trigger `until` appear; the events up to the last one.
    (On a fake clock the pool races on at once: the breaker's timeout, say, passes instantly.)"""
    registry = Registry(url, node_id=cfg.node_id, clock=clock)

    async def scenario() -> None:
        rec = Reconciler(cfg, registry)
        await rec.start([spec])
        try:
            for _ in range(600):
                if sum(e.trigger == until for e in registry.events(pool_id=spec.id)) >= times and also():
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"{spec.id} never fired {until}: {registry.get(spec.id)}")
        finally:
            await rec.shutdown(keep_engines=False)

    try:
        asyncio.run(scenario())
        events = registry.events(pool_id=spec.id)
        last = [i for i, e in enumerate(events) if e.trigger == until][times - 1]
        return events[: last + 1]
    finally:
        registry.close()
        kill_engines([spec.id])


def _cfg(tmp: Path, engine_dir: Path, **kw: int) -> PoolManagerConfig:
    return PoolManagerConfig(
        state_dir=engine_dir / "state", llama_server=str(engine_dir / "llama-server"), health_check_interval_ms=50,
        stop_grace_ms=1000, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_crashing_pool_backs_off_doubling_then_a_restart_storm_opens_the_breaker(
    sqlite_url: str, engine_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(
        tmp_path, engine_dir, backoff_initial_ms=1000, backoff_max_ms=60_000, restart_rate_limit=3,
        restart_window_secs=60, circuit_breaker_threshold=100, circuit_breaker_timeout_secs=300,
    )  # fmt: skip
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="poolmgr.pool"):
        # (the breaker's line is logged right after its row commits: wait for both)
        logged = lambda: any("circuit breaker open" in r.getMessage() for r in caplog.records)  # noqa: E731
        events = _run(cfg, sqlite_url, clock, PoolSpec(id="crashy", model=str(engine_dir / "crashy.gguf")),
                      until="open_breaker", also=logged)  # fmt: skip
    # What needs a person is critical: the storm and the breaker it opened; plain crashes are not.
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert critical == ["pool crashy: restart storm: 3 restarts in 60s", "pool crashy circuit breaker open: "
                        "restart storm: 3 restarts in 60s"]  # fmt: skip
    (opened_line,) = [r for r in caplog.records if "circuit breaker open" in r.getMessage()]
    assert vars(opened_line)["to_state"] == "breaker-open" and vars(opened_line)["from_state"] == "crashed"
    backoffs = [e.backoff_ms for e in events if e.trigger == "back_off"]
    assert len(backoffs) == 3
    for got, base in zip(backoffs, (1000, 2000, 4000), strict=True):
        assert got is not None and base * 0.9 <= got <= base * 1.1
    # Each engine dies of SIGSEGV 1.5 s after it is ready; on a loaded machine that can still fall inside
    # poolmgr's preload bookkeeping, which records it as a failed preload rather than a crash.
    failures = [e for e in events if e.kind in ("crashed", "preload_failed")]
    assert len(failures) == 4 and all(e.reason == "signal" for e in failures)
    assert all(e.signal == 11 for e in failures if e.kind == "crashed")
    assert [e.restart_count for e in events if e.trigger == "retry"] == [1, 2, 3]
    storm = [e for e in events if e.kind == "restart_storm"]
    assert len(storm) == 1 and storm[0].detail == {"restarts_in_window": 3}
    opened = [e for e in events if e.trigger == "open_breaker"]
    assert len(opened) == 1 and "restart storm: 3 restarts in 60s" in (opened[0].reason or "")


def test_restarts_spread_beyond_the_window_are_not_a_storm(sqlite_url: str, engine_dir: Path, tmp_path: Path) -> None:
    # At least 18 s apart (backoff 20 s ± 10 %, capped) with a 15 s window: one restart per window at most.
    cfg = _cfg(
        tmp_path, engine_dir, backoff_initial_ms=20_000, backoff_max_ms=20_000, restart_rate_limit=2,
        restart_window_secs=15, circuit_breaker_threshold=100, circuit_breaker_timeout_secs=300,
    )  # fmt: skip
    events = _run(cfg, sqlite_url, FakeClock(), PoolSpec(id="spread", model=str(engine_dir / "crashy.gguf")),
                  until="retry", times=4)  # fmt: skip
    assert not [e for e in events if e.kind == "restart_storm" or e.trigger == "open_breaker"]
    assert [e.restart_count for e in events if e.trigger == "retry"] == [1, 2, 3, 4]


def test_a_zero_ms_backoff_records_crash_back_off_and_retry_in_one_transaction(
    sqlite_url: str, engine_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19: with a 0 ms backoff the restart path commits crash → back_off → retry once (three audit rows),
    not three times; a crash that makes a storm stops the chain at the crash and opens the breaker as before."""
    commits: list[tuple[str | None, ...]] = []
    apply = Registry.apply

    def recording(self: Registry, pool_id: str, *args: Any, **kw: Any) -> PoolView:
        last = self.events(pool_id=pool_id, limit=1)
        view = apply(self, pool_id, *args, **kw)
        commits.append(tuple(e.trigger for e in self.events(pool_id=pool_id, after_id=last[-1].id if last else 0)))
        return view

    monkeypatch.setattr(Registry, "apply", recording)
    cfg = _cfg(
        tmp_path, engine_dir, backoff_initial_ms=0, backoff_max_ms=0, restart_rate_limit=2,
        restart_window_secs=60, circuit_breaker_threshold=100, circuit_breaker_timeout_secs=300,
    )  # fmt: skip
    events = _run(cfg, sqlite_url, FakeClock(), PoolSpec(id="zero", model=str(engine_dir / "crashy.gguf")),
                  until="open_breaker")  # fmt: skip
    crashes = [c for c in commits if "crash" in c]
    assert crashes[:2] == [("crash", "back_off", "retry")] * 2, commits
    assert crashes[2] == ("crash",), commits  # the third restart would be a storm: the breaker, after the commit
    assert [e.restart_count for e in events if e.trigger == "retry"] == [1, 2]
    assert [e.backoff_ms for e in events if e.trigger == "back_off"] == [0, 0]
    assert [e.trigger for e in events][-1] == "open_breaker"
    assert any(e.kind == "restart_storm" for e in events)
