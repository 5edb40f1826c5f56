"""Forwarding one request to a pool's engine: admitted by the pool's traffic gate, streamed both ways, recorded.

    proxy(call, traffic, request)
      admit (queue / refuse: 503)  ─►  ticket.run(forward)  ─►  record + one log line
                                         connect (502) ─► request up ─► answer down, piece by piece

- Request and answer bodies stream: nothing is buffered beyond one piece (SSE tokens reach the client as the
  engine writes them). Hop-by-hop headers (RFC 9110 §7.6.1, and those the Connection header names) are dropped
  both ways; the client's Authorization (poolmgr's token) never reaches the engine — the engine's own
  `--api-key`, if it has one, is sent instead; X-Correlation-Id is passed on and echoed.
- A client that goes away cancels the request: a watcher waits for the ASGI `http.disconnect` once the request
  body is read, and cancels the handler; closing the engine connection makes llama-server stop generating.
  Recorded as 499 (nginx's "client closed request").
- A drain past its deadline cuts the request (`Cut`): 503 if the answer has not started, else its body ends
  where it is (the client sees a stream without its end, e.g. no `data: [DONE]`). Recorded as 503, outcome cut.
- The status recorded is the outcome of the request: what the engine answered, or 499 / 502 / 503 as above.
  Time to first byte is the time to the first piece of the answer's body (for a stream: the first token).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import Message, Receive, Send

from poolmgr.api._upstream import EngineBroken, EngineUnreachable, Exchange, Headers
from poolmgr.lifecycle.traffic import Cut, PoolTraffic, Refused

log = logging.getLogger("poolmgr.proxy")

# Never forwarded, either way: hop-by-hop headers, and those poolmgr writes itself.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"proxy-connection",
    b"proxy-authenticate", b"proxy-authorization",
})  # fmt: skip
_NOT_UP = HOP_BY_HOP | {b"host", b"authorization", b"content-length", b"expect", b"x-correlation-id"}
_NOT_DOWN = HOP_BY_HOP | {b"date", b"server", b"x-correlation-id"}  # the API port writes its own Date and Server
CORRELATION_HEADER = b"x-correlation-id"

ErrorBody = Callable[[int, str, str], bytes]  # (status, message, kind) -> a JSON error body
_ENGINE_GONE_WAIT_S = 1.0  # how long an unreachable engine of an open pool may take to be seen gone


class ClientGone(Exception):
    """The client closed the connection before its request body was all read."""


@dataclass(slots=True)
class Call:
    """One proxied request, from its arrival to its log line."""

    receive: Receive
    send: Send
    pool_id: str
    route: str  # the path called, without its query (for the log line)
    method: str
    correlation_id: str
    error_body: ErrorBody
    started: float = field(default_factory=time.perf_counter)
    owner: asyncio.Task[object] | None = None  # the task serving the request: cancelled when the client leaves
    watcher: asyncio.Task[None] | None = None
    status: int = 0
    outcome: str = "ok"
    first_byte: float | None = None
    response_started: bool = False
    finished: bool = False
    disconnected: bool = False


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What goes to the engine: `body` when it was read already (the /v1 routes), else it streams from the client
    (`length` from its Content-Length; None: chunked, or no body at all when `has_body` is false)."""

    method: bytes
    target: bytes
    headers: Headers
    body: bytes | None
    length: int | None = None
    has_body: bool = False


def upstream_headers(headers: Headers, correlation_id: str, engine_headers: Headers) -> Headers:
    """The client's headers as the engine gets them (see the module docstring)."""
    named = _connection_named(headers)
    out = [(k, v) for k, v in headers if k not in _NOT_UP and k not in named]
    out.append((CORRELATION_HEADER, correlation_id.encode()))
    out.extend(engine_headers)
    return out


def downstream_headers(headers: Headers, correlation_id: str) -> Headers:
    named = _connection_named(headers)
    out = [(k, v) for k, v in headers if k not in _NOT_DOWN and k not in named]
    out.append((CORRELATION_HEADER, correlation_id.encode()))
    return out


def _connection_named(headers: Headers) -> frozenset[bytes]:
    found: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            found.update(token.strip().lower() for token in value.split(b","))
    return frozenset(found)


async def proxy(call: Call, traffic: PoolTraffic, out: Outgoing, *, connect_timeout_s: float) -> None:
    """Admit `call` on its pool, forward it, answer what went wrong, record it (see the module docstring)."""
    call.owner = asyncio.current_task()
    if out.body is not None or not out.has_body:
        watch(call)  # nothing left to read from the client: a disconnect can be seen from now on
    try:
        try:
            await _admitted(call, traffic, out, connect_timeout_s)
        except (Refused, Cut, EngineUnreachable, EngineBroken, ClientGone) as exc:
            await _failed(call, exc)
        except Exception:  # a bug here: the client gets a clear answer, the log the traceback
            log.exception("proxy error", extra={"pool_id": call.pool_id, "route": call.route})
            await fail(call, 500, "internal error (see poolmgr's log)", "internal")
    except asyncio.CancelledError:
        if not call.disconnected:
            raise
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
    finally:
        call.finished = True
        if call.watcher is not None:
            call.watcher.cancel()
        if call.disconnected:
            call.status, call.outcome = 499, "client_disconnect"
        _record(call, traffic)


