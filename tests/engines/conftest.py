"""Fixtures for the engines tests: a launcher box, a unix socket path for an engine, a model file for the fake
engine, the real llama-server and a tiny real model for the e2e tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from poolmgr.errors import EngineError

from ._support import SUN_PATH_MAX, Engines

E2E_REQUIRED = os.environ.get("POOLMGR_TEST_E2E", "") == "required"


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[Engines]:
    box = Engines(tmp_path)
    yield box
    box.cleanup()


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    """Where the test's engine listens: `e.sock` in tmp_path, or in a short /tmp directory when tmp_path is too
    long for a unix socket path."""
    path = tmp_path / "e.sock"
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield path
        return
    short = tempfile.mkdtemp(prefix="eng.", dir="/tmp")
    yield Path(short) / "e.sock"
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    """A file the fake engine accepts as a model (GGUF magic and a header's worth of bytes)."""
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    """The real llama-server (cache, POOL_MANAGERD_LLAMA_SERVER or PATH); skip when absent (fail in CI)."""
    from poolmgr.engines import resolve_llama_server

    try:
        return resolve_llama_server(os.environ.get("POOL_MANAGERD_LLAMA_SERVER", ""))
    except EngineError as exc:
        if E2E_REQUIRED:
            pytest.fail(f"end-to-end tests are required (POOLMGR_TEST_E2E=required) but: {exc}")
        pytest.skip("no llama-server binary (run `poolmgr engines install llamacpp`)")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from poolmgr.engines.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")
