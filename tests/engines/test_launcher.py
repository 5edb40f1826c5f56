"""The process launcher with the fake engine program: spawn, exit seen at once, stop TERM → KILL of the whole
group, adopted (non-child) engines, and never a signal to a pid that now belongs to another program."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from poolmgr.engines import ExitInfo, LaunchRequest, ProcessLauncher, SpawnedEngine
from poolmgr.engines._procfs import read_stat
from poolmgr.errors import EngineError

from ._support import Engines, fake_argv, fake_env, wait_healthy, wait_until


def _gone(pid: int) -> bool:
    stat = read_stat(pid)
    return stat is None or stat.is_zombie


def test_engine_runs_in_its_own_session_with_its_output_in_the_pool_log(
    engines: Engines, fake_model: Path, sock: Path
) -> None:
    async def scenario() -> ExitInfo:
        engine = engines.spawn(fake_argv(fake_model, sock))
        stat = read_stat(engine.pid)
        assert stat is not None
        assert stat.session == engine.pid and stat.pgrp == engine.pid  # own session: outlives poolmgr
        assert stat.start_time == engine.start_time == engines.launcher.read_start_time(engine.pid)
        assert os.readlink(f"/proc/{engine.pid}/fd/0") == "/dev/null"
        await engines.wait_ready(engine, sock)
        assert engines.launcher.is_alive(engine.pid, engine.start_time)
        return await engines.launcher.stop(engine.pid, engine.start_time, grace_s=5)

    info = asyncio.run(scenario())
    engine = engines.spawned[0]
    log = engine.log_path.read_text()
    assert log.startswith("--- poolmgr ") and "spawn " in log[: engine.log_offset]
    assert f"listening on unix://{sock}" in log[engine.log_offset :]
    assert info == ExitInfo(code=0, signal=None, host_oom=False)  # SIGTERM when ready: a clean exit 0
    assert not engines.launcher.is_alive(engine.pid, engine.start_time)
    assert read_stat(engine.pid) is None  # reaped: no zombie


def test_exit_is_seen_at_once_after_a_kill(engines: Engines, fake_model: Path, sock: Path) -> None:
    async def scenario() -> tuple[ExitInfo, float]:
        engine = engines.spawn(fake_argv(fake_model, sock))
        await engines.wait_ready(engine, sock)
        waiter = asyncio.create_task(engines.launcher.wait_exit(engine.pid, engine.start_time))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        killed_at = time.monotonic()
        os.kill(engine.pid, signal.SIGKILL)
        info = await waiter
        return info, time.monotonic() - killed_at

    info, seen_after = asyncio.run(scenario())
    assert seen_after < 0.1, f"exit seen {seen_after * 1000:.0f} ms after the kill"
    assert info.signal == signal.SIGKILL and info.code is None
    assert info.host_oom is False  # a plain kill, not the OOM killer
    assert info.describe() == "killed by signal SIGKILL"


def test_exit_code_of_an_engine_that_exits_is_reported(engines: Engines, fake_model: Path, sock: Path) -> None:
    async def scenario() -> ExitInfo:
        engine = engines.spawn(
            fake_argv(fake_model, sock), fake_env(FAKE_ENGINE_MODE="exit", FAKE_ENGINE_EXIT_CODE="7")
        )
        return await engines.launcher.wait_exit(engine.pid, engine.start_time)

    info = asyncio.run(scenario())
    assert info == ExitInfo(code=7, signal=None, host_oom=False)
    assert info.describe() == "exited with code 7"


def test_a_crash_reports_the_signal(engines: Engines, fake_model: Path, sock: Path) -> None:
    env = fake_env(FAKE_ENGINE_MODE="crash_after", FAKE_ENGINE_CRASH_AFTER_MS="50")

    async def scenario() -> ExitInfo:
        engine = engines.spawn(fake_argv(fake_model, sock), env)
        return await engines.launcher.wait_exit(engine.pid, engine.start_time)

    info = asyncio.run(scenario())
    assert info.signal == signal.SIGSEGV and info.code is None and not info.host_oom


def test_an_exited_child_is_reaped_even_when_nobody_waits(engines: Engines, fake_model: Path, sock: Path) -> None:
    async def scenario() -> tuple[SpawnedEngine, bool]:
        engine = engines.spawn(
            fake_argv(fake_model, sock), fake_env(FAKE_ENGINE_MODE="exit", FAKE_ENGINE_EXIT_CODE="3")
        )
        deadline = time.monotonic() + 5
        while read_stat(engine.pid) is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return engine, read_stat(engine.pid) is None

    engine, reaped = asyncio.run(scenario())
    assert reaped, "the exited engine stayed a zombie"

    # The exit status was kept for whoever asks later, from a later event loop too.
    async def later() -> ExitInfo:
        return await engines.launcher.wait_exit(engine.pid, engine.start_time)

    assert asyncio.run(later()).code == 3


def test_an_engine_spawned_outside_an_event_loop_is_watched_later(
    engines: Engines, fake_model: Path, sock: Path
) -> None:
    engine = engines.spawn(fake_argv(fake_model, sock), fake_env(FAKE_ENGINE_MODE="exit", FAKE_ENGINE_EXIT_CODE="5"))

    async def scenario() -> ExitInfo:
        return await engines.launcher.wait_exit(engine.pid, engine.start_time)

    assert asyncio.run(scenario()).code == 5
    assert read_stat(engine.pid) is None


def _spawn_orphan(tmp_path: Path, argv: list[str], env: dict[str, str]) -> tuple[int, int, Path]:
    """Start an engine through an intermediate process that exits at once: the engine is not our child."""
    log = tmp_path / "orphan.log"
    code = (
        "import subprocess, sys, json\n"
        f"log = open({str(log)!r}, 'ab')\n"
        "p = subprocess.Popen(json.loads(sys.argv[1]), stdin=subprocess.DEVNULL, stdout=log, stderr=log,"
        " start_new_session=True)\n"
        "print(p.pid)\n"
    )
    import json

    out = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], env=env, capture_output=True, check=True)
    pid = int(out.stdout)
    stat = read_stat(pid)
    assert stat is not None
    return pid, stat.start_time, log


def test_exit_of_an_adopted_engine_is_seen_at_once_through_its_pidfd(
    tmp_path: Path, fake_model: Path, engines: Engines, sock: Path
) -> None:
    pid, start, log = _spawn_orphan(tmp_path, fake_argv(fake_model, sock), fake_env())
    assert os.getpid() != _parent(pid)  # poolmgr is not its parent: what a restarted poolmgr finds
    launcher = ProcessLauncher()  # a fresh launcher: "after a poolmgr restart"

    async def scenario() -> tuple[ExitInfo, float]:
        assert (await wait_healthy(sock, time.monotonic() + 10))[-1].ok, log.read_text()
        assert launcher.is_alive(pid, start)
        waiter = asyncio.create_task(launcher.wait_exit(pid, start))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        info = await waiter
        return info, time.monotonic() - killed_at

    try:
        info, seen_after = asyncio.run(scenario())
    finally:
        launcher.close()
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)
    assert seen_after < 0.1, f"exit seen {seen_after * 1000:.0f} ms after the kill"
    assert info == ExitInfo(code=None, signal=None, host_oom=False)  # the status belongs to its parent
    assert info.describe().startswith("exited (status unknown")
    assert not launcher.is_alive(pid, start)


def test_an_adopted_engine_is_stopped_with_its_group(tmp_path: Path, fake_model: Path, sock: Path) -> None:
    env = fake_env(FAKE_ENGINE_GRANDCHILD="ignore_term")
    pid, start, log = _spawn_orphan(tmp_path, fake_argv(fake_model, sock), env)
    assert wait_until(lambda: "listening on" in log.read_text())
    grandchild = int(re.findall(r"grandchild pid (\d+)", log.read_text())[0])
    launcher = ProcessLauncher()
    try:
        info = asyncio.run(launcher.stop(pid, start, grace_s=0.5))
    finally:
        launcher.close()
    assert info.code is None and info.signal is None
    assert wait_until(lambda: _gone(pid) and _gone(grandchild), timeout=3)


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def test_a_live_pid_with_another_start_time_is_never_signalled(engines: Engines) -> None:
    # A program that got the engine's old pid: same number, different start time.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stat = read_stat(other.pid)
        assert stat is not None
        stale_start = stat.start_time - 1

        async def scenario() -> tuple[ExitInfo, ExitInfo, float]:
            started = time.monotonic()
            stopped = await engines.launcher.stop(other.pid, stale_start, grace_s=2)
            waited = await engines.launcher.wait_exit(other.pid, stale_start)
            return stopped, waited, time.monotonic() - started

        stopped, waited, took = asyncio.run(scenario())
        assert stopped == ExitInfo() and waited == ExitInfo()
        assert took < 1.0  # nothing to wait for: our engine is long gone
        assert not engines.launcher.is_alive(other.pid, stale_start)
        assert engines.launcher.is_alive(other.pid, stat.start_time)
        assert other.poll() is None  # never signalled: still running
    finally:
        other.kill()
        other.wait()


def test_stop_kills_a_grandchild_that_ignores_sigterm(engines: Engines, fake_model: Path, sock: Path) -> None:
    env = fake_env(FAKE_ENGINE_GRANDCHILD="ignore_term")

    async def scenario() -> tuple[ExitInfo, int]:
        engine = engines.spawn(fake_argv(fake_model, sock), env)
        await engines.wait_ready(engine, sock)
        grandchild = int(re.findall(r"grandchild pid (\d+)", engines.log_text(engine))[0])
        assert not _gone(grandchild)
        info = await engines.launcher.stop(engine.pid, engine.start_time, grace_s=0.3)
        return info, grandchild

    info, grandchild = asyncio.run(scenario())
    assert info.code == 0  # the engine itself obeyed SIGTERM
    assert _gone(grandchild), "the grandchild outlived stop()"


def test_stop_escalates_to_sigkill_when_the_engine_ignores_sigterm(
    engines: Engines, fake_model: Path, sock: Path
) -> None:
    async def scenario() -> tuple[ExitInfo, float]:
        engine = engines.spawn(fake_argv(fake_model, sock), fake_env(FAKE_ENGINE_IGNORE_TERM="1"))
        await engines.wait_ready(engine, sock)
        started = time.monotonic()
        info = await engines.launcher.stop(engine.pid, engine.start_time, grace_s=0.3)
        return info, time.monotonic() - started

    info, took = asyncio.run(scenario())
    assert info.signal == signal.SIGKILL and not info.host_oom  # our own SIGKILL is never "host OOM"
    assert 0.3 <= took < 2.0


def test_stop_without_grace_kills_at_once_with_no_sigterm_first(
    engines: Engines, fake_model: Path, sock: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hung engine is stopped with no grace: SIGKILL straight away (a SIGTERM first would only make the log say
    it was ignored), recorded as poolmgr's own kill, never as the host's OOM killer."""

    async def scenario() -> tuple[ExitInfo, float]:
        engine = engines.spawn(fake_argv(fake_model, sock), fake_env(FAKE_ENGINE_IGNORE_TERM="1"))
        await engines.wait_ready(engine, sock)
        started = time.monotonic()
        info = await engines.launcher.stop(engine.pid, engine.start_time, grace_s=0.0)
        return info, time.monotonic() - started

    with caplog.at_level(logging.WARNING):
        info, took = asyncio.run(scenario())
    assert info.signal == signal.SIGKILL and not info.host_oom
    assert took < 1.0
    assert not [r for r in caplog.records if "ignored SIGTERM" in r.getMessage()]


