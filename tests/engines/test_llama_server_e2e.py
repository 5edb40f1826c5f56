"""The real llama-server b11434 with a tiny real model, through the adapter and the launcher."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import pytest

from poolmgr.engines import (
    ExitInfo,
    HealthStatus,
    LaunchRequest,
    LlamaCppAdapter,
    ProcessLauncher,
    SpawnedEngine,
    StderrReason,
)
from poolmgr.engines._procfs import group_members
from poolmgr.errors import EngineError
from poolmgr.poolsfile import PoolSpec

from ._support import Engines, fake_env, free_port

pytestmark = pytest.mark.e2e
ADAPTER = LlamaCppAdapter()


def _spawn(
    engines: Engines, binary: Path, model: Path, *, port: int = 0, slots: int = 2, extra: tuple[str, ...] = ()
) -> SpawnedEngine:
    spec = PoolSpec(id="e2e", model=str(model), slots=slots, ctx_size=512, extra_args=extra)
    argv = ADAPTER.command(spec, binary=binary, model_path=model, port=port)
    return engines.spawn(argv, fake_env())


async def _port(launcher: ProcessLauncher, engine: SpawnedEngine) -> int | None:
    return await launcher.wait_listen_port(
        engine.log_path, engine.log_offset, time.monotonic() + 30, pid=engine.pid, start_time=engine.start_time
    )


def test_real_engine_serves_reports_slots_and_version_and_stops_cleanly(
    engines: Engines, llama_server_binary: Path, tiny_gguf: Path
) -> None:
    async def scenario() -> ExitInfo:
        engine = _spawn(engines, llama_server_binary, tiny_gguf, slots=2)
        port = await _port(engines.launcher, engine)
        assert port is not None, engines.log_text(engine)
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient() as client:
            health = await ADAPTER.probe_health(client, base, 5.0)
            assert health.status is HealthStatus.OK, health
            assert await ADAPTER.fetch_slots(client, base, 5.0) == (2, 2)
            assert (await ADAPTER.fetch_version(client, base, 5.0)).startswith("b11434")
            body = {"prompt": "hello", "n_predict": 8, "ignore_eos": True}
            resp = await client.post(f"{base}/completion", json=body, timeout=30)
            assert resp.status_code == 200 and resp.json()["tokens_predicted"] == 8
            metrics = (await client.get(f"{base}/metrics", timeout=5)).text
            assert "llamacpp:tokens_predicted_total 8" in metrics
        assert ADAPTER.classify_stderr(engines.log_text(engine), expect_gpu=False) is None
        info = await engines.launcher.stop(engine.pid, engine.start_time, grace_s=5)
        assert group_members(engine.pid) == []  # nothing of the engine is left
        return info

    assert asyncio.run(scenario()) == ExitInfo(code=0)


@pytest.fixture(scope="module")
def slower_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~135 MB: the tiny model loads in a few ms, too fast to see its 503 phase reliably on a busy machine."""
    from poolmgr.engines.tiny_model import write_tiny_model

    return write_tiny_model(
        tmp_path_factory.mktemp("model") / "slower.gguf", n_embd=512, n_layer=8, n_head=8, n_head_kv=4, n_ff=2048
    )


def test_real_engine_answers_503_loading_before_200_on_a_fixed_port(
    engines: Engines, llama_server_binary: Path, slower_gguf: Path
) -> None:
    port = free_port()

    async def scenario() -> list[HealthStatus]:
        engine = _spawn(engines, llama_server_binary, slower_gguf, port=port)
        seen: list[HealthStatus] = []
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status = (await ADAPTER.probe_health(client, f"http://127.0.0.1:{port}", 2.0)).status
                if not seen or seen[-1] is not status:
                    seen.append(status)
                if status is HealthStatus.OK:
                    break
                await asyncio.sleep(0.002)
        await engines.launcher.stop(engine.pid, engine.start_time, grace_s=5)
        return seen

    seen = asyncio.run(scenario())
    assert seen[-1] is HealthStatus.OK
    assert HealthStatus.LOADING in seen, seen
    assert HealthStatus.ERROR not in seen


def _failure(
    engines: Engines, binary: Path, model: Path, *, port: int = 0, extra: tuple[str, ...] = ()
) -> tuple[ExitInfo, str]:
    async def scenario() -> tuple[ExitInfo, str]:
        engine = _spawn(engines, binary, model, port=port, extra=extra)
        assert await _port(engines.launcher, engine) is None
        info = await engines.launcher.wait_exit(engine.pid, engine.start_time)
        return info, engines.log_text(engine)

    return asyncio.run(scenario())


def test_real_engine_with_a_missing_model_exits_1_with_a_model_missing_verdict(
    engines: Engines, llama_server_binary: Path, tmp_path: Path
) -> None:
    info, log = _failure(engines, llama_server_binary, tmp_path / "absent.gguf")
    verdict = ADAPTER.classify_stderr(log, expect_gpu=False)
    assert info == ExitInfo(code=1)
    assert verdict is not None and verdict.reason is StderrReason.MODEL_MISSING
    assert "absent.gguf" in verdict.message


def test_real_engine_with_a_corrupt_model_exits_1_with_a_model_corrupt_verdict(
    engines: Engines, llama_server_binary: Path, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"NOTAGGUF" + b"\0" * 4096)
    info, log = _failure(engines, llama_server_binary, corrupt)
    verdict = ADAPTER.classify_stderr(log, expect_gpu=False)
    assert info == ExitInfo(code=1)
    assert verdict is not None and verdict.reason is StderrReason.MODEL_CORRUPT
    assert "invalid magic characters" in verdict.message


def test_real_engine_on_a_taken_port_exits_1_with_a_port_in_use_verdict(
    engines: Engines, llama_server_binary: Path, tiny_gguf: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        info, log = _failure(engines, llama_server_binary, tiny_gguf, port=taken.getsockname()[1])
    verdict = ADAPTER.classify_stderr(log, expect_gpu=False)
    assert info == ExitInfo(code=1)
    assert verdict is not None and verdict.reason is StderrReason.PORT_IN_USE


def test_real_engine_refuses_an_unknown_flag_with_a_bad_argument_verdict(
    engines: Engines, llama_server_binary: Path, tiny_gguf: Path
) -> None:
    info, log = _failure(engines, llama_server_binary, tiny_gguf, extra=("--no-such-flag",))
    verdict = ADAPTER.classify_stderr(log, expect_gpu=False)
    assert info == ExitInfo(code=1)
    assert verdict is not None and verdict.reason is StderrReason.BAD_ARGUMENT
    assert verdict.message == "error: invalid argument: --no-such-flag"


def test_a_missing_binary_fails_at_spawn(engines: Engines, tiny_gguf: Path, tmp_path: Path) -> None:
    spec = PoolSpec(id="e2e", model=str(tiny_gguf))
    argv = ADAPTER.command(spec, binary=tmp_path / "no-llama-server", model_path=tiny_gguf)
    req = LaunchRequest(argv=argv, env=fake_env(), log_path=tmp_path / "e2e.log")
    with pytest.raises(EngineError, match=r"cannot start .*no-llama-server: No such file or directory"):
        engines.launcher.spawn(req)
