"""Helpers for the engines tests: the fake engine program, a launcher box that leaves nothing behind, readiness
over an engine's unix socket, the recorded stderr of the real llama-server (tests/fixtures/engines)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from poolmgr.engines import HealthResult, LaunchRequest, LlamaCppAdapter, ProcessLauncher, SpawnedEngine
from poolmgr.engines._procfs import group_members, is_alive, read_stat

TESTS = Path(__file__).resolve().parents[1]
FAKE_ENGINE = TESTS / "fake_engine.py"
FIXTURES = TESTS / "fixtures" / "engines"
CPU_FIXTURES = FIXTURES / "llama-server-b11434-cpu"
CUDA_FIXTURES = FIXTURES / "h200-llama-server-b11434-cuda"


ENGINE_BASE = "http://engine"  # the Host of requests over an engine's socket, as poolmgr sends them
SUN_PATH_MAX = 107  # bytes of a unix socket path (sun_path is 108 with its NUL)


def fake_argv(model: Path | str, sock: Path, *, parallel: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    """The fake engine serving on the unix socket `sock`, as poolmgr runs engines."""
    return [
        sys.executable,
        str(FAKE_ENGINE),
        "--model",
        str(model),
        "--host",
        str(sock),
        "--parallel",
        str(parallel),
        "--ctx-size",
        "512",
        "--metrics",
        "--no-webui",
        "--n-gpu-layers",
        "0",
        *extra,
    ]


def fake_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_ENGINE_")}
    env.update(overrides)
    return env


class Engines:
    """Spawns through one real ProcessLauncher and kills every group it started when the test ends."""

    def __init__(self, tmp_path: Path) -> None:
        self.launcher = ProcessLauncher()
        self.tmp_path = tmp_path
        self.spawned: list[SpawnedEngine] = []

    def spawn(self, argv: list[str], env: dict[str, str] | None = None, *, log: str = "engine.log") -> SpawnedEngine:
        req = LaunchRequest(argv=argv, env=env or fake_env(), log_path=self.tmp_path / log, cwd=self.tmp_path)
        engine = self.launcher.spawn(req)
        self.spawned.append(engine)
        return engine

    def log_text(self, engine: SpawnedEngine) -> str:
        return engine.log_path.read_bytes()[engine.log_offset :].decode("utf-8", "replace")

    async def wait_ready(self, engine: SpawnedEngine, sock: Path, timeout: float = 10.0) -> None:
        """Until the engine answers /health 200 on `sock` (fails the test with its log if it never does)."""
        seen = await wait_healthy(sock, time.monotonic() + timeout, engine=engine)
        assert seen[-1].ok, f"{[str(r.status) for r in seen]}\n{self.log_text(engine)}"

    def cleanup(self) -> None:
        self.launcher.close()
        for engine in self.spawned:
            stat = read_stat(engine.pid)
            if stat is not None and stat.start_time != engine.start_time:
                continue
            for member in group_members(engine.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(engine.pid, 0)  # reap our killed child (ECHILD when the launcher already did)


def engine_client(sock: Path) -> httpx.AsyncClient:
    """An HTTP client over an engine's unix socket, built as poolmgr builds its own; requests go to ENGINE_BASE."""
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    return httpx.AsyncClient(transport=transport, base_url=ENGINE_BASE, trust_env=False)


async def wait_healthy(
    sock: Path, deadline: float, *, engine: SpawnedEngine | None = None, timeout: float = 1.0
) -> list[HealthResult]:
    """Probe /health over `sock` every 2 ms until it answers 200, until `deadline` (time.monotonic()) or, given
    the `engine`, until it has exited. Returns each result whose status differs from the one before, in order:
    the last is where it ended (`.ok` when ready)."""
    adapter = LlamaCppAdapter()
    seen: list[HealthResult] = []
    async with engine_client(sock) as client:
        while True:
            gone = engine is not None and not is_alive(engine.pid, engine.start_time)
            result = await adapter.probe_health(client, ENGINE_BASE, timeout)
            if not seen or seen[-1].status is not result.status:
                seen.append(result)
            if result.ok or gone or time.monotonic() >= deadline:
                return seen
            await asyncio.sleep(0.002)


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
