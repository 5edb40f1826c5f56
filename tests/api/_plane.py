"""Test rigs for the data plane: poolmgr's DataPlane served by a real uvicorn on loopback (in a thread with its own
event loop, as the daemon serves it), and small fake engines on unix sockets for what a real llama-server cannot
be made to do on cue (echo the headers it got, stream at a set pace, say which engine answered)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from poolmgr.api.dataplane import DataPlane
from poolmgr.lifecycle.traffic import Mode, PoolTraffic, TrafficBoard


def simple_app() -> FastAPI:
    """A stand-in for the API: one public route and one admin route."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/pools")
    async def pools() -> list[str]:
        return ["admin"]

    return app


class Plane:
    """A DataPlane around `app` on 127.0.0.1:<free port>, served by uvicorn in a thread."""

    def __init__(self, app: Any, board: TrafficBoard, *, tls: dict[str, str] | None = None, **kw: Any) -> None:
        self.board = board
        self.plane = DataPlane(app, board=board, **kw)
        bound = socket.create_server(("127.0.0.1", 0))
        # As the daemon binds it: with the protocol set, asyncio turns on TCP_NODELAY for each connection.
        sock = socket.socket(bound.family, bound.type, socket.IPPROTO_TCP, fileno=bound.detach())
        self.port = sock.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.plane, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=1, **(tls or {})
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise AssertionError("uvicorn did not start")
            time.sleep(0.01)

    def _run(self, sock: socket.socket) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[sock])

        asyncio.run(main())

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the server's event loop (where the board lives) and return what it returned."""
        assert self.loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def set(self, pool_id: str, mode: Mode, reason: str, retry_after_s: int | None = None) -> None:
        self.call(lambda: self.board.get(pool_id).set(mode, reason, retry_after_s))

    def traffic(self, pool_id: str) -> PoolTraffic:
        return self.board.pools[pool_id]

    def close(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)


def open_board(socket_for: Callable[[str], str], *pools: str, queue_timeout_s: float = 5.0) -> TrafficBoard:
    board = TrafficBoard(queue_timeout_s=queue_timeout_s, socket_for=socket_for)
    for pool_id in pools:
        board.get(pool_id).set(Mode.OPEN, "ready")
    return board


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout} s")
        time.sleep(0.01)


# -- fake engines ---------------------------------------------------------------------------------------------
class FakeEngine:
    """An HTTP/1.1 server on a unix socket, in a thread of its own:

    - `/stream?n=N&gap_ms=G`: N server-sent events, G ms apart, chunked (as llama-server streams);
    - `/slow?ms=M`: answers after M ms;
    - anything else: echoes what it got — method, target, headers, body size — as JSON, and sends hop-by-hop
      headers of its own (which must not reach the client).

    Every answer says which engine sent it (`engine`); `requests` counts them; `closed` counts connections the
    client closed before the answer ended.
    """

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self.requests = 0
        self.closed = 0
        self.loop = asyncio.new_event_loop()
        started = concurrent.futures.Future[None]()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        started.result(5)

    def _run(self, started: concurrent.futures.Future[None]) -> None:
        asyncio.set_event_loop(self.loop)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.server = self.loop.run_until_complete(asyncio.start_unix_server(self._handle, str(self.path)))
        started.set_result(None)
        try:
            self.loop.run_forever()
        finally:
            self.server.close()
            self.loop.run_until_complete(self.server.wait_closed())
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.run_until_complete(asyncio.sleep(0.01))
            self.loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
            method, target, _ = line.split(" ", 2)
            headers = [(k.strip().lower(), v.strip()) for k, _, v in (h.partition(":") for h in header_lines)]
            body = await _read_body(reader, dict(headers))
            self.requests += 1
            if target.startswith("/stream"):
                await self._stream(writer, target)
            else:
                if target.startswith("/slow"):
                    await asyncio.sleep(int(_query(target).get("ms", "0")) / 1000)
                doc = {"engine": self.name, "method": method, "target": target, "headers": headers,
                       "body_bytes": len(body)}  # fmt: skip
                _answer(writer, 200, json.dumps(doc).encode())
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed += 1
        finally:
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter, target: str) -> None:
        query = _query(target)
        n, gap = int(query.get("n", "5")), int(query.get("gap_ms", "50")) / 1000
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(n):
            event = f"data: {json.dumps({'engine': self.name, 'i': i, 't': time.monotonic()})}\n\n".encode()
            writer.write(b"%x\r\n%b\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(gap)
        writer.write(b"0\r\n\r\n")

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def _query(target: str) -> dict[str, str]:
    _, _, query = target.partition("?")
    return dict(p.partition("=")[::2] for p in query.split("&") if p)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                return b"".join(parts)
            parts.append(data[:-2])
    return await reader.readexactly(int(headers.get("content-length", "0")))


def _answer(writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
    writer.write(
        b"HTTP/1.1 %d OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"keep-alive: timeout=5\r\nconnection: close, x-hop\r\nx-hop: 1\r\nproxy-authenticate: Basic\r\n"
        b"x-end-to-end: kept\r\n\r\n%b" % (status, len(body), body)
    )


@contextlib.contextmanager
def fake_engines(tmp: Path, *names: str) -> Iterator[dict[str, FakeEngine]]:
    engines = {name: FakeEngine(tmp / f"{name}.sock", name) for name in names}
    try:
        yield engines
    finally:
        for engine in engines.values():
            engine.close()


__all__ = ["FakeEngine", "Plane", "fake_engines", "open_board", "simple_app", "wait_until"]
