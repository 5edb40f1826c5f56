"""Rootless podman sets no resource limits on a cgroup v1/hybrid host: `validate` and `doctor` say so in one line
(validate only for container pools that ask for memory_max, cpu_max or pids_max)."""

from __future__ import annotations

from pathlib import Path

import pytest

from poolmgr import validation
from poolmgr.isolation import doctor
from poolmgr.isolation._doctor import ROOTLESS_V1_LIMITS
from poolmgr.poolsfile import parse_pools
from poolmgr.validation import validate_pools


def _pools(rootfs: Path, isolation: str) -> str:
    return (f'[[pool]]\nid = "c"\nmodel = "/m.gguf"\nruntime = "podman"\nrootfs = "{rootfs}"\n{isolation}'
            '[[pool]]\nid = "p"\nmodel = "/m.gguf"\n[pool.isolation]\nmemory_max = "1G"\n')  # fmt: skip


@pytest.fixture
def fake_podman(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "podman").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "podman").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    return tmp_path


@pytest.mark.parametrize("v2", [False, True])
def test_validate_warns_once_that_a_container_pools_limits_are_not_enforced_on_cgroup_v1(
    fake_podman: Path, monkeypatch: pytest.MonkeyPatch, v2: bool
) -> None:
    controllers = fake_podman / "cgroup.controllers"
    if v2:
        controllers.write_text("memory pids\n")
    monkeypatch.setattr(validation, "CGROUP2_CONTROLLERS", controllers)
    text = _pools(fake_podman, '[pool.isolation]\nmemory_max = "1G"\npids_max = 64\n')
    checked = validate_pools(parse_pools(text, source="pools.toml"), lambda: pytest.fail("no GPU pool"),
                             source="pools.toml")  # fmt: skip
    if v2:
        assert checked.warnings == []
    else:  # one line, naming the container pool only (a process pool's limits are poolmgr's own cgroup)
        (line,) = checked.warnings
        assert line.startswith("pools.toml: container pool(s) 'c':") and "'p'" not in line
        assert "not enforced" in line and "cgroup v1/hybrid" in line


def test_validate_says_nothing_for_a_container_pool_without_limits(
    fake_podman: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validation, "CGROUP2_CONTROLLERS", fake_podman / "no-such-file")
    checked = validate_pools(parse_pools(_pools(fake_podman, ""), source="pools.toml"),
                             lambda: pytest.fail("no GPU pool"), source="pools.toml")  # fmt: skip
    assert checked.warnings == []


def test_doctor_says_in_its_podman_row_that_limits_are_ignored_on_cgroup_v1(fake_podman: Path) -> None:
    v1 = next(r for r in doctor(cgroup_root=fake_podman) if r.name == "podman")
    assert v1.supported and ROOTLESS_V1_LIMITS in v1.detail and "\n" not in v1.detail
    (fake_podman / "cgroup.controllers").write_text("memory pids\n")
    v2 = next(r for r in doctor(cgroup_root=fake_podman) if r.name == "podman")
    assert v2.supported and ROOTLESS_V1_LIMITS not in v2.detail
