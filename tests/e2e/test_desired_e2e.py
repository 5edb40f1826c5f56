"""Desired state with a real serve and real llama-servers: SIGHUP re-reads the pools file, `poolmgr apply -f`
and `poolmgr pool rm` (another process) are followed within a heartbeat, an id of another node is refused in
one line with exit 2 — and no pool that was not changed restarts."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import kill_engines, pools_toml

pytestmark = pytest.mark.e2e


def _cli(srv: Any, *args: str, node_id: str = "node-a") -> subprocess.CompletedProcess[str]:
    env = {**srv.env, "POOL_MANAGERD_NODE_ID": node_id}
    return subprocess.run([sys.executable, "-m", "poolmgr.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def _gone(srv: Any, pool_id: str) -> bool:
    return srv.request("GET", f"/pools/{pool_id}/status").status_code == 404


def test_sighup_apply_and_pool_rm_change_only_what_they_name(
    serve_factory: Any, db_url: str, tiny_model: Path, tmp_path: Path
) -> None:
    srv = serve_factory(db_url, POOL_MANAGERD_NODE_ID="node-a", POOL_MANAGERD_NODE_HEARTBEAT_MS="200",
                        POOL_MANAGERD_NODE_GRACE_MS="2000")  # fmt: skip
    keep, other = {"id": "keep", "model": str(tiny_model)}, {"id": "hup", "model": str(tiny_model)}
    srv.write_pools(keep)
    srv.start()
    kept_pid = srv.wait_state("keep", "ready")["pid"]

    srv.write_pools(keep, other)  # SIGHUP: the pools file again
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_state("hup", "ready")

    applied = tmp_path / "applied.toml"  # poolmgr apply: the node's file pools become this file's
    applied.write_text(pools_toml(keep, {"id": "applied", "model": str(tiny_model), "slots": 2}))
    proc = _cli(srv, "apply", "-f", str(applied))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["add applied", "remove hup"]
    srv.wait_state("applied", "ready")
    assert _wait(lambda: _gone(srv, "hup"), 30), "a pool the applied file no longer names leaves the registry"

    proc = _cli(srv, "pool", "rm", "applied")
    assert proc.returncode == 0, proc.stderr
    assert _wait(lambda: _gone(srv, "applied"), 30)
    kinds = [e["kind"] for e in srv.events("keep")]
    assert srv.status("keep")["pid"] == kept_pid and "spec_updated" not in kinds  # untouched throughout

    clash = tmp_path / "clash.toml"  # another node naming node-a's pool: refused, one line, exit 2
    clash.write_text(pools_toml({"id": "keep", "model": str(tiny_model)}))
    proc = _cli(srv, "apply", "-f", str(clash), node_id="node-b")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "poolmgr: error: pool 'keep' belongs to node 'node-a': a node never changes another node's pool "
        "(move it by removing it there first: `poolmgr pool rm keep` on node-a)"
    ]
    assert srv.status("keep")["pid"] == kept_pid


def _wait(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(autouse=True)
def _no_stray_engines() -> Iterator[None]:
    yield
    kill_engines(["keep", "hup", "applied"])  # the serve_factory kills its pools file's; these came otherwise