def test_sigterm_while_loading_kills_the_engine_by_the_signal(engines: Engines, fake_model: Path, sock: Path) -> None:
    async def scenario() -> ExitInfo:
        engine = engines.spawn(fake_argv(fake_model, sock), fake_env(FAKE_ENGINE_MODE="hang"))
        assert wait_until(lambda: "loading model" in engines.log_text(engine))
        return await engines.launcher.stop(engine.pid, engine.start_time, grace_s=5)

    assert asyncio.run(scenario()) == ExitInfo(code=None, signal=signal.SIGTERM)


def test_stopping_an_engine_that_already_exited_returns_its_exit(
    engines: Engines, fake_model: Path, sock: Path
) -> None:
    async def scenario() -> tuple[ExitInfo, ExitInfo]:
        engine = engines.spawn(
            fake_argv(fake_model, sock), fake_env(FAKE_ENGINE_MODE="exit", FAKE_ENGINE_EXIT_CODE="2")
        )
        first = await engines.launcher.wait_exit(engine.pid, engine.start_time)
        again = await engines.launcher.stop(engine.pid, engine.start_time, grace_s=1)
        return first, again

    first, again = asyncio.run(scenario())
    assert first == again == ExitInfo(code=2)


def test_a_missing_binary_is_an_engine_error_written_to_the_log(engines: Engines, sock: Path) -> None:
    with pytest.raises(EngineError, match="cannot start /nonexistent/llama-server: No such file or directory"):
        engines.spawn(["/nonexistent/llama-server", "--host", "/nonexistent/e.sock"])
    assert "spawn failed: No such file or directory" in (engines.tmp_path / "engine.log").read_text()


def test_wrap_rewrites_the_command_and_environment(engines: Engines, fake_model: Path, sock: Path) -> None:
    def wrap(argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        return ["/usr/bin/env", "WRAPPED_BY=test", *argv], {**env, "POOLMGR_POOL": "wrapped"}

    req = LaunchRequest(
        argv=fake_argv(fake_model, sock), env=fake_env(), log_path=engines.tmp_path / "w.log", wrap=wrap, pool_id="w"
    )
    engine = engines.launcher.spawn(req)
    engines.spawned.append(engine)
    assert wait_until(lambda: "listening on" in engines.log_text(engine))
    environ = Path(f"/proc/{engine.pid}/environ").read_bytes().split(b"\0")
    assert b"WRAPPED_BY=test" in environ and b"POOLMGR_POOL=wrapped" in environ
    assert engine.argv[:2] == ("/usr/bin/env", "WRAPPED_BY=test")
    assert asyncio.run(engines.launcher.stop(engine.pid, engine.start_time, grace_s=5)).code == 0
