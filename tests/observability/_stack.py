"""A running poolmgr in-process: Registry + Reconciler + the HTTP API (what `poolmgr serve` wires), on its own
event loop in a thread, with real engine processes (the fake llama-server, or the real one) and every log line
captured as JSON. Tests talk to it over HTTP, like an operator would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from poolmgr.api.app import create_app
from poolmgr.api.dataplane import DataPlane
from poolmgr.lifecycle.reconciler import Reconciler
from poolmgr.observability.logs import JsonFormatter, register_pool_secrets, register_settings_secrets
from poolmgr.observability.metrics import MetricsEndpoint, build_metrics
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig
from poolmgr.store import EventView, Registry
from tests.e2e.conftest import kill_engines

TESTS = Path(__file__).resolve().parents[1]
FAKE_ENGINE = TESTS / "fake_engine.py"
H100_SNAPSHOT = TESTS / "fixtures" / "gpu" / "h100-80gb-hbm3" / "nvml-snapshot.json"
FAST_ENV = {
    "POOL_MANAGERD_BACKOFF_INITIAL_MS": "50",
    "POOL_MANAGERD_BACKOFF_MAX_MS": "200",
    "POOL_MANAGERD_CIRCUIT_BREAKER_THRESHOLD": "2",
    "POOL_MANAGERD_RESTART_RATE_LIMIT": "2",
    "POOL_MANAGERD_HEALTH_CHECK_INTERVAL_MS": "100",
    "POOL_MANAGERD_STOP_GRACE_MS": "1000",
    "POOL_MANAGERD_PRELOAD_TIMEOUT_MS": "20000",
}


class EngineFiles:
    """A 0755 directory the engine user can read: the fake llama-server, its wrapper, model files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.chmod(0o755)
        shutil.copy(FAKE_ENGINE, root / "fake_engine.py")
        (root / "fake_engine.py").chmod(0o644)
        self.server = root / "llama-server"
        self.server.write_text(f'#!/bin/sh\nexec /usr/bin/python3 {root / "fake_engine.py"} "$@"\n')
        self.server.chmod(0o755)

    def model(self, name: str, mode: str | None = None) -> Path:
        """A model file the fake engine loads; `mode` (e.g. crash_after) is read from the file itself."""
        path = self.root / name
        path.write_bytes(b"GGUF" + b"\0" * 60 + (f"\nfake-engine-mode: {mode}\n".encode() if mode else b""))
        path.chmod(0o644)
        return path

    def missing(self, name: str = "missing.gguf") -> Path:
        return self.root / name


class LogCapture(logging.Handler):
    """Every log record, formatted as poolmgr's JSON lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        with self._lock2:
            self.lines.append(line)

    def records(self) -> list[dict[str, Any]]:
        with self._lock2:
            return [json.loads(line) for line in self.lines]

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], what: str, timeout: float = 10) -> dict[str, Any]:
        """The first line `pred` accepts (a line follows the audit row it reports by a few ms)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for r in self.records() if pred(r)]
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no log line {what} in {timeout}s")


@contextlib.contextmanager
def captured_logs() -> Iterator[LogCapture]:
    root = logging.getLogger()
    handler = LogCapture()
    quiet = [logging.getLogger(name) for name in ("httpx", "transitions")]  # as setup_logging() does
    old_levels = [root.level, *(q.level for q in quiet)]
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for q in quiet:
        q.setLevel(logging.WARNING)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        for logger, level in zip([root, *quiet], old_levels, strict=True):
            logger.setLevel(level)


def make_config(db_url: str, state_dir: Path, engine: Path, **env: str) -> PoolManagerConfig:
    return PoolManagerConfig.from_env(
        {
            "POOL_MANAGERD_DATABASE_URL": db_url,
            "POOL_MANAGERD_STATE_DIR": str(state_dir),
            "POOL_MANAGERD_LLAMA_SERVER": str(engine),
            "POOL_MANAGERD_FAKE_NVML": str(H100_SNAPSHOT),
            "POOL_MANAGERD_NODE_ID": "obs-node",
            **FAST_ENV,
            **env,
        }
    )


