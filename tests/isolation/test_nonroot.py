"""A poolmgr that is NOT root cannot switch user, yet every other layer still applies (and it says so)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import poolmgr
from poolmgr.isolation._seccomp import seccomp_unavailable_reason
from poolmgr.isolation._trampoline import landlock_abi

from .conftest import PROBE_PYTHON, TEST_ENGINE_USER

HERE = Path(__file__).parent
NOBODY = 65534


def _copy_code(dest: Path) -> None:
    """poolmgr (the parts isolation needs) and pyseccomp, where an unprivileged user can read them."""
    src = Path(poolmgr.__file__).parent
    (dest / "poolmgr").mkdir()
    for name in ("__init__.py", "errors.py", "poolsfile.py", "py.typed"):
        shutil.copy(src / name, dest / "poolmgr" / name)
    shutil.copytree(src / "isolation", dest / "poolmgr" / "isolation", ignore=shutil.ignore_patterns("__pycache__"))
    import pyseccomp

    shutil.copy(pyseccomp.__file__, dest / "pyseccomp.py")
    for name in ("nonroot_driver.py", "sandbox_probe.py"):
        shutil.copy(HERE / name, dest / name)


@pytest.fixture(scope="module", params=["python", "c"])
def nonroot_run(engine_ids: tuple[int, int], request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The driver's results, once through each spawner (the compiled one built in a cache of the user's own)."""
    if not shutil.which("setpriv") or not os.access(PROBE_PYTHON, os.X_OK):
        pytest.skip(f"needs setpriv and {PROBE_PYTHON} to play an unprivileged poolmgr")
    if request.param == "c" and not shutil.which(os.environ.get("CC", "cc").split()[0]):
        pytest.skip("no C compiler on this host")
    tmp = Path(tempfile.mkdtemp(prefix="poolmgr-nonroot-", dir="/tmp"))
    try:
        os.chmod(tmp, 0o755)
        _copy_code(tmp)
        root, cache = tmp / "engines", tmp / "cache"
        for path in (root, cache):
            path.mkdir()
            os.chown(path, NOBODY, NOBODY)
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            target = listener.getsockname()[1]
            args = [str(root), "nonroot", TEST_ENGINE_USER, str(tmp / "sandbox_probe.py"), str(target)]
            cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all"]
            cmd += [PROBE_PYTHON, str(tmp / "nonroot_driver.py"), *args]
            env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp), "POOL_MANAGERD_API_TOKEN": "s3cret"}
            env.update({"XDG_CACHE_HOME": str(cache)} if request.param == "c" else {"POOL_MANAGERD_SPAWNER": "python"})
            out = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        yield json.loads(out.stdout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_nonroot_poolmgr_runs_the_engine_through_the_spawner_it_says(
    nonroot_run: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    spawner = request.node.callspec.params["nonroot_run"]
    assert nonroot_run["spawner"] == spawner
    assert nonroot_run["argv0"].endswith("/poolmgr-spawn" if spawner == "c" else "python3")


def test_nonroot_poolmgr_says_it_cannot_switch_user(nonroot_run: dict[str, Any]) -> None:
    in_force, detail = nonroot_run["layers"]["user"]
    assert not in_force
    assert "not root" in detail and f"uid {NOBODY}" in detail
    assert nonroot_run["status"]["Uid"].split() == [str(NOBODY)] * 4


def test_nonroot_engine_still_has_no_capabilities_and_no_new_privs(nonroot_run: dict[str, Any]) -> None:
    status = nonroot_run["status"]
    for field in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(status[field], 16) == 0
    assert status["NoNewPrivs"] == "1"
    in_force, detail = nonroot_run["layers"]["capabilities"]
    assert in_force and "bounding set kept" in detail  # dropping it needs CAP_SETPCAP


def test_nonroot_engine_still_gets_seccomp(nonroot_run: dict[str, Any]) -> None:
    if why := seccomp_unavailable_reason():
        pytest.skip(f"seccomp unavailable: {why}")
    assert nonroot_run["status"]["Seccomp"] == "2"
    for kind in ("tcp_socket", "udp_socket", "tcp6_socket", "udp6_socket"):
        assert nonroot_run["probe"][kind] == "EPERM", kind
    assert nonroot_run["probe"]["ptrace"] == "EPERM"


def test_nonroot_engine_still_gets_landlock_and_its_workdir(nonroot_run: dict[str, Any]) -> None:
    abi = landlock_abi()
    if abi < 1:
        pytest.skip("kernel has no Landlock")
    probe = nonroot_run["probe"]
    assert probe["write_outside"] == "EACCES"
    assert probe["unix_serve_workdir"] == "ok" and probe["unix_bind_outside"] == "EACCES"
    assert ("no TCP bind or connect" in nonroot_run["layers"]["landlock"][1]) == (abi >= 4)
    assert nonroot_run["cwd"].endswith("/engines/nonroot")


def test_nonroot_cgroup_is_skipped_with_a_reason(nonroot_run: dict[str, Any]) -> None:
    in_force, detail = nonroot_run["layers"]["cgroup"]
    assert not in_force
    assert "cannot create" in detail or "no " in detail  # "cannot create: Permission denied" on v1
