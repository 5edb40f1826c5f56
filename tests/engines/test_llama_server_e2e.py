"""The real llama-server b11434 with a tiny real model, through the adapter and the launcher, served on a unix
socket and talked to over it."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from poolmgr.engines import (
    ExitInfo,
    HealthStatus,
    LaunchRequest,
    LlamaCppAdapter,
    SpawnedEngine,
    StderrReason,
)
from poolmgr.engines._procfs import group_members
from poolmgr.errors import EngineError
from poolmgr.poolsfile import PoolSpec

from ._support import ENGINE_BASE, Engines, engine_client, fake_env, wait_healthy

pytestmark = pytest.mark.e2e
ADAPTER = LlamaCppAdapter()


def _spawn(
    engines: Engines,
    binary: Path,
    model: Path,
    sock: Path,
    *,
    slots: int = 2,
    extra: tuple[str, ...] = (),
    served_model_name: str | None = None,
) -> SpawnedEngine:
    spec = PoolSpec(
        id="e2e", model=str(model), slots=slots, ctx_size=512, extra_args=extra, served_model_name=served_model_name
    )
    argv = ADAPTER.command(spec, binary=binary, model_path=model, socket_path=sock)
    return engines.spawn(argv, fake_env())


def _listeners(pid: int) -> tuple[list[str], list[str]]:
    """(TCP addresses, unix socket paths) the process listens on, read from /proc."""
    inodes = set()
    for fd in os.scandir(f"/proc/{pid}/fd"):
        target = os.readlink(fd.path)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    tcp = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                tcp.append(fields[1])
    unix = []
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[6] in inodes and int(fields[3], 16) & 0x10000 and len(fields) > 7:  # __SO_ACCEPTCON: listening
            unix.append(fields[7])
    return tcp, unix


def test_real_engine_serves_on_its_socket_only_under_its_served_name_and_stops_cleanly(
    engines: Engines, llama_server_binary: Path, tiny_gguf: Path, sock: Path
) -> None:
    async def scenario() -> ExitInfo:
        engine = _spawn(engines, llama_server_binary, tiny_gguf, sock, slots=2, served_model_name="org/tiny-chat")
        await engines.wait_ready(engine, sock, timeout=30)
        assert _listeners(engine.pid) == ([], [str(sock)])  # the unix socket, and no TCP port at all
        async with engine_client(sock) as client:
            assert await ADAPTER.fetch_slots(client, ENGINE_BASE, 5.0) == (2, 2)
            assert (await ADAPTER.fetch_version(client, ENGINE_BASE, 5.0)).startswith("b11434")
            models = (await client.get("/v1/models", timeout=5)).json()
            assert [m["id"] for m in models["data"]] == ["org/tiny-chat"]
            body = {"prompt": "hello", "n_predict": 8, "ignore_eos": True}
            resp = await client.post("/completion", json=body, timeout=30)
            assert resp.status_code == 200 and resp.json()["tokens_predicted"] == 8
            metrics = (await client.get("/metrics", timeout=5)).text
            assert "llamacpp:tokens_predicted_total 8" in metrics
        log = engines.log_text(engine)
        assert f"listening on unix://{sock}" in log
        assert ADAPTER.classify_stderr(log, expect_gpu=False) is None
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


def test_real_engine_socket_answers_503_loading_before_200(
    engines: Engines, llama_server_binary: Path, slower_gguf: Path, sock: Path
) -> None:
    async def scenario() -> list[HealthStatus]:
        engine = _spawn(engines, llama_server_binary, slower_gguf, sock)
        seen = await wait_healthy(sock, time.monotonic() + 30, engine=engine, timeout=2.0)
        await engines.launcher.stop(engine.pid, engine.start_time, grace_s=5)
        return [result.status for result in seen]

    seen = asyncio.run(scenario())
    assert seen[-1] is HealthStatus.OK
    assert HealthStatus.LOADING in seen, seen  # the socket is bound before the model is loaded
    assert HealthStatus.ERROR not in seen


def _failure(
    engines: Engines, binary: Path, model: Path, sock: Path, *, extra: tuple[str, ...] = ()
) -> tuple[ExitInfo, str]:
    """Spawn, probe the socket as poolmgr does until the engine exits; it must never have been healthy."""

    async def scenario() -> tuple[ExitInfo, str]:
        engine = _spawn(engines, binary, model, sock, extra=extra)
        seen = await wait_healthy(sock, time.monotonic() + 30, engine=engine)
        assert seen[-1].status is HealthStatus.REFUSED and not any(r.ok for r in seen), seen
        info = await asyncio.wait_for(engines.launcher.wait_exit(engine.pid, engine.start_time), 30)
        return info, engines.log_text(engine)

    return asyncio.run(scenario())


def test_real_engine_with_a_missing_model_exits_1_with_a_model_missing_verdict(
    engines: Engines, llama_server_binary: Path, tmp_path: Path, sock: Path
) -> None:
    info, log = _failure(engines, llama_server_binary, tmp_path / "absent.gguf", sock)
    verdict = ADAPTER.classify_stderr(log, expect_gpu=False)
    assert info == ExitInfo(code=1)
    assert verdict is not None and verdict.reason is StderrReason.MODEL_MISSING
    assert "absent.gguf" in verdict.message


def test_real_engine_with_a_corrupt_model_exits_1_with_a_model_corrupt_verdict(
    engines: Engines, llama_server_binary: Path, tmp_path: Path, sock: Path
) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"NOTAGGUF" + b"\0" * 4096)
    info, log = _failure(engines, llama_server_binary, corrupt, sock)
    verdict = ADAPTER.classify_stderr(log, expect_gpu=False)
    assert info == ExitInfo(code=1)
    assert verdict is not None and verdict.reason is StderrReason.MODEL_CORRUPT
    assert "invalid magic characters" in verdict.message


def test_real_engine_leaves_its_socket_behind_and_the_next_one_cannot_bind_over_it(
    engines: Engines, llama_server_binary: Path, tiny_gguf: Path, sock: Path
) -> None:
    # Why poolmgr unlinks the pool's socket before each spawn: measured, llama-server does not remove it at exit.
    async def scenario() -> None:
        first = _spawn(engines, llama_server_binary, tiny_gguf, sock)
        await engines.wait_ready(first, sock, timeout=30)
        assert await engines.launcher.stop(first.pid, first.start_time, grace_s=5) == ExitInfo(code=0)
        assert sock.is_socket()

    asyncio.run(scenario())
    info, log = _failure(engines, llama_server_binary, tiny_gguf, sock)
    verdict = ADAPTER.classify_stderr(log, expect_gpu=False)
    assert info == ExitInfo(code=1)
    assert verdict is not None and verdict.reason is StderrReason.PORT_IN_USE
    assert verdict.message == f"srv         start: couldn't bind HTTP server socket, hostname: {sock}, port: 8080"
    assert "exiting due to HTTP server error" in log

    async def after_unlink() -> ExitInfo:
        sock.unlink()
        third = _spawn(engines, llama_server_binary, tiny_gguf, sock)
        await engines.wait_ready(third, sock, timeout=30)
        return await engines.launcher.stop(third.pid, third.start_time, grace_s=5)

    assert asyncio.run(after_unlink()) == ExitInfo(code=0)


def test_real_engine_refuses_an_unknown_flag_with_a_bad_argument_verdict(
    engines: Engines, llama_server_binary: Path, tiny_gguf: Path, sock: Path
) -> None:
    info, log = _failure(engines, llama_server_binary, tiny_gguf, sock, extra=("--no-such-flag",))
    verdict = ADAPTER.classify_stderr(log, expect_gpu=False)
    assert info == ExitInfo(code=1)
    assert verdict is not None and verdict.reason is StderrReason.BAD_ARGUMENT
    assert verdict.message == "error: invalid argument: --no-such-flag"
    assert not sock.exists()  # refused before it bound anything


def test_a_missing_binary_fails_at_spawn(engines: Engines, tiny_gguf: Path, tmp_path: Path, sock: Path) -> None:
    spec = PoolSpec(id="e2e", model=str(tiny_gguf))
    argv = ADAPTER.command(spec, binary=tmp_path / "no-llama-server", model_path=tiny_gguf, socket_path=sock)
    req = LaunchRequest(argv=argv, env=fake_env(), log_path=tmp_path / "e2e.log")
    with pytest.raises(EngineError, match=r"cannot start .*no-llama-server: No such file or directory"):
        engines.launcher.spawn(req)
