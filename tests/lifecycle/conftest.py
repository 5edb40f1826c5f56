"""A 0755 directory holding the fake llama-server (tests/fake_engine.py), a wrapper to run it as the engine
binary, and a tiny real GGUF: what the real reconciler needs to run pools in-process without llama-server.
(As root, engines run as an unprivileged user who cannot enter pytest's 0700 tmp dirs; the fixture creates that
user as `serve` does on its first start, so these tests do not depend on an earlier test having run `serve`.)"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from poolmgr.engines.tiny_model import write_tiny_model
from poolmgr.isolation import DEFAULT_ENGINE_USER, ensure_engine_user

FAKE_ENGINE = Path(__file__).resolve().parents[1] / "fake_engine.py"

MakeEngineDir = Callable[..., Path]


@pytest.fixture
def make_engine_dir() -> Iterator[MakeEngineDir]:
    if os.geteuid() == 0:
        ensure_engine_user(DEFAULT_ENGINE_USER)
    made: list[Path] = []

    def make(*, env: str = "") -> Path:
        """`env`: `NAME=value ...` set for the fake engine by its wrapper (poolmgr cleans engine environments)."""
        path = Path(tempfile.mkdtemp(prefix="poolmgr-fake-"))
        made.append(path)
        path.chmod(0o755)
        shutil.copy(FAKE_ENGINE, path / "fake_engine.py")
        (path / "fake_engine.py").chmod(0o644)
        wrapper = path / "llama-server"
        wrapper.write_text(
            f'#!/bin/sh\n{env + " " if env else ""}exec /usr/bin/python3 {path / "fake_engine.py"} "$@"\n'
        )
        wrapper.chmod(0o755)
        write_tiny_model(path / "tiny.gguf").chmod(0o644)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)
