"""The supervision scenarios of a process pool (features/supervision, features/lifecycle) for a
`runtime = "podman"` pool: real `poolmgr serve`, real rootless podman, a real llama-server in the container.

Crash → backoff → restart and re-adoption after kill -9 of serve are in test_container_pool.py; here: the
breaker opening after repeated failed starts and closing by hand once the model is fixed, a drain that stops
the container (none left in the engine user's podman), and reloads, to a good model and to a corrupt one that
rolls back to the old model, which serves again.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from poolmgr.engines.tiny_model import write_tiny_model
from poolmgr.isolation import container_name
from tests.e2e.conftest import engine_pids
from tests.e2e.container_support import completion, container_pool, containers, engine_rootfs

pytestmark = pytest.mark.e2e

START_S = 120  # a container start is podman's start plus the engine's: generous on a loaded 2-core CI machine
# A corrupt model fails with reason model_corrupt, read from the engine's stderr, for a container pool as for a
# process pool: even when the engine dies (~20 ms) before `podman inspect` has read its pid, the start is
# classified from the engine's own line after the spawn header.
_FAILED_START = ("model_corrupt",)


@pytest.fixture
def rootfs(llama_server: Path) -> Path:
    return engine_rootfs(llama_server)


@pytest.fixture(scope="session")
def other_model(shared_dir: Path) -> Path:
    path = write_tiny_model(shared_dir / "tiny-container-b.gguf", seed=1)
    path.chmod(0o644)
    return path


def _copy(src: Path, dest: Path) -> Path:
    """`src` at `dest`, readable by the engine user, replaced atomically (a container mounts the new file)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.chmod(0o644)
    os.replace(tmp, dest)
    return dest


def _log(srv: Any, pool_id: str) -> str:
    return str((srv.workdir / "state" / "logs" / f"{pool_id}.log").read_text(errors="replace"))


