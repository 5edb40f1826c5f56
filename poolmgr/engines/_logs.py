"""Per-pool engine log files: size-based rotation before a spawn, and tailing a log for a pattern."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

DEFAULT_LOG_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_LOG_KEEP = 3
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


__all__ = ["DEFAULT_LOG_KEEP", "DEFAULT_LOG_MAX_BYTES", "redact_argv", "rotate_log"]
