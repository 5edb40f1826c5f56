"""Following a starting engine's log as it is written: its readiness line seen the moment it is written.

An engine says it is ready in its log (llama-server: `model loaded`, then `listening on …`). `LogWatcher` holds
one inotify instance for all the engines a runtime starts, registered once with the event loop; `watch()` adds
an IN_MODIFY watch on one engine's log and gives a `LogWatch`: every write of the engine wakes its waiter, which
reads only the new bytes and looks for the adapter's ready markers. So readiness is known within a wake-up of
the engine's own line, without polling the engine's socket every few milliseconds while it loads (on 2 cores
that polling slowed the engine's own start). One instance, not one per start: closing an inotify instance waits
for an SRCU grace period in the kernel (~13 ms here, on the event loop), removing a watch does not. Where inotify
is missing (`watch` gives None) the caller polls as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import struct
from pathlib import Path

_IN_MODIFY = 0x00000002
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then `len` bytes of name)
_READ_MAX = 1 << 20  # bytes of a log read per wake-up at most (a start's log is a few kB)

_libc = ctypes.CDLL(None, use_errno=True)


class LogWatcher:
    """One inotify instance, on the running event loop, shared by the watches of every starting engine."""

    def __init__(self) -> None:
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watches: dict[int, LogWatch] = {}

    def watch(self, path: Path, offset: int, markers: tuple[bytes, ...]) -> LogWatch | None:
        """A watch on `path` from byte `offset`, or None where inotify is unavailable (or no markers given).
        Call from the event loop; close the watch when done."""
        if not markers or not self._ready():
            return None
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(path), _IN_MODIFY)
        if wd < 0:
            return None
        watch = self._watches[wd] = LogWatch(self, wd, path, offset, markers)
        return watch

    def _ready(self) -> bool:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._fd >= 0:
            return True
        self.close()  # a new event loop (tests run several): the old one's registration is gone with it
        self._fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            return False
        loop.add_reader(self._fd, self._on_events)
        self._loop = loop
        return True

    def _on_events(self) -> None:
        data = b""
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(self._fd, 65536):
                data += chunk
        pos = 0
        while pos + _EVENT.size <= len(data):
            wd, _mask, _cookie, name_len = _EVENT.unpack_from(data, pos)
            pos += _EVENT.size + name_len
            watch = self._watches.get(wd)
            if watch is not None:
                watch.grew.set()

    def release(self, watch: LogWatch) -> None:
        if self._watches.get(watch.wd) is watch:  # (not a watch of an earlier instance that had the same number)
            del self._watches[watch.wd]
            _libc.inotify_rm_watch(self._fd, watch.wd)

    def close(self) -> None:
        """Drop the instance (poolmgr stopping, or its loop gone): ~13 ms in the kernel, once."""
        if self._fd < 0:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd, self._loop = -1, None
        self._watches.clear()


class LogWatch:
    """One starting engine's log: `ready()` tells whether a marker was written since `offset`."""

    def __init__(self, owner: LogWatcher, wd: int, path: Path, offset: int, markers: tuple[bytes, ...]) -> None:
        self._owner = owner
        self.wd = wd
        self._path = path
        self._pos = offset
        self._markers = markers
        self._keep = max(len(m) for m in markers) - 1  # a marker split across two writes
        self._tail = b""
        self._seen = False
        self.grew = asyncio.Event()

    @property
    def seen(self) -> bool:
        """A ready marker was read (`ready`)."""
        return self._seen

    def ready(self) -> bool:
        """Read what was written since the last look; True once a ready marker was among it (it stays True).
        A write after this read wakes the next `wait` at once (the wake-up is reset before the read)."""
        if self._seen:
            return True
        self.grew.clear()
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
            await asyncio.wait_for(self.grew.wait(), timeout)

    def close(self) -> None:
        self._owner.release(self)

    def __enter__(self) -> LogWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["LogWatch", "LogWatcher"]
