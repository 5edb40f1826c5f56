"""A `runtime = "podman"` pool served end to end by `poolmgr serve`, with real rootless podman and a real
llama-server in the container: preload → ready through the node's data plane (the engine's unix socket in its
mounted workdir), the engine sandboxed as seen from the host, a crash detected with its reason (conmon's exit
status), re-adoption after kill -9 of serve (the container outlives poolmgr), stop TERM → KILL."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from poolmgr.isolation import DEFAULT_ENGINE_USER, ensure_engine_user, ensure_subids
from tests.container_rootfs import minimal_rootfs
from tests.e2e.conftest import E2E_REQUIRED, engine_pids

pytestmark = pytest.mark.e2e


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


@pytest.fixture
def rootfs(llama_server: Path) -> Path:
    if shutil.which("podman") is None:
        if E2E_REQUIRED:
            pytest.fail("end-to-end tests are required but podman is not installed (.ci/run installs it)")
        pytest.skip("podman is not installed on this host")
    if os.geteuid() != 0:
        pytest.skip("needs root: podman runs as the engine user")
    uid, gid = ensure_engine_user(DEFAULT_ENGINE_USER)
    ensure_subids(DEFAULT_ENGINE_USER)  # what `poolmgr setup` does
    return minimal_rootfs(llama_server, uid, gid)


def _container_pool(serve_factory: Any, db_url: str, tiny_model: Path, rootfs: Path) -> tuple[Any, str]:
    srv = serve_factory(db_url)
    pool_id = f"pod-{uuid.uuid4().hex[:6]}"
    srv.write_pools({"id": pool_id, "model": str(tiny_model), "runtime": "podman", "rootfs": str(rootfs),
                     "slots": 1, "ctx_size": 512})  # fmt: skip
    return srv, pool_id


def _completion(ready: dict[str, Any]) -> None:
    resp = httpx.post(f"{ready['endpoint_url']}/completion", json={"prompt": "hello", "n_predict": 2}, timeout=30)
    assert resp.status_code == 200, resp.text


def _containers(srv: Any, pool_id: str) -> list[str]:
    """The pool's containers as its podman (the engine user's, with the pool's own storage) lists them."""
    home = srv.workdir / "state" / "work" / ".podman" / pool_id
    user = DEFAULT_ENGINE_USER
    cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "env", "-i", "PATH=/usr/bin:/bin",
           f"HOME={home}", "podman", f"--root={home / 'storage'}", "ps", "--all", "--format={{.Names}}"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd="/").stdout.split()


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
    assert engine_pids(pool_id) == [again["pid"]] and _containers(srv, pool_id) == [f"poolmgr-{pool_id}"]
    srv.start()  # ... and the next serve adopts it: same pid, no new spawn
    srv.wait_for(pool_id, lambda _s: any(e["kind"] == "adopted" for e in srv.events(pool_id)), 60, "adoption")
    assert srv.status(pool_id)["pid"] == again["pid"]
    _completion(again)

    assert srv.stop(signal.SIGTERM) == 0  # stop: TERM (then KILL) the engine, the container removed
    assert engine_pids(pool_id) == []
    assert _containers(srv, pool_id) == []
