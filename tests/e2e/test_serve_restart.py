"""A real llama-server outlives `poolmgr serve` (kill -9, or an upgrade with --keep-engines): the engine keeps
answering on its unix socket while poolmgr is away (the node's port — the data plane — is down meanwhile), and the
next `serve` adopts the same engine — same pid, no new spawn — and serves it at the same endpoint_url again."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import engine_pids

pytestmark = pytest.mark.e2e


class _Completions:
    """Completions against the engine itself (its unix socket), back to back, from a thread: any failure is
    downtime of the engine."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        transport = httpx.HTTPTransport(uds=str(self.socket_path))
        with httpx.Client(transport=transport, timeout=30, trust_env=False) as client:
            while not self._stop.is_set():
                try:
                    resp = client.post("http://engine/completion", json={"prompt": "hello", "n_predict": 2})
                    if resp.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{resp.status_code} {resp.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                time.sleep(0.05)

    def __enter__(self) -> _Completions:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def served_more(self, n: int, timeout: float = 30) -> bool:
        """Wait until `n` more completions succeed."""
        target, deadline = self.ok + n, time.monotonic() + timeout
        while self.ok < target and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.ok >= target


def _ready_pool(serve_factory: Any, db_url: str, tiny_model: Path, *args: str) -> tuple[Any, str, dict[str, Any]]:
    srv = serve_factory(db_url)
    pool_id = f"restart-{uuid.uuid4().hex[:6]}"
    srv.write_pools({"id": pool_id, "model": str(tiny_model), "device_mask": "cpu", "slots": 1, "ctx_size": 512})
    srv.start(*args)
    return srv, pool_id, srv.wait_state(pool_id, "ready", timeout=90)


def _socket(srv: Any, pool_id: str) -> Path:
    return Path(srv.workdir / "state" / "work" / pool_id / "engine.sock")


def _through_the_node(ready: dict[str, Any]) -> None:
    resp = httpx.post(f"{ready['endpoint_url']}/completion", json={"prompt": "hello", "n_predict": 2}, timeout=30)
    assert resp.status_code == 200, resp.text


def _spawns(srv: Any, pool_id: str) -> int:
    return int((srv.workdir / "state" / "logs" / f"{pool_id}.log").read_bytes().count(b"--- poolmgr "))


def _adopted_without_restart(srv: Any, pool_id: str, ready: dict[str, Any], spawns: int) -> None:
    srv.wait_for(pool_id, lambda _s: any(e["kind"] == "adopted" for e in srv.events(pool_id)), 30, "adoption")
    status = srv.status(pool_id)
    assert (status["state"], status["pid"], status["endpoint_url"]) == ("ready", ready["pid"], ready["endpoint_url"])
    events = srv.events(pool_id)
    adopted = [e for e in events if e["kind"] == "adopted"]
    assert len(adopted) == 1 and adopted[0]["detail"]["pid"] == ready["pid"]
    assert [e["trigger"] for e in events if e["trigger"]] == ["place", "start_preload", "preload_ok"]
    assert _spawns(srv, pool_id) == spawns
    assert engine_pids(pool_id) == [ready["pid"]]
    beat = srv.status(pool_id)["heartbeat_at"]
    srv.wait_for(pool_id, lambda s: s["heartbeat_at"] != beat, 10, "a health check of the adopted engine")


def test_kill_9_of_serve_leaves_the_engine_serving_and_the_next_serve_adopts_it(
    serve_factory: Any, db_url: str, tiny_model: Path
) -> None:
    srv, pool_id, ready = _ready_pool(serve_factory, db_url, tiny_model)
    spawns = _spawns(srv, pool_id)
    with _Completions(_socket(srv, pool_id)) as load:
        assert srv.stop(signal.SIGKILL) == -signal.SIGKILL
        assert load.served_more(3), f"no completions while poolmgr was away: {load.failures}"
        assert engine_pids(pool_id) == [ready["pid"]]
        srv.start()
        _adopted_without_restart(srv, pool_id, ready, spawns)
        _through_the_node(ready)
    assert load.failures == []
    assert srv.stop(signal.SIGTERM) == 0
    assert engine_pids(pool_id) == []


def test_keep_engines_exit_and_restart_is_an_upgrade_without_an_engine_restart(
    serve_factory: Any, sqlite_url: str, tiny_model: Path
) -> None:
    # One database is enough here: what the database does across a restart, the kill -9 test covers on both.
    srv, pool_id, ready = _ready_pool(serve_factory, sqlite_url, tiny_model, "--keep-engines")
    spawns = _spawns(srv, pool_id)
    with _Completions(_socket(srv, pool_id)) as load:
        assert srv.stop(signal.SIGTERM) == 0
        assert "keeps running for the next poolmgr" in srv.log_path.read_text()
        assert load.served_more(3), f"no completions while poolmgr was away: {load.failures}"
        assert engine_pids(pool_id) == [ready["pid"]]
        srv.start()
        _adopted_without_restart(srv, pool_id, ready, spawns)
        _through_the_node(ready)
        assert load.served_more(1)
    assert load.failures == []
    assert srv.stop(signal.SIGTERM) == 0  # this serve runs without --keep-engines: engines stop
    assert engine_pids(pool_id) == []
