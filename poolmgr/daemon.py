"""`poolmgr serve`: migrate, register the pools of the file, run one worker per pool and the HTTP API, which is
also the node's data plane: the one port through which clients reach the engines (api/dataplane.py).

On SIGTERM / Ctrl-C every engine is stopped (TERM to its process group, KILL after the grace period), unless
POOL_MANAGERD_KEEP_ENGINES=1 (`--keep-engines`): then engines keep serving and the next `serve` re-adopts them.
A signal during start-up (waiting for the database, say) is a clean stop too. See docs/operations.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from sqlalchemy.exc import DBAPIError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from poolmgr import __version__
from poolmgr.api.app import create_app
from poolmgr.api.dataplane import DataPlane, uvicorn_tls
from poolmgr.errors import ConfigError, ConflictError
from poolmgr.inflight import LOAD_ON_DEMAND
from poolmgr.lifecycle.operations import request_preload
from poolmgr.lifecycle.outage import database_unavailable
from poolmgr.lifecycle.reconciler import Reconciler
from poolmgr.lifecycle.traffic import Starter
from poolmgr.observability.logs import register_pool_secrets, register_settings_secrets
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig
from poolmgr.store import Registry, migrate

log = logging.getLogger("poolmgr.daemon")
_T = TypeVar("_T")
_GC_YOUNG_THRESHOLD = 50_000  # allocations between collections of the youngest generation (CPython: 700)
_SERVER_TICK_S = 1.0  # uvicorn looks at its exit flag and limits 10 times a second by itself


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (poolmgr's handlers stop the workers first) and without its 10 Hz
    tick: its main loop wakes once a second (the Date header's resolution) or when told to exit."""

    def __init__(self, config: uvicorn.Config) -> None:
        self._exit = asyncio.Event()
        super().__init__(config)

    @property  # type: ignore[override]
    def should_exit(self) -> bool:
        return self._exit.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self._exit.set()
        else:
            self._exit.clear()

    async def main_loop(self) -> None:
        while not await self.on_tick(0):  # counter 0: each tick sets the Date header, as uvicorn's every 10th
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit.wait(), _SERVER_TICK_S)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def token_fingerprint(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:8]


def check_bind_security(cfg: PoolManagerConfig) -> None:
    problem = cfg.bind_problem()
    if problem is not None:
        raise ConfigError(problem)


def _metrics(reconciler: Reconciler) -> Any:
    try:
        from poolmgr.observability.metrics import build_metrics
    except ImportError:
        return None
    return build_metrics(reconciler)


def _on_demand(registry: Registry, reconciler: Reconciler) -> Starter:
    """How the data plane starts a stopped pool with load_on_demand for a request: an operator's preload (audited
    with reason load_on_demand), then its gate and worker follow at once, as after the API's preload."""
    board = reconciler.runtime.traffic

    async def start(pool_id: str, correlation_id: str | None) -> None:
        log.info("pool %s: a request found it stopped (load_on_demand): starting it", pool_id,
                 extra={"pool_id": pool_id, "correlation_id": correlation_id, "reason": LOAD_ON_DEMAND})  # fmt: skip
        view = await asyncio.to_thread(
            request_preload, registry, pool_id, correlation_id=correlation_id, reason=LOAD_ON_DEMAND
        )
        board.follow(view)
        reconciler.kick(pool_id)

    return start


def _devices(reconciler: Reconciler) -> Any:
    from poolmgr.devices import devices_json

    def rows() -> list[dict[str, Any]]:
        holders = {}
        for pool in reconciler.registry.pools(node_id=reconciler.cfg.node_id):
            for uuid in (pool.split_plan or {}).get("device_uuids", []):
                holders[uuid] = pool.id
        return devices_json(reconciler.inventory, holders)

    return rows


