"""Engine isolation as started by `poolmgr serve` running as root (B-SEC-001..003), and API security."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

TOKEN = "s3cret-token-for-tests-0123456789"


def _status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: poolmgr switches engines to the engine user only as root")
def test_engine_started_by_root_poolmgr_is_unprivileged_and_sandboxed(
    serve_factory: Any, sqlite_url: str, tiny_model: Path
) -> None:
    srv = serve_factory(sqlite_url, POOL_MANAGERD_API_TOKEN=TOKEN)
    srv.write_pools({"id": "iso", "model": str(tiny_model)})
    srv.start()
    srv.headers = {"Authorization": f"Bearer {TOKEN}"}
    pid = srv.wait_state("iso", "ready")["pid"]
    st = _status_fields(pid)
    uid = st["Uid"].split()
    gid = st["Gid"].split()
    assert all(u != "0" for u in uid) and all(g != "0" for g in gid)
    assert st["Groups"] == ""
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
        assert int(st[cap], 16) == 0, cap
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    workdir = Path(os.readlink(f"/proc/{pid}/cwd"))
    assert workdir == srv.workdir / "state" / "work" / "iso"
    assert (workdir.stat().st_mode & 0o777) == 0o700 and workdir.stat().st_uid == int(uid[0])
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert TOKEN.encode() not in environ
    assert b"POOL_MANAGERD_" not in environ


def test_token_guards_every_route_but_health_and_metrics(serve_factory: Any, sqlite_url: str, tiny_model: Path) -> None:
    srv = serve_factory(sqlite_url, POOL_MANAGERD_API_TOKEN=TOKEN)
    srv.write_pools({"id": "tok", "model": str(tiny_model)})
    srv.start()
    assert srv.request("GET", "/health").status_code == 200
    assert srv.request("GET", "/metrics").status_code in (200, 501)
    for method, path in [("GET", "/pools"), ("GET", "/pools/tok/status"), ("POST", "/pools/tok/drain")]:
        resp = srv.request(method, path)
        assert resp.status_code == 401, path
        assert resp.json()["error"]["type"] == "unauthorized"
    wrong = srv.request("GET", "/pools", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ok = srv.request("GET", "/pools", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()[0]["pool_id"] == "tok"
    srv.stop()
    log = srv.log_path.read_text()
    assert TOKEN not in log
    assert "api token sha256:" in log


def test_serve_refuses_a_non_loopback_address_without_a_token(tmp_path: Path) -> None:
    pools = tmp_path / "pools.toml"
    pools.write_text('[[pool]]\nid = "x"\nmodel = "/m.gguf"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOL_MANAGERD_")}
    env.update(POOL_MANAGERD_ADDR="0.0.0.0:9399", POOL_MANAGERD_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.run(
        [sys.executable, "-m", "poolmgr.cli", "serve", "--config", str(pools)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "refusing to serve on non-loopback address 0.0.0.0:9399 without POOL_MANAGERD_API_TOKEN" in lines[0]
    assert "Traceback" not in proc.stderr
