"""poolmgr under systemd: the unit `poolmgr setup --systemd` installs passes `systemd-analyze verify` and says what
docs/operations.md says (Type=notify, KillMode=process, SIGHUP reload); `serve` tells the notify socket READY=1
once it serves and STOPPING=1 when it stops."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("POOLMGR_TEST_E2E", "") == "required":
            pytest.fail(f"{tool} is required (POOLMGR_TEST_E2E=required) but not installed")
        pytest.skip(f"{tool} is not installed")
    return path


def test_setup_installs_a_unit_that_systemd_accepts(tmp_path: Path) -> None:
    analyze = _need("systemd-analyze")
    if os.geteuid() != 0:
        pytest.skip("poolmgr setup runs as root")
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOL_MANAGERD_")}
    env["POOL_MANAGERD_STATE_DIR"] = str(tmp_path / "state")
    proc = subprocess.run(
        [sys.executable, "-m", "poolmgr.cli", "setup", "--systemd", "--unit-dir", str(tmp_path / "units"),
         "--env-dir", str(tmp_path / "etc")],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    unit = tmp_path / "units" / "poolmgr.service"
    assert f"wrote {unit}" in proc.stdout
    spawner = next(ln for ln in proc.stdout.splitlines() if ln.startswith("engine spawner: "))
    assert "compiled helper /" in spawner or "Python trampoline" in spawner  # built now, not at the first start
    text = unit.read_text()
    for line in ("Type=notify", "KillMode=process", "ExecReload=/bin/kill -HUP $MAINPID", "StateDirectory=poolmgr"):
        assert line in text.splitlines(), line
    exec_start = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    assert Path(exec_start.split("=", 1)[1].split()[0]).is_file()  # the poolmgr that ran setup
    assert oct((tmp_path / "etc" / "poolmgr.env").stat().st_mode & 0o777) == "0o600"  # it may hold the token
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and "poolmgr.service" not in verify.stderr, verify.stderr


def test_serve_tells_systemd_ready_then_stopping(serve_factory: Any, sqlite_url: str, tiny_model: Path) -> None:
    sock_path = Path("/tmp") / f"poolmgr-notify-{os.getpid()}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        sock_path.unlink(missing_ok=True)
        listener.bind(str(sock_path))
        listener.settimeout(60)
        try:
            srv = serve_factory(sqlite_url, NOTIFY_SOCKET=str(sock_path))
            srv.write_pools({"id": "notified", "model": str(tiny_model)})
            srv.start()
            assert listener.recv(256) == b"READY=1"  # sent once the pools are registered and the API listens
            assert srv.request("GET", "/health").status_code == 200
            assert srv.stop(signal.SIGTERM) == 0
            assert listener.recv(256) == b"STOPPING=1"
        finally:
            sock_path.unlink(missing_ok=True)