async def _admitted(call: Call, traffic: PoolTraffic, out: Outgoing, connect_timeout_s: float) -> None:
    """Admit and forward. An engine that does not answer its socket before anything was sent has most likely just
    died, a few ms before its worker sees the exit and the gate stops admitting: then the request waits, once, for
    the pool's next engine like any request to a restarting pool (502 if the pool stays open regardless)."""
    try:
        async with traffic.admit() as ticket:
            await ticket.run(_forward(call, traffic, out, connect_timeout_s))
    except EngineUnreachable:
        if not await traffic.left_open(_ENGINE_GONE_WAIT_S):
            raise
        async with traffic.admit() as ticket:
            await ticket.run(_forward(call, traffic, out, connect_timeout_s))


async def _failed(call: Call, exc: Exception) -> None:
    if isinstance(exc, Refused):
        await fail(call, exc.status, exc.message, "unavailable", retry_after_s=exc.retry_after_s)
    elif isinstance(exc, Cut):
        await fail(call, 503, f"cut: pool {call.pool_id!r} drained past its deadline", "cut")
    elif isinstance(exc, EngineUnreachable):
        await fail(call, 502, str(exc), "engine_unreachable")
    elif isinstance(exc, EngineBroken):
        await fail(call, 502, str(exc), "engine_error")
    else:  # ClientGone
        call.disconnected = True


async def _forward(call: Call, traffic: PoolTraffic, out: Outgoing, connect_timeout_s: float) -> None:
    exchange = await Exchange.open(traffic.socket_path, timeout_s=connect_timeout_s)
    try:
        await _upload(call, exchange, out, traffic.engine_headers)
        head = await exchange.read_head(out.method)
        await call.send({
            "type": "http.response.start", "status": head.status,
            "headers": downstream_headers(head.headers, call.correlation_id),
        })  # fmt: skip
        call.response_started, call.status = True, head.status
        await _download(call, exchange)
    finally:
        exchange.close()


async def _upload(call: Call, exchange: Exchange, out: Outgoing, engine_headers: Headers) -> None:
    headers = upstream_headers(out.headers, call.correlation_id, engine_headers)
    if out.body is not None:
        exchange.send_head(out.method, out.target, headers, length=len(out.body), body=out.body)
        return
    if not out.has_body:
        exchange.send_head(out.method, out.target, headers, length=0)
        return
    exchange.send_head(out.method, out.target, headers, length=out.length)
    try:
        more = True
        while more:
            message = await call.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            more = bool(message.get("more_body", False))
            await exchange.send(message.get("body", b""))
        await exchange.end()
    except OSError:
        pass  # the engine stopped reading (it may have answered already, e.g. 413): its answer tells
    watch(call)


async def _download(call: Call, exchange: Exchange) -> None:
    done = exchange.done
    while not done:
        chunk = await exchange.read()
        done = exchange.done
        if chunk and call.first_byte is None:
            call.first_byte = time.perf_counter()
        if done:
            call.finished = True  # from here on the end of the answer, not a client leaving, wakes the watcher
        await call.send({"type": "http.response.body", "body": chunk, "more_body": not done})
    if call.first_byte is None:
        call.first_byte = time.perf_counter()
    if not call.finished:
        call.finished = True
        await call.send({"type": "http.response.body", "body": b"", "more_body": False})


def watch(call: Call) -> None:
    """From now on, a client that goes away cancels the request (once its body has been read: the watcher
    takes the ASGI receive channel)."""
    if call.watcher is None and call.owner is not None:
        call.watcher = asyncio.get_running_loop().create_task(_watch(call))


async def _watch(call: Call) -> None:
    while True:
        message: Message = await call.receive()
        if message["type"] == "http.disconnect":
            break
    if not call.finished and call.owner is not None:
        call.disconnected = True
        call.owner.cancel()


async def fail(call: Call, status: int, message: str, outcome: str, *, retry_after_s: int | None = None) -> None:
    """Answer an error — or, once the answer has started, end its body where it is."""
    call.status, call.outcome = status, outcome
    if call.response_started:
        if not call.finished:
            call.finished = True
            with contextlib.suppress(Exception):  # a Content-Length answer cut short: the server closes it
                await call.send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    await send_error(call.send, status, call.error_body(status, message, outcome), call.correlation_id,
                     retry_after_s=retry_after_s)  # fmt: skip
    call.response_started = call.finished = True


async def send_error(send: Send, status: int, body: bytes, correlation_id: str, *,
                     retry_after_s: int | None = None, extra: Headers | None = None) -> None:  # fmt: skip
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (CORRELATION_HEADER, correlation_id.encode()), *(extra or ())]  # fmt: skip
    if retry_after_s is not None:
        headers.append((b"retry-after", str(retry_after_s).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _record(call: Call, traffic: PoolTraffic) -> None:
    now = time.perf_counter()
    duration = now - call.started
    ttfb = None if call.first_byte is None else call.first_byte - call.started
    traffic.record(call.status, duration, ttfb)
    if not log.isEnabledFor(logging.INFO):
        return
    log.info(
        "%s %s -> %d (%s) in %.1f ms", call.method, call.route, call.status, call.outcome, duration * 1e3,
        extra={
            "pool_id": call.pool_id, "route": call.route, "method": call.method, "status": call.status,
            "outcome": call.outcome, "duration_ms": round(duration * 1e3, 3),
            "ttfb_ms": None if ttfb is None else round(ttfb * 1e3, 3), "correlation_id": call.correlation_id,
        },
    )  # fmt: skip


def poolmgr_error(status: int, message: str, kind: str) -> bytes:
    """poolmgr's error shape, as app.py writes it."""
    return json.dumps({"error": {"message": message, "type": kind}}).encode()


__all__ = [
    "HOP_BY_HOP",
    "Call",
    "ClientGone",
    "ErrorBody",
    "Outgoing",
    "downstream_headers",
    "fail",
    "poolmgr_error",
    "proxy",
    "send_error",
    "upstream_headers",
    "watch",
]
