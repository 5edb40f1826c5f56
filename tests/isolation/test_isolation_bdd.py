"""Steps for features/security/isolation.feature (B-SEC-001..003, 010..012): real processes, files, sockets."""

from __future__ import annotations

import asyncio
import errno
import json
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pytest_bdd import given, scenarios, then, when

from poolmgr.engines import ContainerLauncher, LaunchRequest
from poolmgr.isolation import PODMAN_DIR, podman_command, write_seccomp_profile
from poolmgr.isolation._podman import default_profile_path
from poolmgr.isolation._seccomp import DENIED_SYSCALLS, seccomp_unavailable_reason
from poolmgr.isolation._trampoline import landlock_abi

from .conftest import (
    ENGINE_CODE,
    ENGINE_REPLY,
    Sandbox,
    make_rootfs,
    podman_missing,
    reply_over_unix_socket,
    status_fields,
    wait_for_exec,
)

scenarios("security/isolation.feature")


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
    return box.probe(ctx["prepared"], probe_python)


@then("the engine cannot write outside its workdir (skipped where the kernel has no Landlock)")
def _no_write_outside(ctx: dict[str, Any], probe_python: str) -> None:
    if landlock_abi() < 1:
        pytest.skip("kernel has no Landlock")
    probe = _probe(ctx, probe_python)
    assert probe["write_outside"] == "EACCES" and probe["write_workdir"] == "ok"


@then("the engine serves on a unix socket in its workdir, which poolmgr reaches")
def _serves_on_workdir_socket(ctx: dict[str, Any], probe_python: str) -> None:
    box: Sandbox = ctx["box"]
    sock_path = ctx["prepared"].spec.workdir / "engine.sock"
    proc = box.spawn(ctx["prepared"], [probe_python, "-c", ENGINE_CODE, str(sock_path)])
    assert reply_over_unix_socket(proc, sock_path) == ENGINE_REPLY
    assert proc.wait(timeout=10) == 0


@then("the engine cannot create a unix socket outside its workdir (skipped where the kernel has no Landlock)")
def _no_socket_outside(ctx: dict[str, Any], probe_python: str) -> None:
    if landlock_abi() < 1:
        pytest.skip("kernel has no Landlock")
    probe = _probe(ctx, probe_python)
    assert probe["unix_bind_outside"] == "EACCES" and probe["unix_serve_workdir"] == "ok"


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


@then("ptrace and every IPv4 and IPv6 socket, TCP and UDP alike, are refused to the engine")
def _ptrace_ip(ctx: dict[str, Any], probe_python: str) -> None:
    if why := seccomp_unavailable_reason():
        pytest.skip(f"seccomp unavailable: {why}")
    probe = _probe(ctx, probe_python)
    assert probe["ptrace"] == "EPERM"
    for kind in ("tcp_socket", "udp_socket", "tcp6_socket", "udp6_socket", "tcp_connect", "tcp_bind"):
        assert probe[kind] == "EPERM", kind


@then("Landlock alone refuses the engine any TCP bind or connect (skipped where Landlock ABI < 4)")
def _landlock_no_tcp(ctx: dict[str, Any], probe_python: str) -> None:
    if (abi := landlock_abi()) < 4:
        pytest.skip(f"Landlock ABI {abi} < 4 cannot restrict TCP")
    box: Sandbox = ctx["box"]
    prepared = box.prepare(box.spec({"seccomp": False}))  # the pool file's switch: only Landlock is left
    probe = box.probe(prepared, probe_python)
    assert probe["tcp_socket"] == "ok"
    assert probe["tcp_bind"] == "EACCES" and probe["tcp_connect"] == "EACCES"


@given("a pool that runs its engine in a podman container")
def _podman_pool(sandbox: Sandbox, ctx: dict[str, Any]) -> None:
    spec = sandbox.spec(readable_paths=(Path("/usr"),))
    sandbox.prepare(spec)
    ctx.update(spec=spec, box=sandbox, profile=write_seccomp_profile(default_profile_path(spec)))
    assert ctx["profile"].exists()


@when("poolmgr builds the container command")
def _build_cmd(ctx: dict[str, Any]) -> None:
    sock = ctx["spec"].workdir / "engine.sock"
    ctx["cmd"] = podman_command(ctx["spec"], "localhost/llama:cpu", ["llama-server", "--host", str(sock)])


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


def _container_cmd(ctx: dict[str, Any], argv: list[str], *, detach: bool = False) -> list[str]:
    if why := podman_missing():
        pytest.skip(why)
    box: Sandbox = ctx["box"]
    rootfs = make_rootfs(box.root, *ctx["ids"])
    return podman_command(ctx["spec"], str(rootfs), argv, detach=detach)


