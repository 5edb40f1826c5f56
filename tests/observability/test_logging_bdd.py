"""Steps of features/observability/logging.feature (B-LOG-001..008): the stderr of a real `poolmgr serve`
subprocess (the fake llama-server as its engine), compared with the audit rows it wrote."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from poolmgr.store import EventView, Registry

from ._stack import H100_SNAPSHOT, EngineFiles, kill_engines

scenarios("observability/logging.feature")

REPO = Path(__file__).resolve().parents[2]
GOOD, BAD, TEXT, DRAIN, NOISO = "obs-l-good", "obs-l-bad", "obs-l-text", "obs-l-drain", "obs-l-noiso"
THRESHOLD = 2  # POOL_MANAGERD_CIRCUIT_BREAKER_THRESHOLD of these runs


@dataclass
class ServeRun:
    """A finished `poolmgr serve`: its stderr, the status of its pools before it stopped, its audit rows."""

    stderr: str
    status: dict[str, dict[str, Any]]
    events: list[EventView]
    lines: list[dict[str, Any]] = field(default_factory=list)

    def rows(self, pool_id: str, kind: str) -> list[EventView]:
        return [e for e in self.events if e.pool_id == pool_id and e.kind == kind]


class _Serve:
    def __init__(
        self, files: EngineFiles, pools: dict[str, Path], env: dict[str, str],
        before_start: Callable[[Path], None] | None = None,
    ) -> None:  # fmt: skip
        self.state = Path(tempfile.mkdtemp(prefix="serve-", dir=files.root))
        self.state.chmod(0o755)
        if before_start is not None:
            before_start(self.state)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        pools_file = self.state / "pools.toml"
        pools_file.write_text("".join(f'[[pool]]\nid = "{p}"\nmodel = "{m}"\n' for p, m in pools.items()))
        self.url = f"sqlite:///{self.state / 'poolmgr.db'}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("POOL_MANAGERD_")},
            "POOL_MANAGERD_ADDR": f"127.0.0.1:{port}", "POOL_MANAGERD_STATE_DIR": str(self.state),
            "POOL_MANAGERD_DATABASE_URL": self.url, "POOL_MANAGERD_LLAMA_SERVER": str(files.server),
            "POOL_MANAGERD_FAKE_NVML": str(H100_SNAPSHOT), "POOL_MANAGERD_BACKOFF_INITIAL_MS": "50",
            "POOL_MANAGERD_BACKOFF_MAX_MS": "200", "POOL_MANAGERD_CIRCUIT_BREAKER_THRESHOLD": str(THRESHOLD),
            "POOL_MANAGERD_HEALTH_CHECK_INTERVAL_MS": "1000", "POOL_MANAGERD_HEALTH_CHECK_TIMEOUT_MS": "5000",
            "POOL_MANAGERD_STOP_GRACE_MS": "1000", **env,
        }  # fmt: skip
        self.pool_ids = list(pools)
        self.err = self.state / "stderr.log"
        with open(self.err, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "poolmgr.cli", "serve", "--config", str(pools_file)],
                env=self.env, stdout=subprocess.DEVNULL, stderr=out, cwd=REPO,
            )  # fmt: skip

    def status(self, pool_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                resp = httpx.get(f"{self.base}/pools/{pool_id}/status", timeout=5)
                if resp.status_code == 200:
                    return dict(resp.json())
            assert self.proc.poll() is None, self.err.read_text()[-3000:]
            assert time.monotonic() < deadline, f"serve never answered: {self.err.read_text()[-3000:]}"
            time.sleep(0.05)

    def wait(self, pool_id: str, pred: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = self.status(pool_id)
            if pred(status):
                return status
            time.sleep(0.05)
        raise AssertionError(f"{pool_id}: {what} not reached: {self.err.read_text()[-3000:]}")

    def finish(self) -> ServeRun:
        status = {p: self.status(p) for p in self.pool_ids}
        self.proc.send_signal(signal.SIGTERM)
        try:
            assert self.proc.wait(30) == 0, self.err.read_text()[-3000:]
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            kill_engines(self.pool_ids)
        registry = Registry(self.url, node_id="unused")
        try:
            return ServeRun(self.err.read_text(), status, registry.events())
        finally:
            registry.close()


@pytest.fixture(scope="module")
def runs(engine_files: EngineFiles) -> dict[str, ServeRun]:
    """Two `poolmgr serve` runs side by side: JSON lines (the default) and text lines."""
    pools = {GOOD: engine_files.model("good.gguf"), BAD: engine_files.missing(), DRAIN: engine_files.model("d.gguf")}
    serves = {
        "json": _Serve(engine_files, pools, {}),
        "text": _Serve(engine_files, {TEXT: engine_files.missing()}, {"POOL_MANAGERD_LOG_FORMAT": "text"}),
        # The engine workdirs live in <state>/work: a plain file there makes every isolation attempt fail.
        "noiso": _Serve(engine_files, {NOISO: engine_files.model("n.gguf")}, {},
                        before_start=lambda state: (state / "work").write_text("not a directory")),
    }  # fmt: skip
    try:
        serve = serves["json"]
        first = serve.wait(GOOD, lambda s: s["ready"], "ready")
        os.kill(first["pid"], signal.SIGKILL)
        serve.wait(GOOD, lambda s: s["ready"] and s["restart_count"] == 1, "back after a crash")
        serve.wait(BAD, lambda s: s["state"] == "breaker-open", "breaker open")
        serve.wait(DRAIN, lambda s: s["ready"], "ready")
        assert httpx.post(f"{serve.base}/pools/{DRAIN}/leases", json={"ttl_s": 60}, timeout=5).status_code == 201
        drain = httpx.post(f"{serve.base}/pools/{DRAIN}/drain", json={"deadline_ms": 200}, timeout=5)
        assert drain.status_code == 202, drain.text
        serve.wait(DRAIN, lambda s: s["state"] == "stopped", "drained")
        serves["text"].wait(TEXT, lambda s: s["state"] == "breaker-open", "breaker open")
        serves["noiso"].wait(NOISO, lambda s: s["state"] == "breaker-open", "breaker open")
    except BaseException:
        for serve in serves.values():
            serve.proc.kill()
            kill_engines(serve.pool_ids)
        raise
    return {name: serve.finish() for name, serve in serves.items()}


@given(
    parsers.parse('`poolmgr serve` ran a pool "{good}" and a pool "{bad}" whose model is missing'), target_fixture="run"
)
def served(runs: dict[str, ServeRun], good: str, bad: str) -> ServeRun:
    assert {good, bad} <= set(runs["json"].status)
    return runs["json"]


@given(parsers.parse('the engine of "{pool_id}" was killed once and came back'))
def killed_once(run: ServeRun, pool_id: str) -> None:
    assert len(run.rows(pool_id, "crashed")) == 1 and run.status[pool_id]["ready"]


@given(parsers.parse('the circuit breaker of "{pool_id}" opened before poolmgr was stopped'))
def breaker_opened(run: ServeRun, pool_id: str) -> None:
    assert run.status[pool_id]["state"] == "breaker-open" and len(run.rows(pool_id, "open_breaker")) == 1


@given(parsers.parse('a pool "{pool_id}" was drained while it held a lease'))
def drained_with_lease(run: ServeRun, pool_id: str) -> None:
    (drained,) = run.rows(pool_id, "drained")
    assert run.status[pool_id]["state"] == "stopped" and (drained.detail or {})["final_leases"] == 1


@given(
    parsers.parse('`poolmgr serve` ran a pool "{pool_id}" whose engine workdir cannot be created'), target_fixture="run"
)
def served_noiso(runs: dict[str, ServeRun], pool_id: str) -> ServeRun:
    assert set(runs["noiso"].status) == {pool_id}
    return runs["noiso"]


@given(
    parsers.parse(
        '`poolmgr serve` ran with POOL_MANAGERD_LOG_FORMAT=text and a pool "{pool_id}" whose model is missing'
    ),
    target_fixture="run",
)
def served_text(runs: dict[str, ServeRun], pool_id: str) -> ServeRun:
    assert set(runs["text"].status) == {pool_id}
    return runs["text"]


@when("its log is read")
def read_log(run: ServeRun) -> None:
    run.lines = []
    for raw in run.stderr.splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(raw)
            if isinstance(doc, dict):
                run.lines.append(doc)
    assert run.stderr.strip()


def _pool_lines(run: ServeRun, pool_id: str | None = None) -> list[dict[str, Any]]:
    lines = [r for r in run.lines if r.get("logger") == "poolmgr.pool"]
    return [r for r in lines if pool_id is None or r.get("pool_id") == pool_id]


def _said(run: ServeRun, pool_id: str, text: str) -> list[dict[str, Any]]:
    return [r for r in _pool_lines(run, pool_id) if text in str(r["message"])]


@then("every line that names a pool carries that pool's pool_id")
def lines_name_their_pool(run: ServeRun) -> None:
    naming = [(p, r) for r in run.lines for p in run.status if str(r["message"]).startswith(f"pool {p}")]
    assert len(naming) > 10
    assert all(r.get("pool_id") == p for p, r in naming), [r for p, r in naming if r.get("pool_id") != p]


@then("both pools have lines")
def both_pools(run: ServeRun) -> None:
    assert _pool_lines(run, GOOD) and _pool_lines(run, BAD)


@then(parsers.parse('every lifecycle line of a pool carries {name} "{value}"'))
def every_line_carries(run: ServeRun, name: str, value: str) -> None:
    lines = _pool_lines(run)
    assert len(lines) > 10 and all(r.get(name) == value for r in lines), [r for r in lines if r.get(name) != value]


@then("every line with a pool_id, isolation and spawn lines included, carries engine, engine_version and device_mask")
def every_pool_line_has_fields(run: ServeRun) -> None:
    lines = [r for r in run.lines if r.get("pool_id")]
    assert {r["logger"] for r in lines} >= {"poolmgr.pool", "poolmgr.isolation._prepare", "poolmgr.engines._process"}
    for r in lines:
        assert r.get("engine") == "llamacpp" and r.get("device_mask") == "cpu" and "engine_version" in r, r


@then(parsers.parse('the isolation and spawn lines of "{pool_id}" are among them'))
def isolation_and_spawn_lines(run: ServeRun, pool_id: str) -> None:
    mine = [r for r in run.lines if r.get("pool_id") == pool_id]
    assert [r for r in mine if "engine isolation" in r["message"] and r["logger"] == "poolmgr.isolation._prepare"]
    spawned = [r for r in mine if r["message"].startswith("spawned engine pid")]
    assert len(spawned) == 2  # the first start and the restart after the kill
    # engine_version is null before the first ready, and known on the restart's spawn line
    assert spawned[0]["engine_version"] is None and spawned[1]["engine_version"] == "b11434-fake"


@then(parsers.parse('the lines saying "{pool_id}" is ready carry the engine_version its status reports'))
def ready_version(run: ServeRun, pool_id: str) -> None:
    version = run.status[pool_id]["engine_version"]
    ready = _said(run, pool_id, " ready at ")
    assert version == "b11434-fake" and len(ready) == 2
    assert all(r["engine_version"] == version for r in ready)


@then(parsers.parse('the restart lines of "{bad}" and "{good}" carry the restart_count of their retry audit rows'))
def restart_counts(run: ServeRun, bad: str, good: str) -> None:
    for pool_id in (bad, good):
        expected = [e.restart_count for e in run.rows(pool_id, "retry")]
        assert expected == [1]
        assert [r["restart_count"] for r in _said(run, pool_id, "restarting")] == expected


@then("the backoff lines of both pools carry the backoff_ms of their back_off audit rows")
def backoff_values(run: ServeRun) -> None:
    for pool_id in (GOOD, BAD):
        expected = [e.backoff_ms for e in run.rows(pool_id, "back_off")]
        assert len(expected) == 1
        lines = _said(run, pool_id, "backing off")
        assert [r["backoff_ms"] for r in lines] == expected
        assert all(str(r["backoff_ms"]) in str(r["message"]) for r in lines)


@then("the backoff lines of both pools carry a next_restart_at backoff_ms after the line")
def backoff_next_restart(run: ServeRun) -> None:
    for pool_id in (GOOD, BAD):
        for line in _said(run, pool_id, "backing off"):
            due = datetime.fromisoformat(line["next_restart_at"])
            written = datetime.fromisoformat(line["timestamp"])
            assert abs((due - written).total_seconds() * 1000 - line["backoff_ms"]) < 1000, line


@then(parsers.parse('the crash line of "{pool_id}" carries signal 9, no exit_code and the engine\'s uptime'))
def crash_fields(run: ServeRun, pool_id: str) -> None:
    (line,) = _said(run, pool_id, "engine crashed")
    assert line["signal"] == 9 and line["exit_code"] is None and line["level"] == "error"
    assert 0 < line["uptime_s"] < 60


@then(
    parsers.parse(
        'the circuit breaker line of "{pool_id}" is critical and carries its old and new state and failure count'
    )
)
def breaker_fields(run: ServeRun, pool_id: str) -> None:
    (line,) = _said(run, pool_id, "circuit breaker open")
    (opened,) = run.rows(pool_id, "open_breaker")
    assert (
        line["level"] == "critical" and line["from_state"] == opened.from_state and line["to_state"] == "breaker-open"
    )
    assert line["consecutive_failures"] == THRESHOLD


@then(parsers.parse('the drain of "{pool_id}" started with a warning saying 1 lease was still held'))
def drain_warning(run: ServeRun, pool_id: str) -> None:
    (line,) = _said(run, pool_id, "draining with")
    assert line["level"] == "warning" and line["active_leases"] == 1 and "1 lease(s) still held" in line["message"]


@then(parsers.parse('"{pool_id}" is breaker-open with a last_error naming the isolation failure'))
def noiso_breaker(run: ServeRun, pool_id: str) -> None:
    status = run.status[pool_id]
    assert status["state"] == "breaker-open"
    assert "cannot isolate the engine" in status["last_error"] and "work" in status["last_error"], status


@then("its isolation failed exactly as often as the breaker threshold, with reason isolation_error")
def noiso_failures(run: ServeRun) -> None:
    failures = run.rows(NOISO, "preload_failed")
    assert len(failures) == THRESHOLD and {e.reason for e in failures} == {"isolation_error"}


@then("exactly one line of the log carries a traceback")
def one_traceback(run: ServeRun) -> None:
    traced = [r for r in run.lines if "exception" in r]
    assert len(traced) == 1 and "Traceback" in traced[0]["exception"], traced
    assert traced[0]["pool_id"] == NOISO and traced[0]["reason"] == "isolation_error"


@then(parsers.parse('the preload failure lines of "{pool_id}" carry the last_error of its audit rows'))
def preload_failures(run: ServeRun, pool_id: str) -> None:
    expected = [(e.detail or {})["message"] for e in run.rows(pool_id, "preload_failed")]
    assert len(expected) == 2
    assert [r["last_error"] for r in _said(run, pool_id, "preload failed")] == expected


@then(parsers.parse('the crash line of "{pool_id}" carries the last_error of its crash'))
def crash_line(run: ServeRun, pool_id: str) -> None:
    (crash,) = run.rows(pool_id, "crashed")
    (line,) = _said(run, pool_id, "engine crashed")
    assert line["last_error"] == (crash.detail or {})["message"] and line["level"] == "error"


@then(parsers.parse('the circuit breaker line of "{pool_id}" carries its last_error'))
def breaker_line(run: ServeRun, pool_id: str) -> None:
    (line,) = _said(run, pool_id, "circuit breaker open")
    assert line["last_error"] == run.status[pool_id]["last_error"] and line["last_error"]


@then("every line is one JSON object with an ISO-8601 timestamp, a level and a message")
def all_json(run: ServeRun) -> None:
    raw = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(raw) == len(run.lines) > 20
    for doc in run.lines:
        assert datetime.fromisoformat(doc["timestamp"]).utcoffset() is not None
        assert doc["level"] in ("debug", "info", "warning", "error", "critical") and doc["message"]


@then(parsers.parse('no line is JSON and the backoff line of "{pool_id}" says "{first}" and "{second}"'))
def text_lines(run: ServeRun, pool_id: str, first: str, second: str) -> None:
    raw = [line for line in run.stderr.splitlines() if line.strip()]
    assert raw and run.lines == []
    backoff = [line for line in raw if f"pool {pool_id} backing off" in line]
    assert len(backoff) == 1 and first in backoff[0] and second in backoff[0]
