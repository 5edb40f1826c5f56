"""A running engine's log is rotated in place: the engine keeps writing to its O_APPEND descriptor."""

from __future__ import annotations

import os
from pathlib import Path

from poolmgr.engines._logs import rotate_log_in_place


def test_rotating_in_place_keeps_old_lines_and_the_writer_continues_at_the_start(tmp_path: Path) -> None:
    log = tmp_path / "pool.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # how the launcher opens it
    try:
        os.write(fd, b"old line\n" * 200)
        assert rotate_log_in_place(log, max_bytes=1000, keep=2) is True
        os.write(fd, b"new line\n")
    finally:
        os.close(fd)
    assert (tmp_path / "pool.log.1").read_bytes() == b"old line\n" * 200
    assert log.read_bytes() == b"new line\n"


def test_a_small_log_is_left_alone_and_old_generations_shift(tmp_path: Path) -> None:
    log = tmp_path / "pool.log"
    log.write_bytes(b"x" * 10)
    assert rotate_log_in_place(log, max_bytes=1000, keep=2) is False
    (tmp_path / "pool.log.1").write_bytes(b"gen1")
    log.write_bytes(b"y" * 2000)
    assert rotate_log_in_place(log, max_bytes=1000, keep=2) is True
    assert (tmp_path / "pool.log.2").read_bytes() == b"gen1"
    assert (tmp_path / "pool.log.1").read_bytes() == b"y" * 2000
    assert log.read_bytes() == b""