def _run_container(ctx: dict[str, Any], script: str) -> subprocess.CompletedProcess[str]:
    cmd = _container_cmd(ctx, ["sh", "-c", script])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")


@then("in the running container the host sees only the engine user (skipped where podman is missing)")
def _run_rootless(ctx: dict[str, Any]) -> None:
    out = _run_container(ctx, "id -u; grep CapEff /proc/self/status")
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stderr
    assert int(lines[0]) == ctx["ids"][0]  # keep-id: the engine user inside as well as outside
    assert lines[1].split() == ["CapEff:", "0000000000000000"]


@then(
    "seen from the host the container's engine has a non-zero uid, no capabilities, no_new_privs and seccomp "
    "(skipped where podman is missing)"
)
def _host_view(ctx: dict[str, Any]) -> None:
    """What serve runs: a detached container whose engine is, on the host, one more (sandboxed) process."""
    cmd = _container_cmd(ctx, ["sleep", "60"], detach=True)
    box: Sandbox = ctx["box"]
    launcher = ContainerLauncher(box.root / PODMAN_DIR)
    eng = launcher.spawn(LaunchRequest(argv=cmd, env={"PATH": "/usr/bin:/bin"}, log_path=box.root / "pod.log"))
    try:
        status = status_fields(eng.pid)
        assert status["Uid"].split() == [str(ctx["ids"][0])] * 4  # keep-id: the engine user, on the host too
        for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[field], 16) == 0, field
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    finally:
        info = asyncio.run(launcher.stop(eng.pid, eng.start_time, 1.0))
    # sleep, the container's init, has no SIGTERM handler (init ignores it): KILL after the grace, as conmon saw
    assert info.signal == signal.SIGKILL
    assert not launcher.is_alive(eng.pid, eng.start_time)


@then("in the running container a syscall the profile denies fails (skipped where podman is missing)")
def _run_denied_syscall(ctx: dict[str, Any]) -> None:
    # ptrace: allowed by podman's default profile, denied (EPERM) by poolmgr's
    code = "import ctypes; libc = ctypes.CDLL(None, use_errno=True); print(libc.ptrace(0, 0, 0, 0), ctypes.get_errno())"
    out = _run_container(ctx, f"python3 -c '{code}'")
    assert out.stdout.split() == ["-1", str(errno.EPERM)], out.stderr


@then("in the running container only the workdir is writable (skipped where podman is missing)")
def _run_writes(ctx: dict[str, Any]) -> None:
    workdir = ctx["spec"].workdir
    script = f"for d in / /etc /usr /tmp /run {workdir}; do touch $d/probe 2>/dev/null && echo $d; done"
    out = _run_container(ctx, script)
    assert out.stdout.split() == [str(workdir)], out.stderr


@then("the command loads poolmgr's profile, which denies the process sandbox's syscalls")
def _profile(ctx: dict[str, Any]) -> None:
    assert f"--security-opt=seccomp={ctx['profile']}" in _run_args(ctx)
    profile = json.loads(ctx["profile"].read_text())
    denied = {
        n for rule in profile["syscalls"] if rule.get("errnoRet") == 1 and "args" not in rule for n in rule["names"]
    }
    assert denied == set(DENIED_SYSCALLS)
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"


@then("in the running container a TCP socket is refused (skipped where podman is missing)")
def _run_tcp(ctx: dict[str, Any]) -> None:
    out = _run_container(
        ctx, "python3 -c 'import socket; socket.socket(2, 1)' && echo TCP-OPEN; grep Seccomp: /proc/self/status"
    )
    assert "TCP-OPEN" not in out.stdout
    assert "PermissionError" in out.stderr
    assert "Seccomp:\t2" in out.stdout


@then("the container has no network at all and publishes no port")
def _no_network(ctx: dict[str, Any]) -> None:
    run = _run_args(ctx)
    assert [a for a in run if a.startswith("--network")] == ["--network=none"]
    assert not any(a.startswith(("--publish", "-p")) for a in run)


@then("in the running container loopback is the only interface (skipped where podman is missing)")
def _run_no_network(ctx: dict[str, Any]) -> None:
    out = _run_container(ctx, "ls /sys/class/net")
    assert out.stdout.split() == ["lo"], out.stderr


@then("the engine's unix socket in its mounted workdir reaches the host (skipped where podman is missing)")
def _run_unix_socket(ctx: dict[str, Any]) -> None:
    sock_path = ctx["spec"].workdir / "engine.sock"
    cmd = _container_cmd(ctx, ["python3", "-c", ENGINE_CODE, str(sock_path)])
    proc = subprocess.Popen(cmd, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        reply = reply_over_unix_socket(proc, sock_path, timeout=120)
    finally:
        if proc.poll() is None:
            proc.terminate()
        _out, err = proc.communicate(timeout=60)
    assert reply == ENGINE_REPLY, err.decode()[-500:]
