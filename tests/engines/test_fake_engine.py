"""The fake engine stays honest: each failure it models yields the same verdict, from the same decisive line, as
the real llama-server's recorded stderr."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from poolmgr.engines import ExitInfo, StderrReason, classify_stderr

from ._support import CPU_FIXTURES, CUDA_FIXTURES, Engines, fake_argv, fake_env


def _run_to_exit(engines: Engines, argv: list[str], env: dict[str, str]) -> tuple[ExitInfo, str]:
    async def scenario() -> ExitInfo:
        engine = engines.spawn(argv, env)
        return await asyncio.wait_for(engines.launcher.wait_exit(engine.pid, engine.start_time), 20)

    info = asyncio.run(scenario())
    return info, engines.log_text(engines.spawned[-1])


def _decisive(text: str) -> str:
    verdict = classify_stderr(text)
    assert verdict is not None
    return verdict.message


@pytest.mark.parametrize(
    ("content", "fixture", "reason"),
    [
        (None, "missing-stderr.txt", StderrReason.MODEL_MISSING),
        (b"", "empty-stderr.txt", StderrReason.MODEL_CORRUPT),
        (b"XXXXjunkjunkjunkjunk", "bad-magic-stderr.txt", StderrReason.MODEL_CORRUPT),
        (b"GGUF\x03\x00\x00\x00", "truncated-header-stderr.txt", StderrReason.MODEL_CORRUPT),
    ],
)
def test_fake_model_failures_match_the_real_engine(
    engines: Engines, tmp_path: Path, content: bytes | None, fixture: str, reason: StderrReason, sock: Path
) -> None:
    model = tmp_path / "m.gguf"
    if content is not None:
        model.write_bytes(content)
    info, log = _run_to_exit(engines, fake_argv(model, sock), fake_env())
    real = (CPU_FIXTURES / fixture).read_text()
    verdict, real_verdict = classify_stderr(log), classify_stderr(real)
    assert info == ExitInfo(code=1)
    assert verdict is not None and real_verdict is not None
    assert verdict.reason is real_verdict.reason is reason
    # The same words, up to the model's path.
    assert verdict.message.split("'")[0] == real_verdict.message.split("'")[0]
    assert log.rstrip().endswith("exiting due to model loading error")


def test_fake_vram_oom_told_by_the_model_file_matches_the_h200_recording(
    engines: Engines, tmp_path: Path, sock: Path
) -> None:
    model = tmp_path / "oom.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 28 + b"\nfake-engine-mode: oom\n")
    info, log = _run_to_exit(engines, fake_argv(model, sock), fake_env())
    assert info == ExitInfo(code=1)
    assert _decisive(log) == _decisive((CUDA_FIXTURES / "oom-stderr.txt").read_text())


def test_fake_leaves_its_socket_behind_and_cannot_bind_over_it_like_the_real_engine(
    engines: Engines, fake_model: Path, sock: Path
) -> None:
    # The real one: test_llama_server_e2e.py (exit 0 leaving the socket; then exit 1, "couldn't bind", port 8080).
    async def first_run() -> ExitInfo:
        engine = engines.spawn(fake_argv(fake_model, sock), fake_env())
        await engines.wait_ready(engine, sock)
        return await engines.launcher.stop(engine.pid, engine.start_time, grace_s=5)

    assert asyncio.run(first_run()) == ExitInfo(code=0)
    assert sock.is_socket()
    info, log = _run_to_exit(engines, fake_argv(fake_model, sock), fake_env())
    verdict = classify_stderr(log)
    real = classify_stderr((CPU_FIXTURES / "port-clash-stderr.txt").read_text())
    assert info == ExitInfo(code=1)
    assert verdict is not None and real is not None
    assert verdict.reason is real.reason is StderrReason.PORT_IN_USE
    assert verdict.message == f"srv         start: couldn't bind HTTP server socket, hostname: {sock}, port: 8080"
    assert verdict.message.split(", hostname:")[0] == real.message.split(", hostname:")[0]
    assert log.rstrip().endswith("exiting due to HTTP server error")


def test_fake_with_strict_flags_refuses_an_unknown_flag_like_the_real_engine(
    engines: Engines, fake_model: Path, sock: Path
) -> None:
    argv = fake_argv(fake_model, sock, extra=("--bogus",))
    info, log = _run_to_exit(engines, argv, fake_env(FAKE_ENGINE_STRICT_FLAGS="1"))
    assert info == ExitInfo(code=1)
    assert _decisive(log) == _decisive((CPU_FIXTURES / "bad-flag-stderr.txt").read_text())


def test_fake_spillover_warns_like_the_cuda_build_and_still_serves(
    engines: Engines, fake_model: Path, sock: Path
) -> None:
    async def scenario() -> str:
        engine = engines.spawn(fake_argv(fake_model, sock), fake_env(FAKE_ENGINE_MODE="spillover"))
        await engines.wait_ready(engine, sock)  # nothing failed: poolmgr must catch it from the log
        log = engines.log_text(engine)
        await engines.launcher.stop(engine.pid, engine.start_time, grace_s=5)
        return log

    log = asyncio.run(scenario())
    verdict = classify_stderr(log)
    real = classify_stderr((CUDA_FIXTURES / "no-gpu-visible-stderr.txt").read_text())
    assert verdict is not None and real is not None
    assert verdict.reason is real.reason is StderrReason.CPU_SPILLOVER
    assert verdict.message == real.message
