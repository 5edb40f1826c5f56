"""Reading /proc, the memory cgroup and the kernel log (Linux): process identity and OOM-kill evidence.

A process is identified by (pid, start time): field 22 of /proc/PID/stat, clock ticks since boot. A pid
whose start time differs is another program that got the number again and must never be signalled.

Host out-of-memory evidence, best effort, in this order:
1. the kernel log (`/dev/kmsg`, readable by root or CAP_SYSLOG): `Killed process PID (...)` /
   `oom-kill:...,pid=PID,` name the victim exactly;
2. the memory cgroup's `oom_kill` counter (cgroup v2 `memory.events`, v1 `memory.oom_control`), read while
   the process lives and again after it died: it counts kills by the global and the cgroup OOM killer alike.
Both work as root on the development machines (cgroup v1 memory controller, /dev/kmsg readable).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
KMSG = Path("/dev/kmsg")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str
    pgrp: int
    session: int
    start_time: int

    @property
    def is_zombie(self) -> bool:
        return self.state in ("Z", "X", "x")


def read_stat(pid: int, *, proc: Path = PROC) -> ProcStat | None:
    """Parse /proc/PID/stat; None when the process does not exist."""
    try:
        raw = (proc / str(pid) / "stat").read_bytes().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.ENOENT):
            return None
        raise
    # comm (field 2) may hold spaces and parentheses: the fields after it start past the LAST ')'.
    rest = raw[raw.rfind(")") + 2 :].split()
    # rest[0] is field 3 (state): field N is rest[N - 3].
    return ProcStat(pid=pid, state=rest[0], pgrp=int(rest[2]), session=int(rest[3]), start_time=int(rest[19]))


def read_start_time(pid: int) -> int | None:
    stat = read_stat(pid)
    return stat.start_time if stat else None


def is_alive(pid: int, start_time: int) -> bool:
    """The same process (pid AND start time) still runs; a zombie counts as dead."""
    stat = read_stat(pid)
    return stat is not None and stat.start_time == start_time and not stat.is_zombie


def group_members(group: int, *, exclude_zombies: bool = True) -> list[ProcStat]:
    """Live processes in process group `group` or in session `group` (an engine is the leader of both)."""
    found: list[ProcStat] = []
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        stat = read_stat(int(entry.name))
        if stat is None or (exclude_zombies and stat.is_zombie):
            continue
        if stat.pgrp == group or stat.session == group:
            found.append(stat)
    return found


_OOM_LINE_RE = re.compile(r"oom_kill (\d+)")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def memory_cgroup_counter_file(pid: int) -> Path | None:
    """The file holding the `oom_kill` counter of the memory cgroup `pid` lives in, or None."""
    try:
        text = (PROC / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    v1: Path | None = None
    v2: Path | None = None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if "memory" in controllers.split(","):
            v1 = CGROUP_ROOT / "memory" / rel / "memory.oom_control"
        elif controllers == "":
            base = CGROUP_ROOT / "unified" if (CGROUP_ROOT / "unified").is_dir() else CGROUP_ROOT
            v2 = base / rel / "memory.events"
    for candidate in (v2, v1):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def read_oom_kill_count(counter_file: Path | None) -> int | None:
    if counter_file is None:
        return None
    try:
        match = _OOM_LINE_RE.search(counter_file.read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def kmsg_reports_oom_kill(pid: int, start_time: int, *, kmsg: Path = KMSG) -> bool | None:
    """Whether the kernel log names `pid` as an OOM-killer victim after it started (so an older process
    with the same number does not count); None when the log cannot be read."""
    victim = re.compile(rf"(Killed process {pid} \(|oom-kill:.*[,:]pid={pid},)")
    since_us = start_time * 1_000_000 // _CLK_TCK
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    found = False
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # records overwritten while reading: go on with the next
                    continue
                return None
            if not record:
                break
            # Only an OOM record can name a victim: the other hundreds are skipped without decoding them.
            if (b"Killed process" in record or b"oom-kill" in record) and _kmsg_match(
                record.decode("utf-8", "replace"), victim, since_us
            ):
                found = True
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return found


_KMSG_RECORD_RE = re.compile(r"^\d+,\d+,(\d+),[^;]*;(.*)$", re.MULTILINE)


def _kmsg_match(chunk: str, victim: re.Pattern[str], since_us: int) -> bool:
    # /dev/kmsg yields one record per read: `PRIORITY,SEQ,TIMESTAMP_US,FLAGS;message`.
    return any(int(stamp) >= since_us and victim.search(message) for stamp, message in _KMSG_RECORD_RE.findall(chunk))


__all__ = [
    "ProcStat",
    "group_members",
    "is_alive",
    "kmsg_reports_oom_kill",
    "memory_cgroup_counter_file",
    "read_oom_kill_count",
    "read_start_time",
    "read_stat",
]
