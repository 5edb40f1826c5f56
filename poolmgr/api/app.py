"""The HTTP API (B-API): pools, status, leases, drain, reload, preload, breaker reset, devices, events, metrics.

Errors are JSON bodies `{"error": {"message", "type"}}`, never a traceback. With a token configured, every
route but /health and /metrics needs `Authorization: Bearer <token>` (compared in constant time).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from poolmgr import __version__
from poolmgr.correlation import CORRELATION_ID, new_correlation_id, valid_correlation_id
from poolmgr.errors import ConfigError, ConflictError, NotFoundError, OwnedElsewhere, PoolmgrError
from poolmgr.lifecycle import desired, operations
from poolmgr.poolsfile import FIELDS, PoolSpec, parse_pool
from poolmgr.store import PoolView, Registry

log = logging.getLogger("poolmgr.api")
PUBLIC_PATHS = frozenset({"/health", "/metrics"})
MAX_LEASE_TTL_S = 24 * 3600.0


class ErrorDetail(BaseModel):
    message: str
    type: str


class ErrorBody(BaseModel):
    """Every error answer of the API: `{"error": {"message", "type"}}`."""

    error: ErrorDetail


_WHY = {
    400: "A bad request: an invalid X-Correlation-Id header, or a value poolmgr refuses",
    401: "Missing or invalid bearer token (with an API token configured)",
    403: "An inference token on an admin route",
    404: "No such pool (or lease)",
    405: "Method not allowed (the Allow header lists the route's methods)",
    409: "A conflict: the pool is another node's, or its state does not allow the operation",
    422: "The request does not match its schema (unknown fields included)",
    501: "Metrics are not enabled",
    503: "The database is unreachable for now: try again (Retry-After)",
}
_JSON_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}  # on a text/plain route
_GUARDED = (400, 401, 403, 503)  # every route behind the token that reads the database


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` entries of these error statuses, each with the error schema."""
    return {code: {"model": ErrorBody, "description": _WHY[code]} for code in sorted(set(codes))}


def _json_number(value: Any) -> Any:
    """A JSON number, as the schema says: not a boolean nor a string (pydantic's lax mode takes both); 5.0 is an
    integer there."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a JSON number")
    return value


Number = BeforeValidator(_json_number)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown fields: 422


class DrainBody(_Body):
    deadline_ms: Annotated[int, Number] = Field(default=30_000, ge=0, le=operations.MAX_DEADLINE_MS)


class ReloadBody(_Body):
    model: str = Field(min_length=1)
    drain_deadline_ms: Annotated[int, Number] = Field(default=30_000, ge=0, le=operations.MAX_DEADLINE_MS)


class LeaseBody(_Body):
    ttl_s: Annotated[float, Number] = Field(default=300.0, gt=0, le=MAX_LEASE_TTL_S)


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def create_app(
    registry: Registry,
    *,
    kick: Callable[[str], None] = lambda _pool_id: None,
    api_token: str = "",
    metrics: Callable[[], tuple[bytes, str]] | None = None,
    devices: Callable[[], list[dict[str, Any]]] | None = None,
    follow: Callable[[PoolView], None] = lambda _view: None,
    check_spec: Callable[[PoolSpec], None] = lambda _spec: None,
) -> FastAPI:
    """`kick` wakes a pool's worker after a change; `follow` sets the data plane's gate from the pool's new row at
    once (a drain refuses requests from its 202 on, a preload queues them), before the worker wakes;
    `check_spec` checks a PUT's pool against this host as `validate` checks a pools file (ConfigProblems: 400)."""
    app = FastAPI(title="poolmgr", version=__version__, docs_url=None, redoc_url=None)
    _install_middleware(app, api_token)
    _install_errors(app)
    _add_node_routes(app, metrics, devices)
    _add_pool_routes(app, registry, kick)
    _add_operations(app, registry, kick, follow)
    _add_desired_routes(app, registry, kick, follow, check_spec)
    return app


