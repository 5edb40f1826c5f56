"""The real Prometheus server (Debian package `prometheus`) scrapes a live `poolmgr serve` through
deploy/prometheus/prometheus.yml and evaluates deploy/prometheus/poolmgr-alerts.yml on a real crash loop: the
engine of a pool keeps crashing, its restart storm opens the breaker, and the server's own rule evaluation turns
PoolmgrRestartStorm `firing` and PoolmgrCircuitBreakerOpen `pending` (its `for: 1m` is left as shipped).

The test's config is the shipped file with only the target, the intervals (1 s, and the scrape timeout that
must not exceed them) and the rule files' paths (made absolute) changed; the rule file is used as it is."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.conftest import E2E_REQUIRED, Serve, free_port, kill_engines

from ._stack import H100_SNAPSHOT, EngineFiles

PROM_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
POOL = "prom-crashloop"


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    found = shutil.which("prometheus")
    if found is None:
        why = "the prometheus server is not installed (Debian package `prometheus`)"
        if E2E_REQUIRED:
            pytest.fail(f"end-to-end tests are required (POOLMGR_TEST_E2E=required) but {why}")
        pytest.skip(why)
    return found


def scrape_config(target: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml, pointed at `target`, scraping and evaluating every second."""
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    assert [job["job_name"] for job in cfg["scrape_configs"]] == ["poolmgr"]
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str((PROM_DIR / f).resolve()) for f in cfg["rule_files"]]
    (job,) = cfg["scrape_configs"]
    job["scrape_timeout"] = "1s"  # may not exceed the scrape interval
    assert len(job["static_configs"]) == 1
    job["static_configs"][0]["targets"] = [target]
    return cfg


class Prometheus:
    """A `prometheus` server on a free loopback port with its own storage, and its HTTP API."""

    def __init__(self, binary: str, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.base = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address={self.base.removeprefix('http://')}",
                ],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.client = httpx.Client(base_url=self.base, timeout=5, trust_env=False)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_until(self, probe: Callable[[], Any], what: str, timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                found = probe()
                if found:
                    return found
            time.sleep(0.2)
        raise AssertionError(f"{what} not seen in {timeout}s\n{self.log_tail()}")

    def api(self, path: str, **params: str) -> Any:
        resp = self.client.get("/api/v1/" + path, params=params)
        resp.raise_for_status()
        body = resp.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[str, float]:
        """An instant vector, keyed by the series' pool_id (or '' when it has none)."""
        result = self.api("query", query=expr)["result"]
        return {r["metric"].get("pool_id", ""): float(r["value"][1]) for r in result}

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def workdir(engine_files: EngineFiles) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="prom-", dir=engine_files.root))
    path.chmod(0o755)  # the engine user reads the state dir's pool workdirs
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serve(workdir: Path, engine_files: EngineFiles, sqlite_url: str) -> Iterator[Serve]:
    srv = Serve(
        workdir,
        sqlite_url,
        {
            "POOL_MANAGERD_LLAMA_SERVER": str(engine_files.server),
            "POOL_MANAGERD_FAKE_NVML": str(H100_SNAPSHOT),
            "POOL_MANAGERD_LOG_FORMAT": "text",
            "POOL_MANAGERD_CIRCUIT_BREAKER_THRESHOLD": "2",
            "POOL_MANAGERD_RESTART_RATE_LIMIT": "2",
            "POOL_MANAGERD_BACKOFF_MAX_MS": "200",
        },
    )
    try:
        yield srv
    finally:
        srv.stop(signal.SIGKILL)
        kill_engines(srv.pool_ids)


@pytest.fixture
def prometheus(prometheus_bin: str, workdir: Path, serve: Serve) -> Iterator[Prometheus]:
    prom_dir = workdir / "prometheus"
    prom_dir.mkdir()
    prom = Prometheus(prometheus_bin, prom_dir, scrape_config(f"127.0.0.1:{serve.port}"))
    try:
        yield prom
    finally:
        prom.stop()


def _target_up(prom: Prometheus, serve: Serve) -> dict[str, Any] | None:
    for target in prom.api("targets")["activeTargets"]:
        if target["labels"].get("instance") == f"127.0.0.1:{serve.port}" and target["health"] == "up":
            return dict(target)
    return None


def _alert(prom: Prometheus, name: str, state: str) -> dict[str, Any] | None:
    found = [a for a in prom.alerts(name) if a["labels"].get("pool_id") == POOL and a["state"] == state]
    return found[0] if found else None


def test_prometheus_scrapes_serve_and_fires_the_crash_loop_alerts(
    engine_files: EngineFiles, serve: Serve, prometheus: Prometheus
) -> None:
    model = engine_files.model(f"{POOL}.gguf", "ok")
    serve.write_pools({"id": POOL, "model": str(model)})
    serve.start()
    serve.wait_state(POOL, "ready")

    target = prometheus.wait_until(lambda: _target_up(prometheus, serve), "the poolmgr target up")
    assert target["labels"]["job"] == "poolmgr" and target["scrapeUrl"].endswith("/metrics")
    assert prometheus.query("up") == {"": 1.0}
    # The pool's series as the server stored them, before any crash (so increase() has its 0 to start from).
    prometheus.wait_until(lambda: prometheus.query('pool_state{state="ready"}') == {POOL: 1.0}, "pool_state ready")
    assert prometheus.query("pool_ready") == {POOL: 1.0}
    assert prometheus.query("restart_storm_total") == {POOL: 0.0}
    assert prometheus.query("circuit_breaker_state") == {POOL: 0.0}
    assert prometheus.query("count(device_vram_total_bytes)") == {"": 1.0}  # the H100 snapshot: one GPU
    # No alert pending or firing (a PoolmgrPoolNotReady pending from a scrape before ready resolves within 1 s).
    prometheus.wait_until(lambda: prometheus.api("query", query="ALERTS")["result"] == [], "no alert", 5)

    # A real crash loop: from now on every engine of the pool dies of SIGSEGV 100 ms after it is ready.
    engine_files.model(f"{POOL}.gguf", "crash_after")
    os.kill(serve.status(POOL)["pid"], signal.SIGKILL)
    started = time.monotonic()
    serve.wait_state(POOL, "breaker-open")

    firing = prometheus.wait_until(lambda: _alert(prometheus, "PoolmgrRestartStorm", "firing"), "storm firing")
    storm_s = time.monotonic() - started
    assert firing["labels"]["severity"] == "critical" and firing["labels"]["job"] == "poolmgr"
    assert firing["annotations"]["summary"] == f"pool {POOL}: restart storm"
    pending = prometheus.wait_until(
        lambda: _alert(prometheus, "PoolmgrCircuitBreakerOpen", "pending"), "breaker alert pending"
    )
    assert pending["annotations"]["summary"] == f"pool {POOL}: circuit breaker open"
    assert prometheus.query("restart_storm_total") == {POOL: 1.0}
    assert prometheus.query("circuit_breaker_state") == {POOL: 1.0}
    assert prometheus.query(f'sum by (pool_id) (engine_crash_total{{pool_id="{POOL}"}})')[POOL] >= 3
    assert prometheus.query('pool_state{state="breaker-open"}') == {POOL: 1.0}
    # No other alert is firing: the rules fire on what happened, not on every pool series.
    others = [a for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
    assert {a["labels"]["alertname"] for a in others} == {"PoolmgrRestartStorm"}, others
    print(f"storm alert firing {storm_s:.1f}s after the first crash")
