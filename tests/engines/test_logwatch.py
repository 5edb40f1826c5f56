"""LogWatch (issue 19, item 3): a starting engine's ready line is seen when it is written — woken by inotify,
not found by polling. (The preload's use of it: tests/lifecycle/test_readiness.py.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from poolmgr.engines import LlamaCppAdapter, LogWatch

MARKERS = LlamaCppAdapter.ready_markers


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def test_the_ready_line_wakes_the_waiter_when_it_is_written(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    log.write_bytes(b"--- poolmgr: spawn\nold run: srv  llama_server: model loaded\n")
    offset = log.stat().st_size  # this run's output starts here: the old run's line does not count

    async def scenario() -> tuple[bool, float]:
        watch = LogWatch.open(log, offset, MARKERS)
        assert watch is not None
        with watch:
            assert not watch.ready()
            loop = asyncio.get_running_loop()
            loop.call_later(0.05, _append, log, b"0.00.010.000 I load_tensors: loading\n")
            loop.call_later(0.2, _append, log, b"0.00.050.193 I srv  llama_server: model lo")
            loop.call_later(0.3, _append, log, b"aded\n")  # a line written in two pieces
            started, seen_at = time.monotonic(), None
            while seen_at is None and time.monotonic() - started < 5:
                await watch.wait(5.0)
                if watch.ready():
                    seen_at = time.monotonic() - started
            return watch.seen, seen_at or 99.0

    seen, after = asyncio.run(scenario())
    assert seen and 0.3 <= after < 0.35, after  # at the write that completed the line, not at a poll


def test_a_line_written_before_the_watch_opened_is_found_at_the_first_look(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    log.write_bytes(b"spawn header\n")
    offset = log.stat().st_size
    _append(log, b"I srv  llama_server: listening on unix:///x/engine.sock\n")

    async def scenario() -> bool:
        with LogWatch.open(log, offset, MARKERS) as watch:  # type: ignore[union-attr]
            return watch.ready()

    assert asyncio.run(scenario())


def test_a_log_rotated_in_place_is_read_from_its_start(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    log.write_bytes(b"x" * 4096)

    async def scenario() -> bool:
        with LogWatch.open(log, 4096, MARKERS) as watch:  # type: ignore[union-attr]
            assert not watch.ready()
            log.write_bytes(b"I srv  llama_server: model loaded\n")  # truncated and rewritten: smaller
            await watch.wait(1.0)
            return watch.ready()

    assert asyncio.run(scenario())


def test_no_watch_without_markers_or_without_the_file(tmp_path: Path) -> None:
    async def scenario() -> tuple[LogWatch | None, LogWatch | None]:
        return LogWatch.open(tmp_path / "engine.log", 0, MARKERS), LogWatch.open(tmp_path, 0, ())

    assert asyncio.run(scenario()) == (None, None)
