"""The node's data plane (B-PROXY): the API port's outermost ASGI app, which serves requests to the pools' engines
itself and hands everything else to the API (app.py) unchanged.

- `/pools/{id}/engine/{path}` (any method) → the pool's engine `/{path}` (query kept), streamed both ways;
- `GET /v1/models`, `GET /v1/models/{model}`, `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`
  → the pool the body's `model` names (see _openai.py); every /v1 error in OpenAI's shape;
- anything else → the API, whose middleware checks the API token.

Inference routes need the API token or an inference token when either is configured (_access.py); an inference
token on an admin route gets 403. Requests are admitted by their pool's traffic gate (lifecycle/traffic.py) and
forwarded by _proxy.py, without going through FastAPI's routing, middleware and models (they cost more than the
whole budget: ≤ 1 ms added at the median, bench/proxy.py).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypedDict

from starlette.types import ASGIApp, Receive, Scope, Send

from poolmgr.api import _openai as oa
from poolmgr.api._access import Access, Verdict
from poolmgr.api._proxy import Call, ClientGone, ErrorBody, Outgoing, poolmgr_error, proxy, send_error
from poolmgr.api.app import PUBLIC_PATHS
from poolmgr.correlation import CORRELATION_ID, new_correlation_id, valid_correlation_id
from poolmgr.lifecycle.traffic import TrafficBoard
from poolmgr.settings import PoolManagerConfig

MAX_BODY_BYTES = 16 * 1024 * 1024  # an OpenAI request body read to find its `model`
CONNECT_TIMEOUT_S = 1.0
_BAD_CID = "X-Correlation-Id must be 1-128 characters of A-Z a-z 0-9 . _ : -"
_NOT_IN_TARGET = re.compile(rb"[\x00-\x20\x7f]")


@dataclass(frozen=True, slots=True)
class _Asked:
    """What the data plane reads of a request's headers (one pass over them)."""

    authorization: bytes | None
    correlation_id: bytes | None
    length: int | None
    chunked: bool

    @classmethod
    def of(cls, scope: Scope) -> _Asked:
        auth = cid = None
        length, chunked = None, False
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value
            elif name == b"x-correlation-id":
                cid = value
            elif name == b"content-length" and value.isdigit():
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
        return cls(auth, cid, length, chunked)

    def correlation_id_or_new(self) -> str:
        """The client's X-Correlation-Id when it is a valid one, else a new one."""
        if self.correlation_id is not None:
            given = self.correlation_id.decode("latin-1")
            if valid_correlation_id(given):
                return given
        return new_correlation_id()


