"""Per-pool engine logs: size-based rotation (keep 3) before each spawn, secrets kept out of the header."""

from __future__ import annotations

import asyncio
from pathlib import Path

from poolmgr.engines import LaunchRequest, rotate_log
from poolmgr.engines._logs import redact_argv

from ._support import Engines, fake_argv, fake_env


def test_log_rotates_when_it_reached_the_size_and_keeps_three(tmp_path: Path) -> None:
    log = tmp_path / "pool.log"
    generations = []
    for n in range(5):
        log.write_text(f"run {n}\n" * 20)
        generations.append(log.read_text())
        assert rotate_log(log, max_bytes=100, keep=3)
        assert not log.exists()
    assert Path(f"{log}.1").read_text() == generations[4]
    assert Path(f"{log}.2").read_text() == generations[3]
    assert Path(f"{log}.3").read_text() == generations[2]
    assert not Path(f"{log}.4").exists()


def test_small_or_missing_log_is_not_rotated(tmp_path: Path) -> None:
    log = tmp_path / "pool.log"
    assert not rotate_log(log, max_bytes=100)
    log.write_text("short\n")
    assert not rotate_log(log, max_bytes=100)
    assert log.read_text() == "short\n" and not Path(f"{log}.1").exists()


def test_spawn_rotates_the_pool_log_first_and_appends_otherwise(engines: Engines, fake_model: Path, sock: Path) -> None:
    log = engines.tmp_path / "pool.log"
    log.write_text("old run\n" * 400)

    def spawn() -> None:
        req = LaunchRequest(
            argv=fake_argv(fake_model, sock), env=fake_env(FAKE_ENGINE_MODE="exit"), log_path=log, log_max_bytes=2000
        )
        engine = engines.launcher.spawn(req)
        engines.spawned.append(engine)
        asyncio.run(engines.launcher.wait_exit(engine.pid, engine.start_time))

    spawn()
    assert Path(f"{log}.1").read_text() == "old run\n" * 400
    first = log.read_text()
    assert first.startswith("--- poolmgr ") and "exiting with code 1" in first
    spawn()  # still small: appended to, not rotated
    assert log.read_text().startswith(first) and log.read_text().count("--- poolmgr ") == 2
    assert Path(f"{log}.1").read_text() == "old run\n" * 400


def test_secrets_never_reach_the_log_header(engines: Engines, fake_model: Path, sock: Path) -> None:
    argv = fake_argv(fake_model, sock, extra=("--api-key", "s3cret-token", "--api-key-file=/run/key"))
    engine = engines.spawn(argv, fake_env(FAKE_ENGINE_MODE="exit"))
    asyncio.run(engines.launcher.wait_exit(engine.pid, engine.start_time))
    text = engine.log_path.read_text()
    assert "s3cret-token" not in text
    assert "--api-key '***'" in text or "--api-key ***" in text
    assert redact_argv(["x", "--api-key", "k", "--api-key-file=/f", "--host", "/w/e.sock"]) == [
        "x",
        "--api-key",
        "***",
        "--api-key-file=***",
        "--host",
        "/w/e.sock",
    ]
