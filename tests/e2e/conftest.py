"""End-to-end fixtures: a real `poolmgr serve` subprocess with a real llama-server and a tiny real model.

Files the engine reads live in a 0755 directory (as root, engines run as an unprivileged user, who cannot
enter pytest's 0700 tmp dirs). Every engine started here carries POOLMGR_POOL=<id> in its environment; the
finalizers kill any such leftover, so a failing test never leaks processes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from poolmgr.engines._install import resolve_llama_server
from poolmgr.engines.tiny_model import write_tiny_model
from poolmgr.errors import EngineError

E2E_REQUIRED = os.environ.get("POOLMGR_TEST_E2E", "") == "required"
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_pids(pool_id: str | None = None) -> list[int]:
    """Processes carrying poolmgr's engine marker (for one pool, or any)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            env = (entry / "environ").read_bytes().split(b"\0")
            for item in env:
                if item.startswith(b"POOLMGR_POOL=") and (
                    pool_id is None or item == f"POOLMGR_POOL={pool_id}".encode()
                ):
                    found.append(int(entry.name))
    return found


def kill_engines(pool_ids: list[str]) -> None:
    for pool_id in pool_ids:
        for pid in engine_pids(pool_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def llama_server() -> Path:
    try:
        return resolve_llama_server(os.environ.get("POOL_MANAGERD_LLAMA_SERVER", ""))
    except EngineError as exc:
        if E2E_REQUIRED:
            pytest.fail(f"end-to-end tests are required (POOLMGR_TEST_E2E=required) but: {exc}")
        pytest.skip(f"no llama-server: {exc}")


@pytest.fixture(scope="session")
def shared_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="poolmgr-e2e-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(shared_dir: Path) -> Path:
    path = write_tiny_model(shared_dir / "tiny.gguf")
    path.chmod(0o644)
    return path


@pytest.fixture(scope="session")
def corrupt_model(shared_dir: Path) -> Path:
    path = shared_dir / "corrupt.gguf"
    path.write_bytes(b"NOTAGGUF" + b"\0" * 4096)
    path.chmod(0o644)
    return path


def pools_toml(*pools: dict[str, Any]) -> str:
    out = []
    for pool in pools:
        out.append("[[pool]]")
        for key, value in pool.items():
            if isinstance(value, bool):
                out.append(f"{key} = {str(value).lower()}")
            else:
                out.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
    return "\n".join(out) + "\n"


class Serve:
    """A `poolmgr serve` subprocess and a small HTTP client for its API."""

    def __init__(self, workdir: Path, db_url: str, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("POOL_MANAGERD_")},
            "POOL_MANAGERD_ADDR": f"127.0.0.1:{self.port}",
            "POOL_MANAGERD_STATE_DIR": str(workdir / "state"),
            "POOL_MANAGERD_DATABASE_URL": db_url,
            "POOL_MANAGERD_CONFIG": str(workdir / "pools.toml"),
            "POOL_MANAGERD_BACKOFF_INITIAL_MS": "50",
            "POOL_MANAGERD_BACKOFF_MAX_MS": "400",
            "POOL_MANAGERD_HEALTH_CHECK_INTERVAL_MS": "200",
            "POOL_MANAGERD_STOP_GRACE_MS": "2000",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "serve.log"
        self.pool_ids: list[str] = []
        self.headers: dict[str, str] = {}

    def write_pools(self, *pools: dict[str, Any]) -> None:
        self.pool_ids = [p["id"] for p in pools]
        (self.workdir / "pools.toml").write_text(pools_toml(*pools))

    def start(self, *args: str) -> Serve:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "poolmgr.cli", "serve", *args], env=self.env, stdout=log, stderr=log, cwd=REPO
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        raise AssertionError("serve did not answer /health in 30 s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        kw.setdefault("headers", self.headers)
        return httpx.request(method, self.base + path, timeout=30, **kw)

    def status(self, pool_id: str) -> dict[str, Any]:
        resp = self.request("GET", f"/pools/{pool_id}/status")
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    def events(self, pool_id: str) -> list[dict[str, Any]]:
        resp = self.request("GET", f"/pools/{pool_id}/events", params={"limit": 10000})
        assert resp.status_code == 200, resp.text
        return list(resp.json())

    def wait_for(self, pool_id: str, pred: Any, timeout: float = 30, what: str = "condition") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.status(pool_id)
            if pred(last):
                return last
            time.sleep(0.05)
        raise AssertionError(
            f"pool {pool_id}: {what} not reached in {timeout}s; last status {last}\n{self.log_path.read_text()[-3000:]}"
        )

    def wait_state(self, pool_id: str, state: str, timeout: float = 30) -> dict[str, Any]:
        return self.wait_for(pool_id, lambda s: s["state"] == state, timeout, f"state {state}")


@pytest.fixture
def serve_factory(shared_dir: Path, llama_server: Path) -> Iterator[Any]:
    started: list[Serve] = []

    def make(db_url: str, **env: str) -> Serve:
        workdir = Path(tempfile.mkdtemp(prefix="serve-", dir=shared_dir))
        workdir.chmod(0o755)
        srv = Serve(workdir, db_url, {"POOL_MANAGERD_LLAMA_SERVER": str(llama_server), **env})
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop(signal.SIGKILL)
        kill_engines(srv.pool_ids)