class DataPlane:
    def __init__(
        self,
        app: ASGIApp,
        *,
        board: TrafficBoard,
        api_token: str = "",
        inference_tokens: Iterable[str] = (),
        max_body_bytes: int = MAX_BODY_BYTES,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.app = app
        self.board = board
        self.access = Access(api_token=api_token, inference_tokens=inference_tokens)
        self.max_body_bytes = max_body_bytes
        self.connect_timeout_s = connect_timeout_s
        self.created = int(time.time())  # `created` of every /v1/models entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith("/v1/") or path == "/v1":
                await self._openai(scope, receive, send)
                return
            if path.startswith("/pools/"):
                found = _engine_route(scope)
                if found is not None:
                    await self._engine(scope, receive, send, *found)
                    return
            if self.access.guarded and path not in PUBLIC_PATHS and not await self._admin_allowed(scope, send):
                return
        await self.app(scope, receive, send)

    async def _admin_allowed(self, scope: Scope, send: Send) -> bool:
        asked = _Asked.of(scope)
        if self.access.admin(asked.authorization) is Verdict.ALLOWED:
            return True
        message = "this token grants the inference routes only (/v1/*, /pools/{id}/engine/*)"
        await send_error(send, 403, poolmgr_error(403, message, "forbidden"), asked.correlation_id_or_new())
        return False

    async def _begin(self, send: Send, asked: _Asked, error_body: ErrorBody) -> str | None:
        """The request's correlation id, once it and the token are checked; None when it was answered with an
        error."""
        cid = asked.correlation_id_or_new()
        if asked.correlation_id is not None and cid != asked.correlation_id.decode("latin-1"):
            await send_error(send, 400, error_body(400, _BAD_CID, "bad_request"), cid)
            return None
        if self.access.inference(asked.authorization) is Verdict.MISSING:
            body = error_body(401, "missing or invalid bearer token", "unauthorized")
            await send_error(send, 401, body, cid, extra=[(b"www-authenticate", b"Bearer")])
            return None
        return cid

    async def _engine(self, scope: Scope, receive: Receive, send: Send, pool_id: str, target: bytes) -> None:
        asked = _Asked.of(scope)
        cid = await self._begin(send, asked, poolmgr_error)
        if cid is None:
            return
        traffic = self.board.pools.get(pool_id)
        if traffic is None:
            body = poolmgr_error(404, f"pool {pool_id!r} is not served by this node", "not_found")
            await send_error(send, 404, body, cid)
            return
        method: str = scope["method"]
        has_body = asked.chunked or bool(asked.length)
        out = Outgoing(method.encode(), target, scope["headers"], None, asked.length, has_body)
        call = Call(receive, send, pool_id, scope["path"], method, cid, poolmgr_error)
        reset = CORRELATION_ID.set(cid)
        try:
            await proxy(call, traffic, out, connect_timeout_s=self.connect_timeout_s)
        finally:
            CORRELATION_ID.reset(reset)

    async def _openai(self, scope: Scope, receive: Receive, send: Send) -> None:
        asked = _Asked.of(scope)
        cid = await self._begin(send, asked, oa.openai_error)
        if cid is None:
            return
        reset = CORRELATION_ID.set(cid)
        try:
            await self._openai_route(scope, receive, send, asked, cid)
        except oa.BadRequest as exc:
            await send_error(send, exc.status, oa.openai_error(exc.status, exc.message, exc.kind, param=exc.param), cid)
        except ClientGone:
            pass
        finally:
            CORRELATION_ID.reset(reset)

    async def _openai_route(self, scope: Scope, receive: Receive, send: Send, asked: _Asked, cid: str) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path == oa.MODELS or path.startswith(oa.MODELS + "/"):
            _allow(method, "GET")
            await _send_json(send, self._models(path[len(oa.MODELS) + 1 :]), cid)
            return
        if path not in oa.MODEL_ROUTES:
            raise oa.BadRequest(404, f"no route {path} here (see GET /v1/models for what this node serves)",
                                "not_found")  # fmt: skip
        _allow(method, "POST")
        body = await oa.read_body(receive, limit=self.max_body_bytes, declared=asked.length)
        traffic = oa.choose(self.board, oa.requested_model(body))
        out = Outgoing(b"POST", _raw_target(scope), scope["headers"], body)
        call = Call(receive, send, traffic.pool_id, path, method, cid, oa.openai_error)
        await proxy(call, traffic, out, connect_timeout_s=self.connect_timeout_s)

    def _models(self, name: str) -> bytes:
        if not name:
            return oa.model_list(self.board, self.created)
        if name not in oa.served_names(self.board):
            raise oa.BadRequest(404, f"The model `{name}` does not exist on this node", "model_not_found",
                                param="model")  # fmt: skip
        return _json_bytes(oa.model_object(name, self.created))


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise oa.BadRequest(405, f"method {method} not allowed here (only {allowed})", "method_not_allowed")


def _json_bytes(doc: Any) -> bytes:
    return json.dumps(doc).encode()


async def _send_json(send: Send, body: bytes, cid: str) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-correlation-id", cid.encode())]  # fmt: skip
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _raw_target(scope: Scope) -> bytes:
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    return raw + b"?" + query if query else raw


def _engine_route(scope: Scope) -> tuple[str, bytes] | None:
    """(pool id, the engine's target) of `/pools/{id}/engine[/{path}][?{query}]`, else None."""
    pool_id, _, tail = scope["path"][len("/pools/") :].partition("/")
    if not pool_id or not (tail == "engine" or tail.startswith("engine/")):
        return None
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    _, _, raw_tail = raw[len(b"/pools/") :].partition(b"/")
    target = raw_tail[len(b"engine") :] or b"/"
    if not target.startswith(b"/") or _NOT_IN_TARGET.search(target):
        return None
    query: bytes = scope.get("query_string", b"")
    return pool_id, target + b"?" + query if query else target


class UvicornTLS(TypedDict, total=False):
    ssl_certfile: str
    ssl_keyfile: str


def uvicorn_tls(cfg: PoolManagerConfig) -> UvicornTLS:
    """What uvicorn.Config takes to serve the API port over TLS (nothing without POOL_MANAGERD_TLS_CERT/KEY):
    `uvicorn.Config(app, ..., **uvicorn_tls(cfg))`."""
    if cfg.tls_cert is None or cfg.tls_key is None:
        return {}
    return {"ssl_certfile": str(cfg.tls_cert), "ssl_keyfile": str(cfg.tls_key)}


__all__ = ["CONNECT_TIMEOUT_S", "MAX_BODY_BYTES", "DataPlane", "UvicornTLS", "uvicorn_tls"]
