"""`poolmgr serve` with a real llama-server and a real tiny model (issue 3's walking skeleton)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import engine_pids

pytestmark = pytest.mark.e2e


def test_pool_goes_discovered_placed_preloading_ready_and_serves_completions(
    serve_factory: Any, db_url: str, tiny_model: Path
) -> None:
    srv = serve_factory(db_url)
    srv.write_pools({"id": "tiny", "model": str(tiny_model), "device_mask": "cpu", "slots": 2, "ctx_size": 1024})
    srv.start()
    status = srv.wait_state("tiny", "ready")
    assert status["ready"] and status["live"] and not status["draining"]
    assert (status["slots_total"], status["slots_free"]) == (2, 2)
    assert status["engine_version"].startswith("b11434")
    assert status["pid"] in engine_pids("tiny")
    resp = httpx.post(
        status["endpoint_url"] + "/completion", json={"prompt": "hello", "n_predict": 8, "ignore_eos": True}, timeout=30
    )
    assert resp.status_code == 200
    assert resp.json()["tokens_predicted"] == 8
    transitions = [(e["from_state"], e["to_state"], e["trigger"]) for e in srv.events("tiny") if e["trigger"]]
    assert transitions == [
        ("discovered", "placed", "place"),
        ("placed", "preloading", "start_preload"),
        ("preloading", "ready", "preload_ok"),
    ]
    assert srv.stop(signal.SIGTERM) == 0
    assert engine_pids("tiny") == []


def test_unknown_pool_is_a_404_with_a_json_error(serve_factory: Any, sqlite_url: str, tiny_model: Path) -> None:
    srv = serve_factory(sqlite_url)
    srv.write_pools({"id": "tiny", "model": str(tiny_model)})
    srv.start()
    resp = srv.request("GET", "/pools/nope/status")
    assert resp.status_code == 404
    assert resp.json() == {"error": {"message": "pool 'nope' not found", "type": "not_found"}}
    health = srv.request("GET", "/health").json()
    assert health["status"] == "ok" and health["version"]


@pytest.mark.parametrize(
    ("model_name", "expected"),
    [
        pytest.param("missing.gguf", "failed to open GGUF file", id="missing-model"),
        pytest.param("corrupt.gguf", "invalid magic characters", id="corrupt-model"),
    ],
)
def test_a_bad_model_fails_preload_with_the_engines_own_line_and_nothing_left_running(
    serve_factory: Any, sqlite_url: str, shared_dir: Path, corrupt_model: Path, model_name: str, expected: str
) -> None:
    srv = serve_factory(sqlite_url, POOL_MANAGERD_BACKOFF_INITIAL_MS="60000", POOL_MANAGERD_BACKOFF_MAX_MS="60000")
    srv.write_pools({"id": "bad", "model": str(shared_dir / model_name)})
    srv.start()
    status = srv.wait_for("bad", lambda s: s["last_error"] is not None, what="last_error")
    assert expected in status["last_error"]
    assert status["pid"] is None and not status["ready"]
    failed = [e for e in srv.events("bad") if e["kind"] == "preload_failed"]
    assert failed and failed[0]["reason"] in ("model_missing", "model_corrupt", "model_load_failed")
    time.sleep(0.2)
    assert engine_pids("bad") == []


def test_a_missing_binary_fails_preload_clearly(serve_factory: Any, sqlite_url: str, tiny_model: Path) -> None:
    srv = serve_factory(sqlite_url, POOL_MANAGERD_LLAMA_SERVER="/nonexistent/llama-server")
    srv.write_pools({"id": "nobin", "model": str(tiny_model)})
    srv.start()
    status = srv.wait_for("nobin", lambda s: s["last_error"] is not None, what="last_error")
    assert "/nonexistent/llama-server" in status["last_error"]
    assert next(e["reason"] for e in srv.events("nobin") if e["kind"] == "preload_failed") == "binary_missing"
    assert engine_pids("nobin") == []


def test_serve_refuses_an_api_port_in_use_with_one_line(serve_factory: Any, sqlite_url: str, tiny_model: Path) -> None:
    first = serve_factory(sqlite_url)
    first.write_pools({"id": "tiny", "model": str(tiny_model)})
    first.start()
    second = serve_factory(sqlite_url, POOL_MANAGERD_ADDR=f"127.0.0.1:{first.port}")
    second.write_pools({"id": "other", "model": str(tiny_model)})
    with pytest.raises(AssertionError, match="serve exited 2"):
        second.start()
    assert f"cannot listen on 127.0.0.1:{first.port}: Address already in use" in second.log_path.read_text()
    assert engine_pids("other") == []
