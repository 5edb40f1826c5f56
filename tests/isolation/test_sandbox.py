"""Real engines under the real sandbox (as root): what /proc says about them, and what they cannot do."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from poolmgr.engines._install import resolve_llama_server
from poolmgr.engines.tiny_model import write_tiny_model
from poolmgr.errors import EngineError, IsolationError
from poolmgr.isolation import EXIT_EXEC_FAILED, EXIT_ISOLATION_FAILED
from poolmgr.isolation._seccomp import seccomp_unavailable_reason
from poolmgr.isolation._trampoline import landlock_abi

from .conftest import ENGINE_CODE, ENGINE_REPLY, Sandbox, reply_over_unix_socket, status_fields, wait_for_exec

LANDLOCK_ABI = landlock_abi()
SECCOMP_MISSING = seccomp_unavailable_reason()


@pytest.fixture
def sleeping(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, Sandbox]]:
    """A `sleep` engine under the full sandbox, with a secret in poolmgr's own environment."""
    monkeypatch.setenv("POOL_MANAGERD_API_TOKEN", "s3cret")
    monkeypatch.setenv("HF_TOKEN", "hf-s3cret")
    prepared = sandbox.prepare(sandbox.spec({"pids_max": 32, "memory_max": "512M"}))
    proc = sandbox.spawn(prepared, ["sleep", "30"], {"CUDA_VISIBLE_DEVICES": "GPU-1234"})
    wait_for_exec(proc.pid, "sleep")
    yield proc.pid, sandbox


@pytest.fixture
def probe(sandbox: Sandbox, probe_python: str) -> dict[str, str]:
    """The behaviour probe's results under the full sandbox."""
    return sandbox.probe(sandbox.prepare(sandbox.spec()), probe_python)


def test_engine_runs_as_the_engine_user_with_no_supplementary_groups(
    sleeping: tuple[int, Sandbox], engine_ids: tuple[int, int]
) -> None:
    pid, _ = sleeping
    status = status_fields(pid)
    uid, gid = engine_ids
    assert status["Uid"].split() == [str(uid)] * 4
    assert status["Gid"].split() == [str(gid)] * 4
    assert uid != 0 and gid != 0
    assert status["Groups"] == ""


def test_engine_has_every_capability_set_empty_bounding_included(sleeping: tuple[int, Sandbox]) -> None:
    status = status_fields(sleeping[0])
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[field], 16) == 0, f"{field} = {status[field]}"


def test_engine_has_no_new_privs_and_a_seccomp_filter(sleeping: tuple[int, Sandbox]) -> None:
    if SECCOMP_MISSING:
        pytest.skip(f"seccomp unavailable: {SECCOMP_MISSING}")
    status = status_fields(sleeping[0])
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"


def test_engine_works_in_its_own_private_workdir(sleeping: tuple[int, Sandbox], engine_ids: tuple[int, int]) -> None:
    pid, box = sleeping
    workdir = box.root / box.pool_id
    assert os.readlink(f"/proc/{pid}/cwd") == str(workdir)
    st = workdir.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert (st.st_uid, st.st_gid) == engine_ids


def test_engine_environment_holds_no_secret_and_keeps_engine_env(sleeping: tuple[int, Sandbox]) -> None:
    pid, box = sleeping
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    env = dict(item.split("=", 1) for item in raw.decode().split("\0") if item)
    assert b"s3cret" not in raw
    assert not any(name.startswith("POOL_MANAGERD_") or "TOKEN" in name for name in env)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-1234"
    assert env["HOME"] == str(box.root / box.pool_id)
    assert "PATH" in env


def test_engine_joins_its_pool_cgroup_with_the_pool_limits(sleeping: tuple[int, Sandbox]) -> None:
    pid, box = sleeping
    prepared = box.prepared[-1]
    if prepared.cgroup is None:
        pytest.skip(f"no cgroup on this host: {prepared.skipped['cgroup']}")
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    assert any(line.endswith(f"/poolmgr/{box.pool_id}") for line in lines)
    for path in prepared.cgroup.paths:
        assert str(pid) in (path / "cgroup.procs").read_text().split()
    limits = {p.name: p for p in prepared.cgroup.paths}
    if prepared.cgroup.version == 1 and "pids" in prepared.cgroup.controllers:
        pids_dir = next(p for p in prepared.cgroup.paths if "/pids/" in str(p))
        assert (pids_dir / "pids.max").read_text().strip() == "32"
    assert limits