async def serve(
    cfg: PoolManagerConfig, specs: Sequence[PoolSpec], *, keep_engines: bool | None = None,
    pools_file: Path | None = None,
) -> int:  # fmt: skip
    check_bind_security(cfg)
    stop = _stop_on_signals()  # first: from here on SIGTERM / Ctrl-C is a clean stop, during start-up too
    keep = cfg.keep_engines if keep_engines is None else keep_engines
    register_settings_secrets(cfg)
    register_pool_secrets(specs)
    inference_tokens = cfg.inference_tokens()  # read once: an unreadable or empty file is one line and exit 2
    _ensure_engine_user(cfg)
    await asyncio.to_thread(_ensure_spawner)  # compiled now, not on the first engine start
    url = cfg.effective_database_url
    registry = Registry(url, node_id=cfg.node_id)
    reconciler = Reconciler(cfg, registry)
    metrics: Any = None
    server_task: asyncio.Task[None] | None = None
    try:
        await _unless(stop, reconciler.store.call(migrate, url))  # waits (and says so) while the database is away
        metrics = _metrics(reconciler)
        board = reconciler.runtime.traffic
        board.starter = _on_demand(registry, reconciler)
        app = create_app(
            registry, kick=reconciler.kick, api_token=cfg.api_token, metrics=metrics, devices=_devices(reconciler),
            follow=board.follow, check_spec=_spec_check(reconciler),
        )  # fmt: skip
        app.add_exception_handler(DBAPIError, _database_error)
        plane = DataPlane(app, board=board, api_token=cfg.api_token, inference_tokens=inference_tokens)
        server = _Server(
            uvicorn.Config(
                plane, host=cfg.host, port=cfg.port, log_config=None, access_log=False, lifespan="off",
                **uvicorn_tls(cfg),
            )
        )  # fmt: skip
        sock = _listen(cfg)
        await _unless(stop, reconciler.start(specs))
        _reapply_on_sighup(cfg, reconciler, pools_file)
        server_task = asyncio.create_task(server.serve(sockets=[sock]), name="api")
        _log_serving(cfg, len(reconciler.workers), url)
        _settle_gc()
        sd_notify("READY=1")
        await _unless(stop, asyncio.shield(server_task))
    except _Stopped:
        pass
    failed = server_task is not None and server_task.done() and not stop.is_set()
    sd_notify("STOPPING=1")
    log.info("shutting down: %s", "keeping engines for the next poolmgr" if keep else "stopping engines")
    if server_task is not None:
        server.should_exit = True
    await reconciler.shutdown(keep_engines=keep)
    if server_task is not None:
        await asyncio.gather(server_task, return_exceptions=True)
    if metrics is not None:
        metrics.close()
    registry.close()
    log.info("poolmgr stopped")
    if failed:
        raise ConfigError(f"the API could not serve on {cfg.addr} (is the port in use?)")
    return 0


def _spec_check(reconciler: Reconciler) -> Callable[[PoolSpec], None]:
    """A PUT's pool against this host, as `validate` checks a pools file (device masks, isolation users)."""
    from poolmgr.validation import validate_pools

    def check(spec: PoolSpec) -> None:
        validate_pools([spec], lambda: reconciler.inventory, source=f"PUT /pools/{spec.id}")

    return check


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) `state`, when it started us with a NOTIFY_SOCKET; nothing otherwise."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path  # "@...": an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.send(state.encode())
    except OSError as exc:
        log.warning("could not tell systemd %s: %s", state, exc)


