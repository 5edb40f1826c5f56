"""Fixtures of the observability tests: the fake llama-server in a directory the engine user can read, and
running stacks (stopped, with their engines, after each test)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from poolmgr.poolsfile import PoolSpec

from ._stack import EngineFiles, Stack, make_config

StackFactory = Callable[..., Stack]


@pytest.fixture(scope="session")
def engine_files() -> Iterator[EngineFiles]:
    root = Path(tempfile.mkdtemp(prefix="poolmgr-obs-"))
    yield EngineFiles(root)
    shutil.rmtree(root, ignore_errors=True)


def new_state_dir(files: EngineFiles) -> Path:
    path = Path(tempfile.mkdtemp(prefix="state-", dir=files.root))
    path.chmod(0o755)
    return path


@pytest.fixture
def stack_factory(engine_files: EngineFiles) -> Iterator[StackFactory]:
    started: list[Stack] = []

    def make(db_url: str, specs: Sequence[PoolSpec], *, state_dir: Path | None = None, **kw: object) -> Stack:
        env = {k: str(v) for k, v in kw.items() if k.startswith("POOL_MANAGERD_")}
        opts = {k: v for k, v in kw.items() if not k.startswith("POOL_MANAGERD_")}
        cfg = make_config(db_url, state_dir or new_state_dir(engine_files), engine_files.server, **env)
        stack = Stack(cfg, specs, **opts)  # type: ignore[arg-type]
        started.append(stack)
        return stack.start()

    yield make
    errors = []
    for stack in started:
        try:
            stack.stop()
        except AssertionError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
