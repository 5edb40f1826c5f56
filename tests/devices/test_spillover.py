"""Spillover detection on fixture snapshots with the process lists NVML recorded for real engines."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from poolmgr.devices import (
    CPU_SPILLOVER_MARKERS,
    DeviceMask,
    FakeNvmlBackend,
    descendant_pids,
    discover,
    engine_on_gpus,
    find_foreign_gpus,
    stderr_shows_cpu_spillover,
)

from .gpu_fixtures import LLAMA_DIR, LLAMA_PROBE, load_json

MIB = 1024**2


def _procs(case: str) -> list[tuple[int, int]]:
    return [(p["pid"], p["used_mib"] * MIB) for p in load_json(LLAMA_PROBE)[case]["nvml_procs"]]


def _engine_pid(case: str) -> int:
    return int(load_json(LLAMA_PROBE)[case]["engine_pid"])


def test_engine_on_its_masked_gpu_is_seen_and_not_foreign(hetero_backend: FakeNvmlBackend) -> None:
    gpus = discover(hetero_backend).devices
    mask = DeviceMask.parse("0").uuids(gpus)
    hetero_backend.set_processes(mask[0], _procs("cuda_uuid_mask"))
    devices = discover(hetero_backend).devices
    pids = {_engine_pid("cuda_uuid_mask")}
    assert engine_on_gpus(pids, mask, devices)
    assert find_foreign_gpus(pids, mask, devices) == []


def test_engine_with_no_gpu_visible_is_cpu_spillover(hetero_backend: FakeNvmlBackend) -> None:
    """Recorded: CUDA_VISIBLE_DEVICES="" with -ngl 99 served on the CPU, NVML listed nothing."""
    mask = DeviceMask.parse("0").uuids(discover(hetero_backend).devices)
    hetero_backend.set_processes(mask[0], _procs("no_gpu_visible_ngl99"))
    devices = discover(hetero_backend).devices
    assert not engine_on_gpus({_engine_pid("no_gpu_visible_ngl99")}, mask, devices)


def test_a_descendant_on_a_gpu_outside_the_mask_is_foreign(hetero_backend: FakeNvmlBackend) -> None:
    gpus = discover(hetero_backend).devices
    engine, child = 4757, 4800
    hetero_backend.set_processes(gpus[0].uuid, [(engine, 528 * MIB)])
    hetero_backend.set_processes(gpus[1].uuid, [(4242, 1542 * MIB), (child, 528 * MIB)])
    devices = discover(hetero_backend).devices
    assert find_foreign_gpus({engine, child}, [gpus[0].uuid], devices) == [(child, gpus[1].uuid)]
    # the unrelated pid 4242 of the snapshot is nobody's spillover
    assert find_foreign_gpus({engine}, [gpus[0].uuid], devices) == []


def test_any_gpu_use_by_a_cpu_pool_is_foreign(h100_backend: FakeNvmlBackend) -> None:
    uuid = discover(h100_backend).devices[0].uuid
    h100_backend.set_processes(uuid, [(77, 528 * MIB)])
    devices = discover(h100_backend).devices
    assert find_foreign_gpus({77}, [], devices) == [(77, uuid)]
    assert not engine_on_gpus({77}, [], devices)


def test_mig_engine_listed_on_the_parent_too_stays_inside_its_mask(hetero_backend: FakeNvmlBackend) -> None:
    gpus = discover(hetero_backend).devices
    parent, mig, other_mig = gpus[2], gpus[3], gpus[4]
    hetero_backend.set_processes(parent.uuid, [(9, 528 * MIB)])
    hetero_backend.set_processes(mig.uuid, [(9, 528 * MIB)])
    devices = discover(hetero_backend).devices
    assert engine_on_gpus({9}, [mig.uuid], devices)
    assert find_foreign_gpus({9}, [mig.uuid], devices) == []
    assert find_foreign_gpus({9}, [other_mig.uuid], devices) == [(9, mig.uuid)]


def test_cpu_spillover_markers_come_from_the_recorded_stderr() -> None:
    text = (LLAMA_DIR / "no-gpu-visible-stderr.txt").read_text(encoding="utf-8")
    assert all(marker in text for marker in CPU_SPILLOVER_MARKERS)
    assert stderr_shows_cpu_spillover(text)
    probe = load_json(LLAMA_PROBE)
    for case in ("no_gpu_visible_ngl99", "bad_mask_1_0"):
        assert stderr_shows_cpu_spillover("\n".join(probe[case]["stderr_gpu_lines"]))


@pytest.mark.parametrize("name", ["cuda-ok-stderr.txt", "oom-stderr.txt"])
def test_gpu_runs_do_not_look_like_spillover(name: str) -> None:
    assert not stderr_shows_cpu_spillover((LLAMA_DIR / name).read_text(encoding="utf-8"))


def _stat(pid: int, comm: str, ppid: int) -> str:
    return f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 0 0 0 0\n"


def test_descendant_pids_walks_the_ppid_tree(tmp_path: Path) -> None:
    tree = {10: ("engine", 1), 11: ("worker) S 1 (odd", 10), 12: ("grandchild", 11), 20: ("other", 1)}
    for pid, (comm, ppid) in tree.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(_stat(pid, comm, ppid), encoding="utf-8")
    (tmp_path / "self").mkdir()
    (tmp_path / "30").mkdir()  # vanished between listing and reading
    assert descendant_pids(10, proc=tmp_path) == {11, 12}
    assert descendant_pids(12, proc=tmp_path) == set()


def test_descendant_pids_on_the_real_proc() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys; subprocess.run(['sleep', '30'])"],
    )
    try:
        deadline = time.monotonic() + 10
        found: set[int] = set()
        while not found and time.monotonic() < deadline:
            found = descendant_pids(parent.pid)
            time.sleep(0.02)
        assert len(found) == 1
        [child] = found
        assert Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"
    finally:
        for pid in descendant_pids(parent.pid):
            subprocess.run(["kill", str(pid)], check=False)
        parent.kill()
        parent.wait()
