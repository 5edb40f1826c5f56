"""Operator commands talk to a running serve over its API: drain, preload, breaker-reset, reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e


def cli(srv: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "POOL_MANAGERD_ADDR": f"127.0.0.1:{srv.port}"}
    env.update({k: v for k, v in srv.env.items() if k == "POOL_MANAGERD_API_TOKEN"})
    return subprocess.run([sys.executable, "-m", "poolmgr.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_drain_preload_and_breaker_reset_from_the_command_line(
    serve_factory: Any, sqlite_url: str, tiny_model: Path
) -> None:
    srv = serve_factory(sqlite_url, POOL_MANAGERD_API_TOKEN="cli-token-123456")
    srv.headers = {"Authorization": "Bearer cli-token-123456"}
    srv.write_pools({"id": "tiny", "model": str(tiny_model)})
    srv.start()
    srv.wait_state("tiny", "ready")

    proc = cli(srv, "breaker-reset", "tiny")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "poolmgr: error: POST /pools/tiny/breaker/reset: 409: pool 'tiny': breaker is not open (state ready)"
    )

    proc = cli(srv, "drain", "tiny", "--deadline-ms", "0")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["accepted"] is True
    srv.wait_state("tiny", "stopped")

    proc = cli(srv, "preload", "tiny")
    assert proc.returncode == 0, proc.stderr
    srv.wait_state("tiny", "ready")

    proc = cli(srv, "reload", "tiny", "--model", str(tiny_model), "--drain-deadline-ms", "0")
    assert proc.returncode == 0, proc.stderr
    status = srv.wait_for("tiny", lambda s: s["ready"] and s["pending_op"] is None and s["restart_count"] == 0,
                          what="ready after reload")  # fmt: skip
    assert status["model"] == str(tiny_model)
    assert any(e["kind"] == "reload_requested" for e in srv.events("tiny"))


def test_an_operator_command_without_a_running_serve_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "POOL_MANAGERD_ADDR": "127.0.0.1:1"}
    proc = subprocess.run([sys.executable, "-m", "poolmgr.cli", "drain", "x"], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("poolmgr: error: cannot reach poolmgr at http://127.0.0.1:1/")