def _settle_gc() -> None:
    """What start built (the pools, their workers, the app) lives as long as serve: it is moved out of the cyclic
    garbage collector's reach (after one collection), and the youngest generation is collected every 50,000
    allocations instead of 700, so that a scrape's temporaries die before a collection promotes them. Without
    both, a 1,000-pool node's scrapes set off a full collection every few seconds, ~250 ms each (bench/scale.py's
    /metrics p95 on PostgreSQL); with them, none in a minute of back-to-back scrapes."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def _log_serving(cfg: PoolManagerConfig, pools: int, url: str) -> None:
    log.info(
        "poolmgr %s serving on %s://%s with %d pool(s) (their address: %s/pools/<id>/engine); database %s; "
        "api token %s",
        __version__, "https" if uvicorn_tls(cfg) else "http", cfg.addr, pools, cfg.advertised_url, _safe_url(url),
        token_fingerprint(cfg.api_token) if cfg.api_token else "off (loopback only)",
        extra={"pid": os.getpid()},
    )  # fmt: skip


def _reapply_on_sighup(cfg: PoolManagerConfig, reconciler: Reconciler, pools_file: Path | None) -> None:
    """SIGHUP: the pools file is read and checked again and applied as this node's file pools (what it adds,
    changes and removes is logged); a file with problems, or naming another node's pool, changes nothing."""
    if pools_file is None:
        return
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def reapply() -> None:
        from poolmgr.validation import check_pools_file

        try:
            checked = await asyncio.to_thread(check_pools_file, pools_file, cfg)
            register_pool_secrets(checked.specs)
            done = await reconciler.apply(checked.specs)
        except (ConfigError, ConflictError) as exc:
            log.error("SIGHUP: pools file %s not applied: %s", pools_file, str(exc).replace("\n", "; "))
            return
        log.info("SIGHUP: pools file %s applied: %d added, %d changed, %d removed", pools_file,
                 len(done.added), len(done.changed), len(done.removed))  # fmt: skip

    def on_hup() -> None:
        task = loop.create_task(reapply(), name="sighup")
        pending.add(task)
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)


class _Stopped(Exception):
    """SIGTERM or Ctrl-C arrived while poolmgr was waiting for something (the database, the start)."""


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _unless(stop: asyncio.Event, aw: Awaitable[_T]) -> _T:
    """Await `aw` unless a stop signal comes first: then `aw` is cancelled and _Stopped raised."""
    task = asyncio.ensure_future(aw)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise _Stopped


def _listen(cfg: PoolManagerConfig) -> socket.socket:
    """Bind the API port before any engine starts: a port in use is one clear line and exit 2."""
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    try:
        sock = socket.create_server((cfg.host, cfg.port), family=family, reuse_port=False)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {cfg.addr}: {exc.strerror or exc}") from None
    # create_server leaves the protocol 0, and asyncio sets TCP_NODELAY only on sockets whose protocol is
    # IPPROTO_TCP: without it a response written in two parts waits ~40 ms for the client's delayed ACK.
    return socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())


async def _database_error(_request: Request, exc: Exception) -> Response:
    """The database is away (a PostgreSQL restart): 503 and try again, not a 500. A write whose answer was lost
    may have happened; the workers' own writes wait and retry instead."""
    if database_unavailable(exc):
        body = {"error": {"message": "the database is not answering; try again shortly", "type": "unavailable"}}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
    log.error("unexpected database error: %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return JSONResponse(
        {"error": {"message": "internal error (see poolmgr's log)", "type": "internal"}}, status_code=500
    )


def _ensure_engine_user(cfg: PoolManagerConfig) -> None:
    """As root, engines run as a dedicated system user: create it on first start (what `poolmgr setup` does)."""
    if os.geteuid() != 0:
        log.warning(
            "poolmgr is not root: engines run as uid %d; every other isolation layer still applies", os.geteuid()
        )
        return
    from poolmgr.isolation import ensure_engine_user
    from poolmgr.lifecycle.sandbox import engine_user

    name = engine_user(cfg)
    uid, gid = ensure_engine_user(name)
    log.info("engines run as %s (uid %d, gid %d)", name, uid, gid)


def _ensure_spawner() -> None:
    """Build (or find) the compiled helper that applies the isolation layers before exec'ing an engine."""
    from poolmgr.isolation import choose_spawner

    log.info("engine spawner: %s", choose_spawner().detail)


def _safe_url(url: str) -> str:
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


__all__ = ["check_bind_security", "serve", "token_fingerprint"]
