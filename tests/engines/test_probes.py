"""Readiness, slots and version probes over real HTTP on an engine's unix socket, against the fake engine and
plain sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest

from poolmgr.engines import HealthResult, HealthStatus, LlamaCppAdapter
from poolmgr.errors import EngineError

from ._support import ENGINE_BASE, Engines, engine_client, fake_argv, fake_env, wait_healthy

ADAPTER = LlamaCppAdapter()


async def _ready(engines: Engines, argv: list[str], env: dict[str, str], sock: Path) -> httpx.AsyncClient:
    engine = engines.spawn(argv, env)
    await engines.wait_ready(engine, sock)
    return engine_client(sock)


def test_health_is_loading_while_the_model_loads_then_ok(engines: Engines, fake_model: Path, sock: Path) -> None:
    # 1.5 s of loading: seen even when a loaded machine starts the fake engine slowly (0.6 s was not, once)
    engine = engines.spawn(fake_argv(fake_model, sock), fake_env(FAKE_ENGINE_LOAD_MS="1500"))
    seen = asyncio.run(wait_healthy(sock, time.monotonic() + 10, engine=engine))
    statuses = [result.status for result in seen]
    assert HealthStatus.LOADING in statuses and statuses[-1] is HealthStatus.OK, statuses
    assert statuses.index(HealthStatus.LOADING) < statuses.index(HealthStatus.OK)
    loading = seen[statuses.index(HealthStatus.LOADING)]
    assert loading.http_status == 503 and loading.text == "Loading model"
    assert seen[-1].http_status == 200


def test_slots_count_free_slots_and_version_comes_from_props(engines: Engines, fake_model: Path, sock: Path) -> None:
    argv, env = fake_argv(fake_model, sock, parallel=3), fake_env(FAKE_ENGINE_COMPLETION_MS="800")

    async def scenario() -> tuple[tuple[int, int], tuple[int, int], str]:
        async with await _ready(engines, argv, env, sock) as client:
            idle = await ADAPTER.fetch_slots(client, ENGINE_BASE, 2.0)
            body = {"prompt": "hi", "n_predict": 4, "ignore_eos": True}
            busy_req = asyncio.create_task(client.post("/completion", json=body))
            busy = idle
            deadline = time.monotonic() + 5
            while busy.free == idle.free and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                busy = await ADAPTER.fetch_slots(client, ENGINE_BASE, 2.0)
            resp = await busy_req
            assert resp.status_code == 200 and resp.json()["tokens_predicted"] == 4
            version = await ADAPTER.fetch_version(client, ENGINE_BASE, 2.0)
        return idle, busy, version

    idle, busy, version = asyncio.run(scenario())
    assert idle == (3, 3)
    assert busy == (3, 2)
    assert version == "b11434-fake"


def test_slots_endpoint_switched_off_is_an_engine_error(engines: Engines, fake_model: Path, sock: Path) -> None:
    async def scenario() -> None:
        async with await _ready(engines, fake_argv(fake_model, sock, extra=("--no-slots",)), fake_env(), sock) as c:
            await ADAPTER.fetch_slots(c, ENGINE_BASE, 2.0)

    with pytest.raises(EngineError, match="HTTP 501"):
        asyncio.run(scenario())


def _probe(sock: Path, timeout: float = 1.0) -> HealthResult:
    async def scenario() -> HealthResult:
        async with engine_client(sock) as client:
            return await ADAPTER.probe_health(client, ENGINE_BASE, timeout)

    return asyncio.run(scenario())


def test_no_socket_file_yet_is_refused(sock: Path) -> None:
    # An engine not yet bound (or one whose socket poolmgr removed before a respawn).
    assert not sock.exists()
    result = _probe(sock)
    assert result.status is HealthStatus.REFUSED and result.http_status is None
    assert result.text.startswith("connection refused")


def test_a_socket_file_left_by_an_engine_that_exited_is_refused(sock: Path) -> None:
    with socket.socket(socket.AF_UNIX) as gone:
        gone.bind(str(sock))  # bound and closed: the file stays, nothing listens (what an engine leaves at exit)
    assert sock.is_socket()
    result = _probe(sock)
    assert result.status is HealthStatus.REFUSED and result.http_status is None
    assert result.text.startswith("connection refused")


def test_a_listener_that_never_answers_is_an_error_after_the_timeout(sock: Path) -> None:
    with socket.socket(socket.AF_UNIX) as silent:
        silent.bind(str(sock))
        silent.listen(8)  # connections are queued; nobody ever accepts or reads
        started = time.monotonic()
        result = _probe(sock, timeout=0.2)
        took = time.monotonic() - started
    assert took < 2
    assert result.status is HealthStatus.ERROR and result.http_status is None
    assert "no answer within 0.2 s" in result.text


class _NotFound(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"File not found"
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def other_server(sock: Path) -> Iterator[Path]:
    """Some other HTTP server on the engine's socket, answering 404 to everything."""
    server = socketserver.ThreadingUnixStreamServer(str(sock), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield sock
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()


def test_a_server_that_is_not_llama_server_is_an_error_with_its_status(other_server: Path) -> None:
    async def scenario() -> None:
        async with engine_client(other_server) as client:
            result = await ADAPTER.probe_health(client, ENGINE_BASE, 1.0)
            assert result.status is HealthStatus.ERROR
            assert result.http_status == 404 and result.text == "HTTP 404: File not found"
            with pytest.raises(EngineError, match="HTTP 404"):
                await ADAPTER.fetch_version(client, ENGINE_BASE, 1.0)

    asyncio.run(scenario())
