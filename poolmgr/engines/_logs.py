"""Per-pool engine log files: size-based rotation before a spawn, and tailing a log for a pattern."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_LOG_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_LOG_KEEP = 3
_LISTEN_RE = re.compile(rb"listening on https?://(?:\[[^\]]*\]|[^\s/:\[\]]+):(\d+)")
_REDACT_FLAGS = frozenset({"--api-key", "--api-key-file", "--ssl-key-file", "--hf-token", "-hft"})


def rotate_log(path: Path, *, max_bytes: int = DEFAULT_LOG_MAX_BYTES, keep: int = DEFAULT_LOG_KEEP) -> bool:
    """When `path` has reached `max_bytes`, shift it to `path.1` (… up to `path.<keep>`, the oldest dropped).
    Returns whether it rotated."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size < max_bytes:
        return False
    if keep <= 0:
        path.unlink(missing_ok=True)
        return True
    _shift_generations(path, keep)
    os.replace(path, f"{path}.1")
    return True


def _shift_generations(path: Path, keep: int) -> None:
    """path.1 → path.2 … up to path.<keep>; the oldest is dropped, path.1 is free afterwards."""
    with contextlib.suppress(FileNotFoundError):
        Path(f"{path}.{keep}").unlink()
    for n in range(keep - 1, 0, -1):
        src = Path(f"{path}.{n}")
        if src.exists():
            os.replace(src, f"{path}.{n + 1}")


def rotate_log_in_place(path: Path, *, max_bytes: int = DEFAULT_LOG_MAX_BYTES, keep: int = DEFAULT_LOG_KEEP) -> bool:
    """Rotate the log of an engine that is still writing to it (copy, then truncate): its file descriptor is
    O_APPEND, so its next line lands at the start of the emptied file. A line written between the copy and the
    truncate can be lost; the alternative is an engine log that grows without limit."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size < max_bytes or keep <= 0:
        return False
    _shift_generations(path, keep)
    shutil.copyfile(path, f"{path}.1")
    with path.open("r+b") as fh:
        fh.truncate(0)
    return True


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with secret flag values replaced, fit for a log line."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag in _REDACT_FLAGS:
            out.append(f"{flag}=***" if eq else arg)
            hide_next = not eq
        else:
            out.append(arg)
    return out


async def tail_for_listen_port(
    log_path: Path,
    offset: int,
    deadline: float,
    *,
    still_running: Callable[[], bool] | None = None,
) -> int | None:
    """Read `log_path` from byte `offset` until a `listening on http://HOST:PORT` line appears; return the port.

    `deadline` is an absolute `time.monotonic()` value. Returns None at the deadline, or as soon as
    `still_running()` says the engine is gone and the log holds no such line. Polls every 2 ms for the first
    2 s (a tiny model is served ~40 ms after spawn: readiness is seen within a couple of ms of the engine's
    own), then eases to 50 ms for models that load for a long time.
    """
    buf = b""
    pos = offset
    delay = 0.002
    fast_until = time.monotonic() + 2.0
    while True:
        running = still_running() if still_running is not None else True
        chunk = _read_from(log_path, pos)
        pos += len(chunk)
        buf += chunk
        # Only whole lines: a read may end inside `...:4` of `...:42424`.
        complete = buf.rfind(b"\n") + 1
        match = _LISTEN_RE.search(buf, 0, complete)
        if match:
            return int(match.group(1))
        buf = buf[complete:][-4096:]
        if not running or time.monotonic() >= deadline:
            return None
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        if time.monotonic() > fast_until:
            delay = min(delay * 1.5, 0.05)


def _read_from(path: Path, pos: int) -> bytes:
    try:
        with path.open("rb") as fh:
            fh.seek(pos)
            return fh.read()
    except FileNotFoundError:
        return b""


__all__ = ["DEFAULT_LOG_KEEP", "DEFAULT_LOG_MAX_BYTES", "redact_argv", "rotate_log", "tail_for_listen_port"]
