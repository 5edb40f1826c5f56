"""LogWatch (issue 19, item 3): a starting engine's ready line is seen when it is written — woken by inotify,
not found by polling. (The preload's use of it: tests/lifecycle/test_readiness.py.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from poolmgr.engines import LlamaCppAdapter, LogWatch, LogWatcher

MARKERS = LlamaCppAdapter.ready_markers


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def test_the_ready_line_wakes_the_waiter_when_it_is_written(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    log.write_bytes(b"--- poolmgr: spawn\nold run: srv  llama_server: model loaded\n")
    offset = log.stat().st_size  # this run's output starts here: the old run's line does not count

    async def scenario() -> tuple[bool, float]:
        watch = LogWatcher().watch(log, offset, MARKERS)
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
        with LogWatcher().watch(log, offset, MARKERS) as watch:  # type: ignore[union-attr]
            return watch.ready()

    assert asyncio.run(scenario())


def test_a_log_rotated_in_place_is_read_from_its_start(tmp_path: Path) -> None:
    log = tmp_path / "engine.log"
    log.write_bytes(b"x" * 4096)

    async def scenario() -> bool:
        with LogWatcher().watch(log, 4096, MARKERS) as watch:  # type: ignore[union-attr]
            assert not watch.ready()
            log.write_bytes(b"I srv  llama_server: model loaded\n")  # truncated and rewritten: smaller
            await watch.wait(1.0)
            return watch.ready()

    assert asyncio.run(scenario())


def test_no_watch_without_markers_or_without_the_file(tmp_path: Path) -> None:
    async def scenario() -> tuple[LogWatch | None, LogWatch | None]:
        watcher = LogWatcher()
        return watcher.watch(tmp_path / "engine.log", 0, MARKERS), watcher.watch(tmp_path, 0, ())

    assert asyncio.run(scenario()) == (None, None)


def test_one_instance_serves_many_engines_each_woken_by_its_own_log(tmp_path: Path) -> None:
    """The watches share one inotify instance (closing one costs an SRCU grace period in the kernel, ~13 ms):
    a write to one log wakes its own watch only, and a closed watch is removed without closing the instance."""
    logs = [tmp_path / f"{i}.log" for i in range(3)]
    for log in logs:
        log.write_bytes(b"")

    async def scenario() -> tuple[list[bool], list[bool], int]:
        watcher = LogWatcher()
        watches = [watcher.watch(log, 0, MARKERS) for log in logs]
        assert all(w is not None for w in watches)
        fd = watcher._fd
        _append(logs[1], b"I srv  llama_server: model loaded\n")
        await watches[1].wait(2.0)  # type: ignore[union-attr]
        woken = [w.grew.is_set() for w in watches]  # type: ignore[union-attr]
        ready = [w.ready() for w in watches]  # type: ignore[union-attr]
        watches[0].close()  # type: ignore[union-attr]
        later = watcher.watch(logs[0], 0, MARKERS)
        assert later is not None and watcher._fd == fd
        watcher.close()
        return woken, ready, fd

    woken, ready, fd = asyncio.run(scenario())
    assert woken == [False, True, False] and ready == [False, True, False] and fd >= 0
