"""Containers: the rootless podman command poolmgr builds, its seccomp profile, and (where podman exists) a run."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from poolmgr.errors import ConfigProblems
from poolmgr.isolation import doctor, podman_command, write_seccomp_profile
from poolmgr.isolation._podman import default_profile_path, seccomp_profile
from poolmgr.isolation._seccomp import ARG_RULES, DENIED_FAMILIES, DENIED_SYSCALLS
from poolmgr.poolsfile import parse_pools
from poolmgr.validation import PODMAN_MISSING, validate_pools

from .conftest import Sandbox, make_rootfs, podman_missing


def test_profile_denies_the_same_syscalls_as_the_process_sandbox() -> None:
    profile = seccomp_profile()
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    eperm = next(s for s in profile["syscalls"] if s["names"] == list(DENIED_SYSCALLS))
    assert eperm["action"] == "SCMP_ACT_ERRNO" and eperm["errnoRet"] == 1
    for name in ("ptrace", "mount", "unshare", "setns", "bpf", "keyctl", "perf_event_open", "userfaultfd"):
        assert name in eperm["names"]
    assert any(s["names"] == ["clone3"] and s["errnoRet"] == 38 for s in profile["syscalls"])
    socket_rules = {r["comment"]: r for r in profile["syscalls"] if r["names"] in (["socket"], ["socketpair"])}
    assert len(socket_rules) == sum(r.syscall in ("socket", "socketpair") for r in ARG_RULES)
    for call in ("socket", "socketpair"):
        for name, family in DENIED_FAMILIES:  # the whole family: no type or protocol condition
            rule = socket_rules[f"{call} {name}"]
            assert rule["errnoRet"] == 1
            assert rule["args"] == [{"index": 0, "value": 0xFFFF_FFFF, "valueTwo": family, "op": "SCMP_CMP_MASKED_EQ"}]


def test_profile_file_is_the_profile_as_json(tmp_path: Path) -> None:
    path = write_seccomp_profile(tmp_path / "sub" / "p.json")
    assert json.loads(path.read_text()) == seccomp_profile()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_command_is_rootless_capless_and_offline(sandbox: Sandbox, engine_ids: tuple[int, int]) -> None:
    spec = sandbox.spec(readable_paths=(Path("/models/m.gguf"),), pids_max=64)
    cmd = podman_command(spec, "localhost/llama:cpu", ["llama-server", "--host", f"{spec.workdir}/engine.sock"])
    podman = cmd.index("podman")
    assert cmd[0] == "setpriv" and f"--reuid={engine_ids[0]}" in cmd[:podman]  # podman never runs as root
    assert cmd[cmd.index("env") + 1] == "-i"  # nor with poolmgr's environment
    run = cmd[podman:]
    for flag in ("--cap-drop=all", "--security-opt=no-new-privileges", "--read-only", "--network=none"):
        assert flag in run
    assert f"--security-opt=seccomp={default_profile_path(spec)}" in run
    assert default_profile_path(spec).parent != spec.workdir  # the engine cannot edit its next profile
    assert "--volume=/models/m.gguf:/models/m.gguf:ro" in run
    assert [v for v in run if v.startswith("--volume=") and v.endswith(":rw")] == [
        f"--volume={spec.workdir}:{spec.workdir}:rw"
    ]
    assert "--pids-limit=64" in run and "--ulimit=core=0:0" in run
    assert not any("privileged" in a or a.startswith("--publish") for a in run)
    assert run[-4:] == ["localhost/llama:cpu", "llama-server", "--host", f"{spec.workdir}/engine.sock"]


def test_a_rootfs_directory_is_used_as_the_container_root(sandbox: Sandbox) -> None:
    cmd = podman_command(sandbox.spec(), str(sandbox.root), ["x"])
    assert cmd[-3:] == ["--rootfs", str(sandbox.root), "x"]


def test_rootless_container_runs_without_caps_and_with_the_profile(
    sandbox: Sandbox, engine_ids: tuple[int, int]
) -> None:
    if why := podman_missing():
        pytest.skip(why)
    rootfs = make_rootfs(sandbox.root, *engine_ids)
    spec = sandbox.spec(readable_paths=(Path("/usr"),))
    sandbox.prepare(spec)
    write_seccomp_profile(default_profile_path(spec))
    script = (
        "grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status; echo \"uid:\t$(id -u)\"; "
        "python3 -c 'import socket; socket.socket(2, 1)'"
    )
    cmd = podman_command(spec, str(rootfs), ["sh", "-c", script])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")
    status = dict(line.split(":\t", 1) for line in out.stdout.splitlines())
    assert all(int(status[k], 16) == 0 for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")), out.stderr
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert "PermissionError" in out.stderr  # even a TCP socket is refused by poolmgr's profile
    # --userns=keep-id (the engine user has subordinate ids): the engine user inside too; the host's view of the
    # engine is checked on a detached container in test_isolation_bdd (B-SEC-010)
    assert int(status["uid"]) == engine_ids[0]


def test_without_podman_validate_and_doctor_say_so_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no podman on it
    text = f'[[pool]]\nid = "c"\nmodel = "/m.gguf"\nruntime = "podman"\nrootfs = "{tmp_path}"\n'
    with pytest.raises(ConfigProblems) as exc:
        validate_pools(parse_pools(text, source="pools.toml"), lambda: pytest.fail("no GPU pool"), source="pools.toml")
    assert list(exc.value.problems) == [f"pools.toml: pool 'c': field 'runtime': {PODMAN_MISSING}"]
    row = next(r for r in doctor() if r.name == "podman")
    assert not row.supported and "podman not on PATH" in row.detail and "\n" not in row.detail
