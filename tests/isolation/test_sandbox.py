"""Real engines under the real sandbox (as root): what /proc says about them, and what they cannot do."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from poolmgr.errors import IsolationError
from poolmgr.isolation import EXIT_EXEC_FAILED, EXIT_ISOLATION_FAILED
from poolmgr.isolation._seccomp import seccomp_unavailable_reason
from poolmgr.isolation._trampoline import landlock_abi

from .conftest import Sandbox, status_fields, wait_for_exec

PROBE_CODE = (Path(__file__).parent / "sandbox_probe.py").read_text()
LANDLOCK_ABI = landlock_abi()
SECCOMP_MISSING = seccomp_unavailable_reason()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def sleeping(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, Sandbox]]:
    """A `sleep` engine under the full sandbox, with a secret in poolmgr's own environment."""
    monkeypatch.setenv("POOL_MANAGERD_API_TOKEN", "s3cret")
    monkeypatch.setenv("HF_TOKEN", "hf-s3cret")
    prepared = sandbox.prepare(sandbox.spec({"pids_max": 32, "memory_max": "512M"}, bind_port=_free_port()))
    proc = sandbox.spawn(prepared, ["sleep", "30"], {"CUDA_VISIBLE_DEVICES": "GPU-1234"})
    wait_for_exec(proc.pid, "sleep")
    yield proc.pid, sandbox


@pytest.fixture
def probe(sandbox: Sandbox, probe_python: str) -> Iterator[dict[str, str]]:
    """The behaviour probe's results, run under the full sandbox with a listener it must not reach."""
    allowed, other = _free_port(), _free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        target = listener.getsockname()[1]
        prepared = sandbox.prepare(sandbox.spec(bind_port=allowed))
        code, out, err = sandbox.run(prepared, [probe_python, "-c", PROBE_CODE, str(target), str(allowed), str(other)])
    assert code == 0, err
    yield json.loads(out)


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


def test_outbound_tcp_connect_is_refused(probe: dict[str, str]) -> None:
    if LANDLOCK_ABI < 4:
        pytest.skip(f"Landlock ABI {LANDLOCK_ABI} < 4 cannot restrict TCP")
    assert probe["tcp_connect"] == "EACCES"


def test_engine_binds_only_its_own_port(probe: dict[str, str]) -> None:
    if LANDLOCK_ABI < 4:
        pytest.skip(f"Landlock ABI {LANDLOCK_ABI} < 4 cannot restrict TCP")
    assert probe["bind_allowed"] == "ok"
    assert probe["bind_other"] == "EACCES"


@pytest.mark.parametrize("kind", ["udp_socket", "udp6_socket", "raw_socket", "packet_socket"])
def test_datagram_raw_and_packet_sockets_are_refused(probe: dict[str, str], kind: str) -> None:
    if SECCOMP_MISSING:
        pytest.skip(f"seccomp unavailable: {SECCOMP_MISSING}")
    assert probe[kind] == "EPERM"
    assert probe["tcp_socket"] == "ok"


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


def test_ephemeral_port_bind_when_the_pool_has_no_fixed_port(sandbox: Sandbox, probe_python: str) -> None:
    if LANDLOCK_ABI < 4:
        pytest.skip(f"Landlock ABI {LANDLOCK_ABI} < 4 cannot restrict TCP")
    prepared = sandbox.prepare(sandbox.spec(bind_port=None))
    other = _free_port()
    code, out, err = sandbox.run(prepared, [probe_python, "-c", PROBE_CODE, str(other), "0", str(other)])
    assert code == 0, err
    result = json.loads(out)
    assert result["bind_allowed"] == "ok"
    assert result["bind_other"] == "EACCES"
    assert "ephemeral" in prepared.layer("landlock").detail


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


LLAMA_SERVER = Path("/tmp/llbuild/build/bin/llama-server")


def test_llama_server_gets_past_exec_under_the_sandbox(sandbox: Sandbox) -> None:
    if not LLAMA_SERVER.exists():
        pytest.skip(f"{LLAMA_SERVER} not built on this machine")
    bogus = sandbox.root / "bogus.gguf"
    bogus.write_bytes(b"not a model")
    bogus.chmod(0o644)
    prepared = sandbox.prepare(sandbox.spec(readable_paths=(LLAMA_SERVER, bogus)))
    code, out, err = sandbox.run(prepared, [str(LLAMA_SERVER), "--port", "0", "-m", str(bogus)], timeout=60)
    assert "poolmgr-isolation" not in err
    assert code not in (EXIT_ISOLATION_FAILED, EXIT_EXEC_FAILED)
    assert "bogus.gguf" in out + err  # its own loader ran and complained about the file
