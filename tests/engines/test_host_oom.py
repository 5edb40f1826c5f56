"""Host out-of-memory is told apart from a plain SIGKILL: a real kernel OOM kill inside a small memory cgroup,
and the kernel-log evidence parsed from records in /dev/kmsg's format."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from poolmgr.engines import ExitInfo, LaunchRequest
from poolmgr.engines._procfs import CGROUP_ROOT, kmsg_reports_oom_kill

from ._support import Engines, fake_argv, fake_env

LIMIT_BYTES = 96 * 1024 * 1024


def _own_v1_memory_cgroup() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_ROOT / "memory" / path.lstrip("/")
    return None


@pytest.fixture
def small_memory_cgroup() -> Iterator[Path]:
    """A cgroup v1 memory child of our own cgroup, limited to 96 MiB (there is no swap to escape into)."""
    parent = _own_v1_memory_cgroup()
    if parent is None or not parent.is_dir():
        pytest.skip("no cgroup v1 memory controller here (the kmsg parsing test still runs)")
    group = parent / f"poolmgr-test-oom-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(LIMIT_BYTES))
        with contextlib.suppress(OSError):
            (group / "memory.memsw.limit_in_bytes").write_text(str(LIMIT_BYTES))
    except OSError as exc:
        with contextlib.suppress(OSError):
            group.rmdir()
        pytest.skip(f"cannot create a memory cgroup: {exc.strerror}")
    yield group
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            group.rmdir()
            break
        except OSError:
            time.sleep(0.05)


def test_kernel_oom_kill_is_reported_as_host_oom(
    engines: Engines, fake_model: Path, small_memory_cgroup: Path, sock: Path
) -> None:
    if kmsg_reports_oom_kill(os.getpid(), 0) is None and not os.access("/dev/kmsg", os.R_OK):
        pytest.skip("/dev/kmsg is not readable: only the cgroup counter would tell")
    procs = small_memory_cgroup / "cgroup.procs"

    def into_cgroup(argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs), *argv], env

    req = LaunchRequest(
        argv=fake_argv(fake_model, sock),
        env=fake_env(FAKE_ENGINE_MODE="hog"),
        log_path=engines.tmp_path / "hog.log",
        wrap=into_cgroup,
    )
    engine = engines.launcher.spawn(req)
    engines.spawned.append(engine)
    info = asyncio.run(asyncio.wait_for(engines.launcher.wait_exit(engine.pid, engine.start_time), 30))
    assert info == ExitInfo(code=None, signal=signal.SIGKILL, host_oom=True), engines.log_text(engine)
    assert "OOM killer" in info.describe()
    assert "oom_kill 1" in (small_memory_cgroup / "memory.oom_control").read_text()


# Records as /dev/kmsg yields them (PRIORITY,SEQ,TIMESTAMP_US,FLAGS;message), one OOM kill of pid 4242 at
# 812.5 s since boot; start times are in clock ticks since boot.
KMSG = (
    "6,2101,812400000,-;python3 invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0\n"
    "6,2140,812500000,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,"
    "oom_memcg=/poolmgr-test-oom,task_memcg=/poolmgr-test-oom,task=python3,pid=4242,uid=0\n"
    "3,2141,812500100,-;Memory cgroup out of memory: Killed process 4242 (python3) total-vm:130000kB, "
    "anon-rss:96000kB, file-rss:4000kB, shmem-rss:0kB, UID:0 pgtables:300kB oom_score_adj:0\n"
)


def test_kernel_log_names_the_victim_only_if_it_was_killed_after_it_started(tmp_path: Path) -> None:
    kmsg = tmp_path / "kmsg"
    kmsg.write_text(KMSG)
    ticks = os.sysconf("SC_CLK_TCK")
    started_before = 800 * ticks
    started_after = 900 * ticks  # an older process with the same pid was the victim, not this one
    assert kmsg_reports_oom_kill(4242, started_before, kmsg=kmsg) is True
    assert kmsg_reports_oom_kill(4242, started_after, kmsg=kmsg) is False
    assert kmsg_reports_oom_kill(424, started_before, kmsg=kmsg) is False
    assert kmsg_reports_oom_kill(4242, started_before, kmsg=tmp_path / "unreadable") is None
