"""Per-pool cgroups: v2 layout (a directory modelled on cgroupfs) and v1 on this host's real hierarchies."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from poolmgr.isolation import _cgroup
from poolmgr.isolation._cgroup import CgroupLimits

LIMITS = CgroupLimits(memory_max_bytes=1 << 30, cpu_max=(50_000, 100_000), pids_max=64)


def _fake_v2(tmp_path: Path, pool_id: str, pool_controllers: str) -> Path:
    """What cgroupfs v2 shows: root controllers, and the ones the kernel enables in the pool's directory."""
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    pool = tmp_path / "poolmgr" / pool_id
    pool.mkdir(parents=True)
    (pool / "cgroup.controllers").write_text(pool_controllers + "\n")
    return pool


def test_v2_pool_cgroup_gets_every_limit(tmp_path: Path) -> None:
    pool = _fake_v2(tmp_path, "tiny", "cpu memory pids")
    handle = _cgroup.create("tiny", LIMITS, root=tmp_path)
    assert handle.version == 2
    assert handle.paths == (pool,)
    assert handle.procs_files == handle.join_files == (str(pool / "cgroup.procs"),)  # v2: no `tasks` to join by
    assert (pool / "memory.max").read_text() == str(1 << 30)
    assert (pool / "cpu.max").read_text() == "50000 100000"
    assert (pool / "pids.max").read_text() == "64"
    assert handle.notes == ()


def test_v2_limits_dropped_from_the_pool_file_are_reset_to_max(tmp_path: Path) -> None:
    pool = _fake_v2(tmp_path, "tiny", "cpu memory pids")
    _cgroup.create("tiny", LIMITS, root=tmp_path)
    _cgroup.create("tiny", CgroupLimits(), root=tmp_path)
    assert [(pool / f).read_text() for f in ("memory.max", "cpu.max", "pids.max")] == ["max"] * 3


def test_v2_missing_controller_is_reported_not_fatal(tmp_path: Path) -> None:
    pool = _fake_v2(tmp_path, "tiny", "memory")
    handle = _cgroup.create("tiny", LIMITS, root=tmp_path)
    assert handle.controllers == ("memory",)
    assert not (pool / "pids.max").exists()
    assert any("pids.max not set" in n for n in handle.notes)
    assert any("cpu.max not set" in n for n in handle.notes)


def test_detect_reports_nothing_usable_on_an_empty_root(tmp_path: Path) -> None:
    layout = _cgroup.detect(tmp_path)
    assert layout.version == 0
    with pytest.raises(FileNotFoundError):
        _cgroup.create("tiny", LIMITS, root=tmp_path)


def test_own_v1_path_reads_proc_self_cgroup(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu,cpuacct:/x\n0::/\n")
    assert _cgroup.own_v1_path("memory", proc) == "/process_api/abc"
    assert _cgroup.own_v1_path("cpu", proc) == "/x"
    assert _cgroup.own_v1_path("pids", proc) == "/"


@pytest.fixture
def v1_handle(pool_id: str) -> Iterator[_cgroup.CgroupHandle]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create cgroups")
    layout = _cgroup.detect()
    if layout.version != 1:
        pytest.skip(f"host is not on cgroup v1: {layout.detail}")
    handle = _cgroup.create(pool_id, LIMITS)
    yield handle
    _cgroup.remove(handle)


def test_v1_pool_cgroup_on_this_host_gets_the_limits(v1_handle: _cgroup.CgroupHandle, pool_id: str) -> None:
    by_ctrl = {c: p for c, p in zip(v1_handle.controllers, v1_handle.paths, strict=True)}
    for path in v1_handle.paths:
        assert path.name == pool_id and path.parent.name == "poolmgr"
    if "memory" in by_ctrl:
        assert int((by_ctrl["memory"] / "memory.limit_in_bytes").read_text()) == 1 << 30
    if "cpu" in by_ctrl:
        assert (by_ctrl["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"
        assert (by_ctrl["cpu"] / "cpu.cfs_period_us").read_text().strip() == "100000"
    if "pids" in by_ctrl:
        assert (by_ctrl["pids"] / "pids.max").read_text().strip() == "64"
    assert _cgroup.members(v1_handle) == []


def test_v1_remove_deletes_the_empty_pool_cgroup(v1_handle: _cgroup.CgroupHandle) -> None:
    _cgroup.remove(v1_handle)
    assert not any(p.exists() for p in v1_handle.paths)
    _cgroup.remove(v1_handle)  # a second removal is a no-op


@pytest.mark.skipif(os.geteuid() != 0 or _cgroup.detect().version != 1, reason="needs root on a cgroup v1 host")
def test_v1_is_joined_through_tasks_by_writing_0_without_the_global_lock() -> None:
    """The spawner writes "0" to each v1 `tasks` file: the writer alone moves, which skips the kernel's global
    threadgroup lock (an RCU grace period per spawn through cgroup.procs: 6 to 14 ms here). The process is then a
    member of each (its /proc/self/cgroup)."""
    handle = _cgroup.create(f"t-join-{os.getpid()}", CgroupLimits())
    try:
        assert handle.join_files == tuple(str(p / "tasks") for p in handle.paths)
        script = (  # the trampoline's own join (the compiled spawner's: tests/isolation/test_spawner.py)
            "import sys\nfrom poolmgr.isolation._trampoline import join_cgroups\n"
            "join_cgroups(sys.argv[1:])\nprint(open('/proc/self/cgroup').read())"
        )
        out = subprocess.run([sys.executable, "-c", script, *handle.join_files], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        for path in handle.paths:
            assert any(line.endswith(str(path).split("/", 5)[5]) for line in out.stdout.splitlines()), out.stdout
    finally:
        _cgroup.remove(handle)
