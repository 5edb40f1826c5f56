"""Helpers for the engines tests: the fake engine program, a launcher box that leaves nothing behind, the
recorded stderr of the real llama-server (tests/fixtures/engines)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from poolmgr.engines import LaunchRequest, ProcessLauncher, SpawnedEngine
from poolmgr.engines._procfs import group_members, read_stat

TESTS = Path(__file__).resolve().parents[1]
FAKE_ENGINE = TESTS / "fake_engine.py"
FIXTURES = TESTS / "fixtures" / "engines"
CPU_FIXTURES = FIXTURES / "llama-server-b11434-cpu"
CUDA_FIXTURES = FIXTURES / "h200-llama-server-b11434-cuda"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fake_argv(model: Path | str, *, port: int = 0, parallel: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        str(FAKE_ENGINE),
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
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


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
