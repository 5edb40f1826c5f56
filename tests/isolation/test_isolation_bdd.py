"""Steps for features/security/isolation.feature (B-SEC-001..003, 010..012): real processes, real files."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from poolmgr.isolation import podman_command, write_seccomp_profile
from poolmgr.isolation._podman import default_profile_path
from poolmgr.isolation._prepare import unreachable_by
from poolmgr.isolation._seccomp import DENIED_SYSCALLS, seccomp_unavailable_reason
from poolmgr.isolation._trampoline import landlock_abi

from .conftest import Sandbox, make_rootfs, podman_missing, status_fields, wait_for_exec

scenarios("security/isolation.feature")

PROBE_CODE = (Path(__file__).parent / "sandbox_probe.py").read_text()


@pytest.fixture
def ctx() -> dict[str, Any]:
    return {}


@given("poolmgr runs as root and the engine user exists")
def _root_and_user(engine_ids: tuple[int, int], ctx: dict[str, Any]) -> None:
    uid, gid = engine_ids
    assert uid != 0 and gid != 0
    ctx["ids"] = engine_ids


@when("a pool's engine is started through the isolation layer")
def _start_engine(sandbox: Sandbox, ctx: dict[str, Any]) -> None:
    prepared = sandbox.prepare(sandbox.spec())
    proc = sandbox.spawn(prepared, ["sleep", "30"])
    wait_for_exec(proc.pid, "sleep")
    ctx.update(pid=proc.pid, prepared=prepared, box=sandbox, status=status_fields(proc.pid))


@then("every uid and gid of the engine is the engine user's, none is 0")
def _ids(ctx: dict[str, Any]) -> None:
    uid, gid = ctx["ids"]
    assert ctx["status"]["Uid"].split() == [str(uid)] * 4
    assert ctx["status"]["Gid"].split() == [str(gid)] * 4


@then("the engine has no supplementary groups")
def _no_groups(ctx: dict[str, Any]) -> None:
    assert ctx["status"]["Groups"] == ""


@then("the engine's working directory is the pool's workdir, mode 0700, owned by the engine user")
def _workdir(ctx: dict[str, Any]) -> None:
    workdir = ctx["prepared"].spec.workdir
    assert Path(f"/proc/{ctx['pid']}/cwd").readlink() == workdir
    st = workdir.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and (st.st_uid, st.st_gid) == ctx["ids"]


def _probe(ctx: dict[str, Any], probe_python: str) -> dict[str, str]:
    box: Sandbox = ctx["box"]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = str(listener.getsockname()[1])
        code, out, err = box.run(ctx["prepared"], [probe_python, "-c", PROBE_CODE, port, "0", port])
    assert code == 0, err
    result: dict[str, str] = json.loads(out)
    return result


@then("the engine cannot write outside its workdir (skipped where the kernel has no Landlock)")
def _no_write_outside(ctx: dict[str, Any], probe_python: str) -> None:
    if landlock_abi() < 1:
        pytest.skip("kernel has no Landlock")
    probe = _probe(ctx, probe_python)
    assert probe["write_outside"] == "EACCES" and probe["write_workdir"] == "ok"


@then("all five capability sets of the engine are empty")
def _no_caps(ctx: dict[str, Any]) -> None:
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(ctx["status"][field], 16) == 0


@then("the engine runs with no_new_privs and a seccomp filter")
def _nnp_seccomp(ctx: dict[str, Any]) -> None:
    assert ctx["status"]["NoNewPrivs"] == "1"
    if why := seccomp_unavailable_reason():
        pytest.skip(f"seccomp unavailable: {why}")
    assert ctx["status"]["Seccomp"] == "2"


@then("ptrace and UDP sockets are refused to the engine")
def _ptrace_udp(ctx: dict[str, Any], probe_python: str) -> None:
    if why := seccomp_unavailable_reason():
        pytest.skip(f"seccomp unavailable: {why}")
    probe = _probe(ctx, probe_python)
    assert probe["ptrace"] == "EPERM" and probe["udp_socket"] == "EPERM"


@given("a pool that runs its engine in a podman container")
def _podman_pool(sandbox: Sandbox, ctx: dict[str, Any]) -> None:
    spec = sandbox.spec(readable_paths=(Path("/usr"),))
    sandbox.prepare(spec)
    ctx.update(spec=spec, box=sandbox, profile=write_seccomp_profile(default_profile_path(spec)))
    assert ctx["profile"].exists()


@when("poolmgr builds the container command")
@when("poolmgr builds the container command without a port")
def _build_cmd(ctx: dict[str, Any]) -> None:
    ctx["cmd"] = podman_command(ctx["spec"], "localhost/llama:cpu", ["llama-server"], None)


@when(parsers.parse("poolmgr builds the container command for port {port:d}"))
def _build_cmd_port(ctx: dict[str, Any], port: int) -> None:
    ctx["cmd"] = podman_command(ctx["spec"], "localhost/llama:cpu", ["llama-server"], port)


def _run_args(ctx: dict[str, Any]) -> list[str]:
    cmd: list[str] = ctx["cmd"]
    return cmd[cmd.index("podman") :]


@then("podman is started as the engine user with a clean environment")
def _rootless(ctx: dict[str, Any]) -> None:
    cmd: list[str] = ctx["cmd"]
    prefix = cmd[: cmd.index("podman")]
    assert prefix[0] == "setpriv" and f"--reuid={ctx['ids'][0]}" in prefix and "--clear-groups" in prefix
    assert prefix[prefix.index("env") :][:2] == ["env", "-i"]
    assert not any("TOKEN" in a or "POOL_MANAGERD" in a for a in cmd)


@then("the container drops every capability and sets no-new-privileges")
def _caps_flags(ctx: dict[str, Any]) -> None:
    run = _run_args(ctx)
    assert "--cap-drop=all" in run and "--security-opt=no-new-privileges" in run
    assert not any(a.startswith("--cap-add") or "privileged" in a for a in run)


def _container_cmd(ctx: dict[str, Any], script: str, port: int | None) -> list[str]:
    if why := podman_missing():
        pytest.skip(why)
    box: Sandbox = ctx["box"]
    rootfs = make_rootfs(box.root, *ctx["ids"])
    return podman_command(ctx["spec"], str(rootfs), ["sh", "-c", script], port)


def _run_container(ctx: dict[str, Any], script: str) -> subprocess.CompletedProcess[str]:
    cmd = _container_cmd(ctx, script, None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")


@then("in the running container the host sees only the engine user (skipped where podman is missing)")
def _run_rootless(ctx: dict[str, Any]) -> None:
    out = _run_container(ctx, "cat /proc/self/uid_map; grep CapEff /proc/self/status")
    lines = out.stdout.splitlines()
    assert lines, out.stderr
    _inside, outside, _count = (int(x) for x in lines[0].split())
    assert outside == ctx["ids"][0]
    assert lines[1].split() == ["CapEff:", "0000000000000000"]


@then("the command loads poolmgr's profile, which denies the process sandbox's syscalls")
def _profile(ctx: dict[str, Any]) -> None:
    assert f"--security-opt=seccomp={ctx['profile']}" in _run_args(ctx)
    profile = json.loads(ctx["profile"].read_text())
    denied = {
        n for rule in profile["syscalls"] if rule.get("errnoRet") == 1 and "args" not in rule for n in rule["names"]
    }
    assert denied == set(DENIED_SYSCALLS)
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"


@then("in the running container a UDP socket is refused (skipped where podman is missing)")
def _run_udp(ctx: dict[str, Any]) -> None:
    out = _run_container(
        ctx, "python3 -c 'import socket; socket.socket(2, 2)' && echo UDP-OPEN; grep Seccomp: /proc/self/status"
    )
    assert "UDP-OPEN" not in out.stdout
    assert "PermissionError" in out.stderr
    assert "Seccomp:\t2" in out.stdout


@then("the container has no network at all")
def _no_network(ctx: dict[str, Any]) -> None:
    run = _run_args(ctx)
    assert "--network=none" in run
    assert not any(a.startswith(("--publish", "-p")) for a in run)


@then(parsers.parse("only TCP port {port:d} is published, on loopback only"))
def _one_port(ctx: dict[str, Any], port: int) -> None:
    run = _run_args(ctx)
    assert [a for a in run if a.startswith("--publish")] == [f"--publish=127.0.0.1:{port}:{port}/tcp"]
    assert "--network=none" not in run and "--network=host" not in run


@then("in the running container loopback is the only interface (skipped where podman is missing)")
def _run_no_network(ctx: dict[str, Any]) -> None:
    out = _run_container(ctx, "ls /sys/class/net")
    assert out.stdout.split() == ["lo"], out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@then("the published port reaches the engine (skipped where podman or a usable /dev/net/tun is missing)")
def _run_published(ctx: dict[str, Any]) -> None:
    if why := podman_missing():
        pytest.skip(why)
    uid, gid = ctx["ids"]
    if why := unreachable_by(Path("/dev/net/tun"), uid, gid, os.R_OK | os.W_OK):
        pytest.skip(f"slirp4netns needs /dev/net/tun: {why}")
    port = _free_port()
    server = f"python3 -m http.server --bind 0.0.0.0 {port}"
    proc = subprocess.Popen(_container_cmd(ctx, server, port), cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as resp:
                    assert resp.status == 200
                    return
            except OSError:
                time.sleep(0.2)
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    raise AssertionError(f"published port {port} never answered: {err.decode()[-500:]}")
