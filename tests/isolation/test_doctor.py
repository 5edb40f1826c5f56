"""`poolmgr doctor`: one row per mechanism, each matching what the host really offers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from poolmgr.isolation import LayerStatus, doctor, doctor_table, spawner_state
from poolmgr.isolation._cgroup import detect
from poolmgr.isolation._seccomp import seccomp_unavailable_reason
from poolmgr.isolation._trampoline import landlock_abi

NAMES = [
    "user switch",
    "capabilities",
    "no_new_privs",
    "seccomp",
    "landlock",
    "cgroup v2",
    "cgroup v1",
    "bubblewrap",
    "podman",
    "spawner",
]


def _rows() -> dict[str, LayerStatus]:
    return {row.name: row for row in doctor()}


def test_doctor_lists_every_mechanism_once_in_order() -> None:
    assert [row.name for row in doctor()] == NAMES


def test_doctor_rows_agree_with_the_host() -> None:
    rows = _rows()
    assert rows["user switch"].supported == (os.geteuid() == 0)
    abi = landlock_abi()
    assert rows["landlock"].supported == (abi >= 1)
    if abi:
        assert f"ABI {abi}" in rows["landlock"].detail
        assert ("no TCP bind or connect" in rows["landlock"].detail) == (abi >= 4)
    assert rows["seccomp"].supported == (seccomp_unavailable_reason() is None)
    if rows["seccomp"].supported:
        assert "no AF_INET/AF_INET6/AF_PACKET sockets" in rows["seccomp"].detail
    layout = detect()
    assert rows["cgroup v1"].supported == (layout.version == 1)
    assert rows["cgroup v2"].supported == (layout.version == 2 and bool(layout.controllers))
    assert rows["bubblewrap"].supported == (shutil.which("bwrap") is not None)
    assert rows["podman"].supported == (shutil.which("podman") is not None)
    state = spawner_state()
    assert (rows["spawner"].supported, rows["spawner"].detail) == (state.usable, state.detail)


def test_doctor_sees_cgroup_v2_on_a_unified_host(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    rows = {row.name: row for row in doctor(cgroup_root=tmp_path)}
    assert rows["cgroup v2"].supported and "memory cpu pids" in rows["cgroup v2"].detail
    assert not rows["cgroup v1"].supported


def test_doctor_table_prints_a_row_per_mechanism_with_yes_or_no() -> None:
    rows = doctor()
    table = doctor_table(rows).splitlines()
    assert len(table) == len(rows) + 2
    for row, line in zip(rows, table[2:], strict=True):
        assert line.startswith(row.name)
        assert (" yes " in line) == row.supported
        assert line.rstrip().endswith(row.detail)