def _wait_events(srv: Any, pool_id: str, pred: Any, timeout: float, what: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = srv.events(pool_id)
        if pred(events):
            return events
        time.sleep(0.1)
    raise AssertionError(f"{what} not seen in {timeout}s: {[e['trigger'] for e in srv.events(pool_id)]}")


def test_a_container_pool_with_a_corrupt_model_opens_its_breaker_and_an_operator_closes_it_once_fixed(
    serve_factory: Any, sqlite_url: str, tiny_model: Path, corrupt_model: Path, shared_dir: Path, rootfs: Path
) -> None:
    model = _copy(corrupt_model, shared_dir / f"fixable-{uuid.uuid4().hex[:6]}.gguf")
    srv = serve_factory(sqlite_url, POOL_MANAGERD_CIRCUIT_BREAKER_THRESHOLD="2",
                        POOL_MANAGERD_CIRCUIT_BREAKER_TIMEOUT_SECS="3600")  # fmt: skip
    pool = container_pool(model, rootfs)
    pool_id = pool["id"]
    srv.write_pools(pool)
    srv.start()

    status = srv.wait_state(pool_id, "breaker-open", timeout=2 * START_S)
    events = srv.events(pool_id)
    failed = [e for e in events if e["kind"] == "preload_failed"]
    assert len(failed) == 2, [(e["kind"], e["reason"]) for e in events]
    assert all(e["reason"] in _FAILED_START for e in failed), [e["reason"] for e in failed]
    assert "invalid magic characters" in _log(srv, pool_id)  # the engine's own words, through conmon
    opened = [e for e in events if e["trigger"] == "open_breaker"]
    assert len(opened) == 1 and "2 consecutive failed starts" in opened[0]["reason"]
    assert status["last_error"], status
    time.sleep(1)  # no further attempt while the breaker is open, and nothing of the failed starts is left
    assert len(srv.events(pool_id)) == len(events) and srv.status(pool_id)["state"] == "breaker-open"
    assert engine_pids(pool_id) == [] and containers(srv, pool_id) == []

    _copy(tiny_model, model)  # the operator fixes the model, then closes the breaker
    resp = srv.request("POST", f"/pools/{pool_id}/breaker/reset")
    assert resp.status_code == 202, resp.text
    ready = srv.wait_state(pool_id, "ready", timeout=START_S)
    completion(ready["endpoint_url"])
    assert engine_pids(pool_id) == [ready["pid"]] and containers(srv, pool_id) == [container_name(pool_id)]
    reset = next(e for e in srv.events(pool_id) if e["trigger"] == "reset_breaker")
    assert reset["reason"] == "breaker reset by operator"


def test_a_drained_container_pool_stops_its_container_and_preload_starts_a_new_one(
    serve_factory: Any, sqlite_url: str, tiny_model: Path, rootfs: Path
) -> None:
    srv = serve_factory(sqlite_url)
    pool = container_pool(tiny_model, rootfs)
    pool_id = pool["id"]
    srv.write_pools(pool)
    srv.start()
    ready = srv.wait_state(pool_id, "ready", timeout=START_S)
    assert containers(srv, pool_id) == [container_name(pool_id)]

    resp = srv.request("POST", f"/pools/{pool_id}/drain", json={"deadline_ms": 60000})
    assert resp.status_code == 202, resp.text
    stopped = srv.wait_state(pool_id, "stopped", timeout=60)
    assert stopped["pid"] is None and not stopped["draining"]
    drained = [e for e in srv.events(pool_id) if e["kind"] == "drained"][-1]
    assert drained["detail"]["force_stopped"] is False
    assert engine_pids(pool_id) == [] and containers(srv, pool_id) == []  # the engine and its container gone

    assert srv.request("POST", f"/pools/{pool_id}/preload").status_code == 202
    again = srv.wait_for(pool_id, lambda s: s["state"] == "ready" and s["pid"] != ready["pid"], START_S, "ready")
    completion(again["endpoint_url"])
    assert containers(srv, pool_id) == [container_name(pool_id)]


def test_a_container_pool_reloads_to_a_good_model_and_rolls_back_from_a_corrupt_one(
    serve_factory: Any, sqlite_url: str, tiny_model: Path, other_model: Path, corrupt_model: Path, rootfs: Path
) -> None:
    srv = serve_factory(sqlite_url)
    pool = container_pool(tiny_model, rootfs)
    pool_id = pool["id"]
    srv.write_pools(pool)
    srv.start()
    first = srv.wait_state(pool_id, "ready", timeout=START_S)

    resp = srv.request("POST", f"/pools/{pool_id}/reload", json={"model": str(other_model)})
    assert resp.status_code == 202, resp.text
    switched = srv.wait_for(pool_id, lambda s: s["ready"] and s["model"] == str(other_model), START_S, "reloaded")
    assert switched["pid"] != first["pid"] and engine_pids(pool_id) == [switched["pid"]]
    ok = [e for e in srv.events(pool_id) if e["trigger"] == "preload_ok"][-1]
    assert ok["detail"]["reload_outcome"] == "success"
    completion(switched["endpoint_url"])

    resp = srv.request("POST", f"/pools/{pool_id}/reload", json={"model": str(corrupt_model)})
    assert resp.status_code == 202, resp.text
    _wait_events(srv, pool_id, lambda ev: any(e["trigger"] == "rollback" for e in ev), 2 * START_S, "a rollback")
    back = srv.wait_for(pool_id, lambda s: s["ready"], START_S, "ready after the rollback")
    assert back["model"] == str(other_model) and back["pid"] not in (first["pid"], switched["pid"])
    events = srv.events(pool_id)
    kinds = [e["kind"] for e in events]
    assert kinds.count("reload_requested") == 2 and "preload_failed" in kinds
    assert all(e["reason"] in _FAILED_START for e in events if e["kind"] == "preload_failed")
    assert [e for e in events if e["trigger"] == "preload_ok"][-1]["detail"]["reload_outcome"] == "rolled_back"
    completion(back["endpoint_url"])
    assert engine_pids(pool_id) == [back["pid"]] and containers(srv, pool_id) == [container_name(pool_id)]