class Stack:
    def __init__(
        self,
        cfg: PoolManagerConfig,
        specs: Sequence[PoolSpec],
        *,
        engine_timeout_s: float = 0.5,
        lag_s: float = 60,
        engine_interval_s: float = 0.2,  # engines' /metrics are fetched in the background: often, in tests
    ) -> None:
        self.cfg = cfg
        self.specs = list(specs)
        self.engine_timeout_s = engine_timeout_s
        self.engine_interval_s = engine_interval_s
        self.lag_s = lag_s
        self.port = 0
        self.registry: Registry | None = None
        self.metrics: MetricsEndpoint | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="poolmgr-stack", daemon=True)
        self.client: httpx.Client | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> Stack:
        if os.geteuid() == 0:
            from poolmgr.isolation import ensure_engine_user
            from poolmgr.lifecycle.sandbox import engine_user

            ensure_engine_user(engine_user(self.cfg))
        register_settings_secrets(self.cfg)
        register_pool_secrets(self.specs)
        self._thread.start()
        if not self._started.wait(30) or self._error is not None:
            raise AssertionError(f"the stack did not start: {self._error!r}")
        headers = {"Authorization": f"Bearer {self.cfg.api_token}"} if self.cfg.api_token else {}
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30, headers=headers)
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start()/stop(), never lost in a thread
            self._error = exc
            self._started.set()

    async def _main(self) -> None:
        self.registry = registry = Registry(self.cfg.effective_database_url, node_id=self.cfg.node_id)
        reconciler = Reconciler(self.cfg, registry)
        self.metrics = build_metrics(
            reconciler,
            engine_timeout_s=self.engine_timeout_s,
            lag_s=self.lag_s,
            engine_interval_s=self.engine_interval_s,
        )
        board = reconciler.runtime.traffic
        app = create_app(
            registry, kick=reconciler.kick, api_token=self.cfg.api_token, metrics=self.metrics, follow=board.follow
        )
        plane = DataPlane(app, board=board, api_token=self.cfg.api_token)  # served as the daemon serves it
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(plane, log_config=None, access_log=False, lifespan="off"))
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        await reconciler.start(self.specs)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        self._started.set()
        await self._stop.wait()
        await reconciler.shutdown(keep_engines=False)
        server.should_exit = True
        await serving
        sock.close()
        self.metrics.close()
        registry.close()

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        kill_engines([s.id for s in self.specs])
        if self._error is not None:
            raise AssertionError(f"the stack failed: {self._error!r}") from self._error

    # -- talking to it --------------------------------------------------------------------------------
    @property
    def http(self) -> httpx.Client:
        assert self.client is not None, "start() the stack first"
        return self.client

    def status(self, pool_id: str) -> dict[str, Any]:
        resp = self.http.get(f"/pools/{pool_id}/status")
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    def wait_for(
        self, pool_id: str, pred: Callable[[dict[str, Any]], bool], what: str, timeout: float = 20
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.status(pool_id)
            if pred(last):
                return last
            time.sleep(0.02)
        raise AssertionError(f"pool {pool_id}: {what} not reached in {timeout}s; last status {last}")

    def engine_socket(self, pool_id: str) -> Path:
        """Where the pool's engine listens: a unix socket in its workdir (engines have no TCP port)."""
        return self.cfg.state_dir / "work" / pool_id / "engine.sock"

    def engine(self, pool_id: str) -> httpx.Client:
        """A client straight to the pool's engine over its socket, not through poolmgr (close it after use)."""
        transport = httpx.HTTPTransport(uds=str(self.engine_socket(pool_id)))
        return httpx.Client(transport=transport, base_url="http://engine", timeout=30, trust_env=False)

    def wait_state(self, pool_id: str, state: str, timeout: float = 20) -> dict[str, Any]:
        return self.wait_for(pool_id, lambda s: s["state"] == state, f"state {state}", timeout)

    def events(self, pool_id: str | None = None) -> list[EventView]:
        assert self.registry is not None
        return self.registry.events(pool_id=pool_id)

    def wait_event(self, pool_id: str, pred: Callable[[EventView], bool], what: str, timeout: float = 20) -> EventView:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events(pool_id) if pred(e)]
            if found:
                return found[-1]
            time.sleep(0.02)
        raise AssertionError(f"pool {pool_id}: no audit row for {what} in {timeout}s: {self.events(pool_id)[-5:]}")

    def scrape(self) -> Scrape:
        resp = self.http.get("/metrics")
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/plain")
        return Scrape(resp.text)

    def scrape_until(self, pred: Callable[[Scrape], bool], what: str, timeout: float = 10) -> Scrape:
        """Scrape until `pred` holds: engine metrics are the engines' answers to a background fetch."""
        deadline = time.monotonic() + timeout
        while True:
            scrape = self.scrape()
            if pred(scrape):
                return scrape
            if time.monotonic() > deadline:
                raise AssertionError(f"no scrape with {what} in {timeout}s")
            time.sleep(0.05)


class Scrape:
    """A /metrics body parsed by prometheus_client.parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: list[Sample] = [s for f in self.families.values() for s in f.samples]

    def type_of(self, family: str) -> str:
        return self.families[family].type

    def series(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the one sample with exactly these labels (+ any others), None when absent."""
        found = self.series(name, **labels)
        assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples: {found}"
        return found[0].value if found else None

    def total(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.series(name, **labels))

    def label_values(self, name: str, label: str, **labels: str) -> set[str]:
        return {s.labels[label] for s in self.series(name, **labels)}

    def counters_and_histograms(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every counter and histogram sample, keyed by name and labels (to compare two scrapes)."""
        keep = {n for n, f in self.families.items() if f.type in ("counter", "histogram") and ":" not in n}
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for n in keep for s in self.families[n].samples}
