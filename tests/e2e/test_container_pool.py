"""A `runtime = "podman"` pool served end to end by `poolmgr serve`, with real rootless podman and a real
llama-server in the container: preload → ready through the node's data plane (the engine's unix socket in its
mounted workdir), the engine sandboxed as seen from the host, a crash detected with its reason (conmon's exit
status), re-adoption after kill -9 of serve (the container outlives poolmgr), stop TERM → KILL."""

from __future__ import annotations

import os
import pwd
import signal
from pathlib import Path
from typing import Any

import pytest

from poolmgr.isolation import DEFAULT_ENGINE_USER
from tests.e2e.conftest import engine_pids
from tests.e2e.container_support import completion, container_pool, containers, engine_rootfs

pytestmark = pytest.mark.e2e


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


@pytest.fixture
def rootfs(llama_server: Path) -> Path:
    return engine_rootfs(llama_server)


def _container_pool(serve_factory: Any, db_url: str, tiny_model: Path, rootfs: Path) -> tuple[Any, str]:
    srv = serve_factory(db_url)
    pool = container_pool(tiny_model, rootfs)
    srv.write_pools(pool)
    return srv, str(pool["id"])


def _completion(ready: dict[str, Any]) -> None:
    completion(ready["endpoint_url"])


def _sandboxed(pid: int) -> None:
    status = _status(pid)
    engine_uid = pwd.getpwnam(DEFAULT_ENGINE_USER).pw_uid
    assert status["Uid"].split() == [str(engine_uid)] * 4
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"


def test_a_container_pool_serves_crashes_with_its_reason_is_readopted_and_stops(
    serve_factory: Any, sqlite_url: str, tiny_model: Path, rootfs: Path
) -> None:
    srv, pool_id = _container_pool(serve_factory, sqlite_url, tiny_model, rootfs)
    srv.start()
    ready = srv.wait_state(pool_id, "ready", timeout=120)
    _completion(ready)
    _sandboxed(ready["pid"])
    assert engine_pids(pool_id) == [ready["pid"]]  # the engine carries the pool's marker inside its container

    os.kill(ready["pid"], signal.SIGKILL)  # a crash: conmon keeps its status, poolmgr reads it
    again = srv.wait_for(pool_id, lambda s: s["state"] == "ready" and s["pid"] != ready["pid"], 120, "a restart")
    crash = next(e for e in srv.events(pool_id) if e["kind"] == "crashed")
    assert (crash["reason"], crash["signal"]) == ("signal", signal.SIGKILL), crash
    _completion(again)

    assert srv.stop(signal.SIGKILL) == -signal.SIGKILL  # the container outlives poolmgr ...
    assert engine_pids(pool_id) == [again["pid"]] and containers(srv, pool_id) == [f"poolmgr-{pool_id}"]
    srv.start()  # ... and the next serve adopts it: same pid, no new spawn
    srv.wait_for(pool_id, lambda _s: any(e["kind"] == "adopted" for e in srv.events(pool_id)), 60, "adoption")
    assert srv.status(pool_id)["pid"] == again["pid"]
    _completion(again)

    assert srv.stop(signal.SIGTERM) == 0  # stop: TERM (then KILL) the engine, the container removed
    assert engine_pids(pool_id) == []
    assert containers(srv, pool_id) == []
