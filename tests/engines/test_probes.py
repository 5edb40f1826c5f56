"""Readiness, slots and version probes over real HTTP, against the fake engine and plain sockets."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from poolmgr.engines import HealthStatus, LlamaCppAdapter
from poolmgr.errors import EngineError

from ._support import Engines, fake_argv, fake_env, free_port

ADAPTER = LlamaCppAdapter()


async def _ready_url(engines: Engines, argv: list[str], env: dict[str, str]) -> str:
    engine = engines.spawn(argv, env)
    port = await engines.launcher.wait_listen_port(
        engine.log_path, engine.log_offset, time.monotonic() + 10, pid=engine.pid, start_time=engine.start_time
    )
    assert port is not None, engines.log_text(engine)
    return f"http://127.0.0.1:{port}"


def test_health_is_loading_while_the_model_loads_then_ok(engines: Engines, fake_model: Path) -> None:
    port = free_port()

    async def scenario() -> list[HealthStatus]:
        engines.spawn(fake_argv(fake_model, port=port), fake_env(FAKE_ENGINE_LOAD_MS="600"))
        seen: list[HealthStatus] = []
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                result = await ADAPTER.probe_health(client, f"http://127.0.0.1:{port}", 1.0)
                if not seen or seen[-1] is not result.status:
                    seen.append(result.status)
                if result.status is HealthStatus.LOADING:
                    assert result.http_status == 503 and result.text == "Loading model"
                if result.ok:
                    break
                await asyncio.sleep(0.01)
        return seen

    seen = asyncio.run(scenario())
    assert HealthStatus.LOADING in seen
    assert seen[-1] is HealthStatus.OK
    assert seen.index(HealthStatus.LOADING) < seen.index(HealthStatus.OK)


def test_slots_count_free_slots_and_version_comes_from_props(engines: Engines, fake_model: Path) -> None:
    async def scenario() -> tuple[tuple[int, int], tuple[int, int], str]:
        base = await _ready_url(engines, fake_argv(fake_model, parallel=3), fake_env(FAKE_ENGINE_COMPLETION_MS="800"))
        async with httpx.AsyncClient() as client:
            idle = await ADAPTER.fetch_slots(client, base, 2.0)
            body = {"prompt": "hi", "n_predict": 4, "ignore_eos": True}
            busy_req = asyncio.create_task(client.post(f"{base}/completion", json=body))
            busy = idle
            deadline = time.monotonic() + 5
            while busy.free == idle.free and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                busy = await ADAPTER.fetch_slots(client, base, 2.0)
            resp = await busy_req
            assert resp.status_code == 200 and resp.json()["tokens_predicted"] == 4
            version = await ADAPTER.fetch_version(client, base, 2.0)
        return idle, busy, version

    idle, busy, version = asyncio.run(scenario())
    assert idle == (3, 3)
    assert busy == (3, 2)
    assert version == "b11434-fake"


def test_slots_endpoint_switched_off_is_an_engine_error(engines: Engines, fake_model: Path) -> None:
    async def scenario() -> None:
        base = await _ready_url(engines, fake_argv(fake_model, extra=("--no-slots",)), fake_env())
        async with httpx.AsyncClient() as client:
            await ADAPTER.fetch_slots(client, base, 2.0)

    with pytest.raises(EngineError, match="HTTP 501"):
        asyncio.run(scenario())


def test_nothing_listening_is_refused() -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient() as client:
            result = await ADAPTER.probe_health(client, f"http://127.0.0.1:{free_port()}", 1.0)
        assert result.status is HealthStatus.REFUSED and result.http_status is None
        assert "refused" in result.text

    asyncio.run(scenario())


def test_a_listener_that_never_answers_is_an_error_after_the_timeout() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)  # the kernel completes the handshake; nobody ever reads
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"

        async def scenario() -> None:
            async with httpx.AsyncClient() as client:
                started = time.monotonic()
                result = await ADAPTER.probe_health(client, base, 0.2)
                assert time.monotonic() - started < 2
            assert result.status is HealthStatus.ERROR
            assert "no answer within 0.2 s" in result.text

        asyncio.run(scenario())


def test_a_server_that_is_not_llama_server_is_an_error_with_its_status(engines: Engines, tmp_path: Path) -> None:
    port = free_port()
    engines.spawn([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], fake_env())

    async def scenario() -> None:
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + 10
            result = await ADAPTER.probe_health(client, f"http://127.0.0.1:{port}", 1.0)
            while result.status is HealthStatus.REFUSED and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                result = await ADAPTER.probe_health(client, f"http://127.0.0.1:{port}", 1.0)
            assert result.status is HealthStatus.ERROR
            assert result.http_status == 404 and result.text.startswith("HTTP 404")
            with pytest.raises(EngineError, match="HTTP 404"):
                await ADAPTER.fetch_version(client, f"http://127.0.0.1:{port}", 1.0)

    asyncio.run(scenario())
