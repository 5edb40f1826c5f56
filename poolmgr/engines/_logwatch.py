"""Following a starting engine's log as it is written: its readiness line seen the moment it is written.

An engine says it is ready in its log (llama-server: `model loaded`, then `listening on …`). `LogWatch` holds an
inotify watch (IN_MODIFY) on the log file, registered with the event loop: every write of the engine wakes the
waiter, which reads only the new bytes and looks for the adapter's ready markers. So readiness is known within a
wake-up of the engine's own line, without polling the engine's socket every few milliseconds while it loads (on
2 cores that polling slowed the engine's own start). Where inotify is missing (`LogWatch.open` gives None) the
caller polls as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
from pathlib import Path

_IN_MODIFY = 0x00000002
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_READ_MAX = 1 << 20  # bytes read per wake-up at most (a start's log is a few kB)

_libc = ctypes.CDLL(None, use_errno=True)


class LogWatch:
    """Wakes when the log grows; `ready()` tells whether a marker was written since `offset`."""

    def __init__(self, fd: int, path: Path, offset: int, markers: tuple[bytes, ...]) -> None:
        self._fd = fd
        self._path = path
        self._pos = offset
        self._markers = markers
        self._keep = max((len(m) for m in markers), default=1) - 1  # a marker split across two writes
        self._tail = b""
        self._seen = False
        self._grew = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._on_event)

    @classmethod
    def open(cls, path: Path, offset: int, markers: tuple[bytes, ...]) -> LogWatch | None:
        """A watch on `path` from byte `offset`, or None where inotify is unavailable (or no markers given)."""
        if not markers:
            return None
        fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return None
        if _libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) < 0:
            os.close(fd)
            return None
        return cls(fd, path, offset, markers)

    def _on_event(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._fd, 4096):
                pass
        self._grew.set()

    @property
    def seen(self) -> bool:
        """A ready marker was read (`ready`)."""
        return self._seen

    def ready(self) -> bool:
        """Read what was written since the last look; True once a ready marker was among it (it stays True).
        A write after this read wakes the next `wait` at once (the wake-up is reset before the read)."""
        if self._seen:
            return True
        self._grew.clear()
        try:
            with open(self._path, "rb") as fh:
                if fh.seek(0, os.SEEK_END) < self._pos:
                    self._pos, self._tail = 0, b""  # rotated in place meanwhile
                fh.seek(self._pos)
                data = fh.read(_READ_MAX)
        except OSError:
            return False
        self._pos += len(data)
        window = self._tail + data
        self._seen = any(m in window for m in self._markers)
        self._tail = window[-self._keep :] if self._keep else b""
        return self._seen

    async def wait(self, timeout: float) -> None:
        """Until the log grows after the last `ready` (or `timeout` seconds pass)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._grew.wait(), timeout)

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)

    def __enter__(self) -> LogWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["LogWatch"]