async def _db(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A registry call (blocking database I/O) off the event loop."""
    return await run_in_threadpool(fn, *args, **kwargs)


def _add_node_routes(
    app: FastAPI,
    metrics: Callable[[], tuple[bytes, str]] | None,
    devices: Callable[[], list[dict[str, Any]]] | None,
) -> None:
    @app.get("/health", responses=_errors(400))
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"description": "Prometheus text exposition format",
              "content": {"text/plain": {"schema": {"type": "string"}}}},
        **{code: {"description": _WHY[code], "content": _JSON_ERROR} for code in (400, 501)},
    })  # fmt: skip
    async def metrics_route() -> Response:
        if metrics is None:
            return _error(501, "metrics are not enabled", "not_implemented")
        body, content_type = await run_in_threadpool(metrics)
        return Response(body, media_type=content_type)

    @app.get("/devices", responses=_errors(400, 401, 403))
    async def devices_route() -> list[dict[str, Any]]:
        return devices() if devices is not None else []


def _pools_json(registry: Registry) -> str:
    return json.dumps([p.status() for p in registry.pools()], separators=(",", ":"))


# A route that changes a pool (or its leases): ownership (409), its state (409), its body (422).
_CHANGE = _errors(*_GUARDED, 404, 409, 422)


def _add_pool_routes(app: FastAPI, registry: Registry, kick: Callable[[str], None]) -> None:
    @app.get("/pools", response_model=list[dict[str, Any]], responses=_errors(*_GUARDED))
    async def pools() -> Response:
        # The status documents are plain JSON already: serialised directly, not walked by FastAPI's encoder
        # (most of the time of this route at 200 pools), in the worker thread with the read (off the event loop).
        return Response(await _db(_pools_json, registry), media_type="application/json")

    @app.get("/pools/{pool_id}/status", responses=_errors(*_GUARDED, 404, 422))
    async def status(pool_id: str) -> dict[str, Any]:
        return dict((await _db(registry.get, pool_id)).status())

    @app.get("/pools/{pool_id}/events", responses=_errors(*_GUARDED, 404, 422))
    async def events(pool_id: str, limit: int = 100) -> list[dict[str, Any]]:
        await _db(registry.get, pool_id)
        return [e.to_json() for e in await _db(registry.events, pool_id=pool_id, limit=max(1, min(limit, 10_000)))]

    @app.post("/pools/{pool_id}/leases", status_code=201, responses=_CHANGE)
    async def allocate(pool_id: str, body: LeaseBody | None = None) -> dict[str, Any]:
        ttl = (body or LeaseBody()).ttl_s
        await _db(_own, registry, pool_id)
        lease = await _db(registry.allocate_lease, pool_id, ttl_s=ttl, correlation_id=CORRELATION_ID.get())
        return dict(lease.to_json())

    @app.delete("/pools/{pool_id}/leases/{lease_id}", responses=_CHANGE)
    async def release(pool_id: str, lease_id: str) -> dict[str, Any]:
        await _db(_own, registry, pool_id)
        if not await _db(registry.release_lease, pool_id, lease_id, correlation_id=CORRELATION_ID.get()):
            raise NotFoundError(f"lease {lease_id!r} not found on pool {pool_id!r}")
        kick(pool_id)
        return {"released": lease_id, "active_leases": (await _db(registry.get, pool_id)).active_leases}


def _add_operations(
    app: FastAPI, registry: Registry, kick: Callable[[str], None], follow: Callable[[PoolView], None]
) -> None:
    async def act(pool_id: str, fn: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
        await _db(_own, registry, pool_id)
        view = await _db(fn, registry, pool_id, correlation_id=CORRELATION_ID.get(), **kwargs)
        follow(view)
        kick(pool_id)
        return {"accepted": True, "correlation_id": CORRELATION_ID.get(), "status": view.status()}

    @app.post("/pools/{pool_id}/drain", status_code=202, responses=_CHANGE)
    async def drain(pool_id: str, body: DrainBody | None = None) -> dict[str, Any]:
        return await act(pool_id, operations.request_drain, deadline_ms=(body or DrainBody()).deadline_ms)

    @app.post("/pools/{pool_id}/reload", status_code=202, responses=_CHANGE)
    async def reload(pool_id: str, body: ReloadBody) -> dict[str, Any]:
        return await act(pool_id, operations.request_reload, model=body.model, drain_deadline_ms=body.drain_deadline_ms)

    @app.post("/pools/{pool_id}/preload", status_code=202, responses=_CHANGE)
    async def preload(pool_id: str) -> dict[str, Any]:
        return await act(pool_id, operations.request_preload)

    @app.post("/pools/{pool_id}/breaker/reset", status_code=202, responses=_CHANGE)
    async def breaker_reset(pool_id: str) -> dict[str, Any]:
        return await act(pool_id, operations.reset_breaker)


def _own(registry: Registry, pool_id: str) -> PoolView:
    """The pool, when it is this node's: a node never drives another node's pool (409 naming the owner)."""
    view = registry.get(pool_id)
    if view.node_id != registry.node_id:
        raise OwnedElsewhere(pool_id, view.node_id)
    return view


# PUT /pools/{id}'s body: one pool as a pools file's [[pool]] table writes it (docs/pools.md). The pools file's
# validation (and this host's check) still apply: a body this schema admits can get 400 naming the problems.
_PUT_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object",
    "required": ["model"],
    "additionalProperties": False,
    "properties": {
        **{name: {} for name in FIELDS},
        "id": {"type": "string", "description": "the path's id, when given"},
        "model": {"type": "string", "minLength": 1},
        "slots": {"type": "integer", "minimum": 1},
        "extra_args": {"type": "array", "items": {"type": "string"}},
        "share_devices": {"type": "boolean"},
        "load_on_demand": {"type": "boolean"},
    },
}}}}}  # fmt: skip


def _add_desired_routes(
    app: FastAPI, registry: Registry, kick: Callable[[str], None], follow: Callable[[PoolView], None],
    check_spec: Callable[[PoolSpec], None],
) -> None:  # fmt: skip
    """Desired state through the API (lifecycle/desired.py): PUT creates or changes a pool of this node, DELETE
    removes one (it drains, stops, then its row goes)."""

    @app.put("/pools/{pool_id}", status_code=200, openapi_extra=_PUT_BODY, responses={
        201: {"description": "The pool was created"}, **_errors(*_GUARDED, 404, 409, 422),
    })  # fmt: skip
    async def put_pool(pool_id: str, body: dict[str, Any]) -> Response:
        if "id" in body and body["id"] != pool_id:
            raise ValueError(f"the body's id {body['id']!r} is not the path's {pool_id!r}")
        spec = parse_pool({**body, "id": pool_id}, where=f"PUT /pools/{pool_id}")
        await run_in_threadpool(check_spec, spec)
        created, view = await _db(desired.put_pool, registry, spec, correlation_id=CORRELATION_ID.get())
        follow(view)
        kick(pool_id)
        doc = {"created": created, "correlation_id": CORRELATION_ID.get(), "status": view.status()}
        return JSONResponse(doc, status_code=201 if created else 200)

    @app.delete("/pools/{pool_id}", status_code=202, responses=_CHANGE)
    async def delete_pool(pool_id: str) -> dict[str, Any]:
        view = await _db(desired.remove_pool, registry, pool_id, correlation_id=CORRELATION_ID.get())
        kick(pool_id)
        return {"accepted": True, "correlation_id": CORRELATION_ID.get(), "status": view.status()}


def _install_middleware(app: FastAPI, api_token: str) -> None:
    token = api_token.encode()

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        cid = request.headers.get("x-correlation-id")
        if cid is not None and not valid_correlation_id(cid):
            return _error(400, "X-Correlation-Id must be 1-128 characters of A-Z a-z 0-9 . _ : -", "bad_request")
        cid = cid or new_correlation_id()
        reset = CORRELATION_ID.set(cid)
        try:
            if token and request.url.path not in PUBLIC_PATHS and not _authorized(request, token):
                response: Response = _error(401, "missing or invalid bearer token", "unauthorized")
                response.headers["WWW-Authenticate"] = "Bearer"
            else:
                try:
                    response = await call_next(request)
                except Exception as exc:  # caught here, not outermost: the answer still carries X-Correlation-Id
                    response = _unexpected(exc)
        finally:
            CORRELATION_ID.reset(reset)
        response.headers["X-Correlation-Id"] = cid
        return response


def _authorized(request: Request, token: bytes) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


# poolmgr's errors as HTTP answers; the most specific class wins (Starlette looks up the exception's MRO).
_ERRORS: tuple[tuple[type[Exception], int, str], ...] = (
    (NotFoundError, 404, "not_found"),
    (ConflictError, 409, "conflict"),
    (ValueError, 400, "bad_request"),
    (ConfigError, 400, "bad_request"),
    (PoolmgrError, 500, "error"),
)


def _answer(status: int, kind: str) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handler(_r: Request, exc: Exception) -> JSONResponse:
        return _error(status, str(exc), kind)

    return handler


def _install_errors(app: FastAPI) -> None:
    for exc_type, status, kind in _ERRORS:
        app.add_exception_handler(exc_type, _answer(status, kind))

    @app.exception_handler(RequestValidationError)
    async def invalid(_r: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}".strip(": "), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = _error(exc.status_code, str(exc.detail), "http_error")
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # Allow: the methods of every route of this path (PUT and DELETE /pools/{id})
            response.headers["Allow"] = ", ".join(_allowed(app, request))
        return response

    @app.exception_handler(Exception)
    async def unexpected(_r: Request, exc: Exception) -> JSONResponse:
        return _unexpected(exc)


def _allowed(app: FastAPI, request: Request) -> list[str]:
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, BaseRoute) and route.matches(request.scope)[0] is Match.PARTIAL:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def _unexpected(exc: Exception) -> JSONResponse:
    log.error("unexpected API error: %s: %s", type(exc).__name__, exc)
    return _error(500, "internal error (see poolmgr's log)", "internal")


__all__ = ["PUBLIC_PATHS", "create_app"]
