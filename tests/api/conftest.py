"""Fixtures of the data plane's tests: a real llama-server on a unix socket (the tiny model, one thread), short
socket directories (a unix socket path has at most 107 bytes: pytest's tmp paths can be longer), and DataPlanes
served by uvicorn."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from poolmgr.engines._install import resolve_llama_server
from poolmgr.engines.tiny_model import write_tiny_model
from poolmgr.errors import EngineError

from ._plane import FakeEngine, Plane, fake_engines

E2E_REQUIRED = os.environ.get("POOLMGR_TEST_E2E", "") == "required"


def _short_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = _short_dir("pm-api-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def engine_socket() -> Iterator[str]:
    """A real llama-server (b11434) serving the tiny model on a unix socket, two slots, one thread."""
    try:
        binary = resolve_llama_server(os.environ.get("POOL_MANAGERD_LLAMA_SERVER", ""))
    except EngineError as exc:
        if E2E_REQUIRED:
            pytest.fail(f"end-to-end tests are required (POOLMGR_TEST_E2E=required) but: {exc}")
        pytest.skip(f"no llama-server: {exc}")
    workdir = _short_dir("pm-engine-")
    model = write_tiny_model(workdir / "tiny.gguf")
    sock = workdir / "engine.sock"
    argv = [str(binary), "-m", str(model), "--host", str(sock), "--threads", "1", "-c", "2048", "--parallel", "2"]
    with open(workdir / "engine.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        _wait_healthy(sock, proc, workdir / "engine.log")
        yield str(sock)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_healthy(sock: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"llama-server exited {proc.returncode}:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get("http://engine/health").status_code == 200:
                    return
            time.sleep(0.05)
    raise AssertionError(f"llama-server did not answer /health in 60 s:\n{log.read_text()[-2000:]}")


def engine_get(sock: str, path: str) -> Any:
    """GET `path` of the engine directly (not through poolmgr)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=10) as client:
        return client.get(f"http://engine{path}").json()


@pytest.fixture
def engine(sock_dir: Path) -> Iterator[FakeEngine]:
    """One fake engine, pool "a", on a unix socket."""
    with fake_engines(sock_dir, "a") as engines:
        yield engines["a"]


@pytest.fixture
def plane_factory() -> Iterator[Callable[..., Plane]]:
    planes: list[Plane] = []

    def make(*args: Any, **kw: Any) -> Plane:
        plane = Plane(*args, **kw)
        planes.append(plane)
        return plane

    yield make
    for plane in planes:
        plane.close()