def test_engine_cannot_dump_core(sleeping: tuple[int, Sandbox]) -> None:
    limits = Path(f"/proc/{sleeping[0]}/limits").read_text().splitlines()
    core = next(line for line in limits if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]


IP_SOCKETS = [
    "tcp_socket",
    "udp_socket",
    "tcp6_socket",
    "udp6_socket",
    "sctp_socket",
    "raw_socket",
    "packet_socket",
    "tcp_socket_high_bits",
    "inet_socketpair",
    "tcp_connect",
    "tcp_bind",
    "tcp6_bind",
]


@pytest.mark.parametrize("kind", IP_SOCKETS)
def test_every_ipv4_ipv6_and_packet_socket_is_refused_with_eperm(probe: dict[str, str], kind: str) -> None:
    if SECCOMP_MISSING:
        pytest.skip(f"seccomp unavailable: {SECCOMP_MISSING}")
    assert probe[kind] == "EPERM"  # seccomp refuses socket() itself, before Landlock sees a bind or connect


def test_netlink_and_unix_sockets_stay_open(probe: dict[str, str]) -> None:
    assert probe["netlink_socket"] == "ok"  # glibc asks the kernel for interfaces over netlink
    assert probe["unix_socketpair"] == "ok"


def test_engine_serves_on_a_unix_socket_in_its_workdir_and_nowhere_else(probe: dict[str, str]) -> None:
    assert probe["unix_serve_workdir"] == "ok"  # bind + listen + a reply: LL_FS_MAKE_SOCK holds in the workdir
    if LANDLOCK_ABI < 1:
        pytest.skip("kernel has no Landlock: nothing stops a socket file in /tmp")
    assert probe["unix_bind_outside"] == "EACCES"  # /tmp is world-writable: only Landlock says no


def test_poolmgr_reaches_the_engine_through_the_socket_in_its_workdir(sandbox: Sandbox, probe_python: str) -> None:
    prepared = sandbox.prepare(sandbox.spec())
    sock_path = prepared.spec.workdir / "engine.sock"
    proc = sandbox.spawn(prepared, [probe_python, "-c", ENGINE_CODE, str(sock_path)])
    reply = reply_over_unix_socket(proc, sock_path)
    _out, err = proc.communicate(timeout=10)
    assert reply == ENGINE_REPLY, err.decode()
    assert proc.returncode == 0, err.decode()


def test_landlock_alone_refuses_every_tcp_bind_and_connect(sandbox: Sandbox, probe_python: str) -> None:
    if LANDLOCK_ABI < 4:
        pytest.skip(f"Landlock ABI {LANDLOCK_ABI} < 4 cannot restrict TCP")
    prepared = sandbox.prepare(sandbox.spec({"seccomp": False}))
    assert not prepared.layer("seccomp").in_force
    assert "no TCP bind or connect" in prepared.layer("landlock").detail
    result = sandbox.probe(prepared, probe_python)
    assert result["tcp_socket"] == "ok"  # seccomp is off: the socket opens, Landlock stops what it would do
    assert result["tcp_connect"] == "EACCES"
    assert result["tcp_bind"] == "EACCES"  # port 0 (ephemeral) included: no port has a rule
    if result["tcp6_socket"] == "ok":  # a kernel without IPv6 refuses the socket itself
        assert result["tcp6_bind"] == "EACCES"
    assert result["unix_serve_workdir"] == "ok"


def test_ptrace_and_new_user_namespaces_are_refused(probe: dict[str, str]) -> None:
    if SECCOMP_MISSING:
        pytest.skip(f"seccomp unavailable: {SECCOMP_MISSING}")
    assert probe["ptrace"] == "EPERM"
    assert probe["unshare_user"] == "EPERM"


def test_writes_outside_the_workdir_are_refused(probe: dict[str, str]) -> None:
    if LANDLOCK_ABI < 1:
        pytest.skip("kernel has no Landlock")
    assert probe["write_outside"] == "EACCES"  # /tmp is world-writable: only Landlock says no
    assert probe["write_workdir"] == "ok"
    assert probe["write_dev_null"] == "ok"  # device nodes stay writable: GPUs are driven through them
    assert probe["write_shm"] == "ok"  # POSIX shared memory too (CUDA IPC, NCCL)


def test_threads_still_start_and_root_is_out_of_reach(probe: dict[str, str]) -> None:
    assert probe["thread"] == "ok"  # clone3 gets ENOSYS, libc falls back to clone
    assert probe["setuid_root"] == "EPERM"


def test_a_failing_layer_exits_126_and_never_runs_the_engine(sandbox: Sandbox) -> None:
    prepared = sandbox.prepare(sandbox.spec())
    marker = sandbox.root / "engine-ran"
    shutil.rmtree(prepared.spec.workdir)  # chdir into the workdir now fails inside the trampoline
    code, _out, err = sandbox.run(prepared, ["sh", "-c", f"touch {marker}"])
    assert code == EXIT_ISOLATION_FAILED
    assert err.startswith("poolmgr-isolation: workdir: ")
    assert err.count("\n") == 1
    assert not marker.exists()


def test_a_vanished_cgroup_exits_126(sandbox: Sandbox) -> None:
    prepared = sandbox.prepare(sandbox.spec())
    if prepared.cgroup is None:
        pytest.skip(f"no cgroup on this host: {prepared.skipped['cgroup']}")
    for path in prepared.cgroup.paths:
        path.rmdir()
    code, _out, err = sandbox.run(prepared, ["true"])
    assert code == EXIT_ISOLATION_FAILED
    assert err.startswith("poolmgr-isolation: cgroup: ")


def test_a_missing_engine_binary_exits_127_after_isolation(sandbox: Sandbox) -> None:
    prepared = sandbox.prepare(sandbox.spec())
    code, _out, err = sandbox.run(prepared, ["/nonexistent/llama-server", "--port", "0"])
    assert code == EXIT_EXEC_FAILED
    assert err.startswith("poolmgr-isolation: exec: /nonexistent/llama-server: ")


@pytest.mark.parametrize("user", [None, "root", 0])
def test_root_poolmgr_refuses_to_run_an_engine_as_root(sandbox: Sandbox, user: str | int | None) -> None:
    with pytest.raises(IsolationError, match="refusing to run the engine as root"):
        sandbox.prepare(sandbox.spec(user=user))


def test_engine_user_without_group_never_keeps_gid_0(sandbox: Sandbox, engine_ids: tuple[int, int]) -> None:
    prepared = sandbox.prepare(sandbox.spec(group=None))
    assert (prepared.uid, prepared.gid) == engine_ids
    code, out, err = sandbox.run(prepared, ["id", "-G"])
    assert code == 0, err
    assert out.split() == [str(engine_ids[1])]


@pytest.fixture
def llama_server() -> Path:
    try:
        return resolve_llama_server(os.environ.get("POOL_MANAGERD_LLAMA_SERVER", ""))
    except EngineError as exc:
        pytest.skip(f"no llama-server on this machine: {exc}")


def _health_over_socket(proc: subprocess.Popen[bytes], sock: Path, log: Path, timeout: float) -> int:
    """Poll /health through the unix socket, as the node's data plane does, until 200 (or the engine dies)."""
    transport = httpx.HTTPTransport(uds=str(sock))
    deadline = time.monotonic() + timeout
    with httpx.Client(transport=transport, base_url="http://engine", timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"engine exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if (code := client.get("/health").status_code) == 200:
                    return code
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise AssertionError(f"no /health 200 within {timeout} s: {log.read_text()[-2000:]}")


def test_llama_server_serves_on_its_workdir_socket_with_no_ip_at_all(sandbox: Sandbox, llama_server: Path) -> None:
    model = write_tiny_model(sandbox.root / "tiny.gguf")
    model.chmod(0o644)
    prepared = sandbox.prepare(sandbox.spec(readable_paths=(llama_server, model)))
    assert not prepared.warnings
    sock, log = prepared.spec.workdir / "engine.sock", sandbox.root / "engine.log"
    argv = [str(llama_server), "--model", str(model), "--host", str(sock), "--n-gpu-layers", "0"]
    proc = sandbox.spawn(prepared, [*argv, "--ctx-size", "256", "--parallel", "1", "--no-webui"], log=log)
    assert _health_over_socket(proc, sock, log, timeout=120) == 200
    if not SECCOMP_MISSING:
        assert status_fields(proc.pid)["Seccomp"] == "2"  # it served with every IP socket refused
    assert "poolmgr-isolation" not in log.read_text()
