"""Fixtures for the isolation tests: a real engine user, a traversable workdir root, sandboxed spawns."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from poolmgr.isolation import (
    IsolationSpec,
    PreparedIsolation,
    build_isolation,
    ensure_engine_user,
    ensure_subids,
    prepare,
    release,
    wrap_command,
)

TEST_ENGINE_USER = "poolmgr-itest"
PROBE_PYTHON = "/usr/bin/python3"
# A stand-in engine: serves one connection on the unix socket it is given, as llama-server does with
# `--host <workdir>/engine.sock`.
ENGINE_CODE = """
import socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
    server.bind(sys.argv[1])
    server.listen()
    conn, _ = server.accept()
    with conn:
        conn.sendall(b"hello from the engine")
"""
ENGINE_REPLY = b"hello from the engine"
PROBE_CODE = (Path(__file__).parent / "sandbox_probe.py").read_text()


def status_fields(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict of field -> value (tabs stripped)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def wait_for_exec(pid: int, comm: str, timeout: float = 5.0) -> None:
    """Wait until the spawner has exec'd the engine (its comm changes from python or poolmgr-spawn)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                return
        except OSError:
            break
        time.sleep(0.005)
    raise AssertionError(f"pid {pid} never became {comm!r}")


def reply_over_unix_socket(proc: subprocess.Popen[bytes], path: Path, timeout: float = 30) -> bytes:
    """What poolmgr's data plane does: connect to the engine's socket once it appears, read its reply."""
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(str(path))
        return client.recv(64)


@pytest.fixture(scope="session")
def engine_ids() -> tuple[int, int]:
    if os.geteuid() != 0:
        pytest.skip("needs root: the sandbox switches to a dedicated engine user")
    ids = ensure_engine_user(TEST_ENGINE_USER)
    if shutil.which("podman") is not None:
        ensure_subids(TEST_ENGINE_USER)  # as `poolmgr setup` does: rootless podman with --userns=keep-id
    return ids


@pytest.fixture
def workdir_root() -> Iterator[Path]:
    """A workdir root the engine user can traverse (pytest's tmp_path is 0700 root-only)."""
    root = Path(tempfile.mkdtemp(prefix="poolmgr-iso-", dir="/tmp"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pool_id() -> str:
    return f"itest-{uuid.uuid4().hex[:8]}"


@dataclass
class Sandbox:
    """Spawn commands through prepare + wrap_command, the way the engine launcher does."""

    root: Path
    pool_id: str
    procs: list[subprocess.Popen[bytes]]
    prepared: list[PreparedIsolation]

    def spec(self, overrides: dict[str, Any] | None = None, **fields: Any) -> IsolationSpec:
        spec = build_isolation(
            overrides or {},
            engine_user=TEST_ENGINE_USER,
            workdir_root=self.root,
            pool_id=self.pool_id,
            readable_paths=fields.pop("readable_paths", ()),
        )
        return replace(spec, **fields)

    def prepare(self, spec: IsolationSpec) -> PreparedIsolation:
        prepared = prepare(spec)
        self.prepared.append(prepared)
        return prepared

    def spawn(
        self,
        prepared: PreparedIsolation,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        log: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """`log`: stdout and stderr go to that file (a chatty engine would fill a pipe and block)."""
        argv2, env2 = wrap_command(prepared, argv, env or {})
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(log.open("wb")) if log is not None else subprocess.PIPE
            proc = subprocess.Popen(
                argv2,
                env=env2,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if log is not None else subprocess.PIPE,
                close_fds=True,
            )
        self.procs.append(proc)
        return proc

    def run(self, prepared: PreparedIsolation, argv: Sequence[str], timeout: float = 20) -> tuple[int, str, str]:
        proc = self.spawn(prepared, argv)
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode(), err.decode()

    def probe(self, prepared: PreparedIsolation, python: str) -> dict[str, str]:
        """sandbox_probe.py's results under `prepared`, with a TCP listener on loopback it must not reach."""
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            target = listener.getsockname()[1]
            code, out, err = self.run(prepared, [python, "-c", PROBE_CODE, str(target)])
        assert code == 0, err
        result: dict[str, str] = json.loads(out)
        return result

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        for prepared in self.prepared:
            release(prepared)


@pytest.fixture
def sandbox(engine_ids: tuple[int, int], workdir_root: Path, pool_id: str) -> Iterator[Sandbox]:
    box = Sandbox(workdir_root, pool_id, [], [])
    yield box
    box.close()


@pytest.fixture
def probe_python() -> str:
    if not os.access(PROBE_PYTHON, os.X_OK):
        pytest.skip(f"{PROBE_PYTHON} is missing: the probes need a python the engine user can run")
    return PROBE_PYTHON


def make_rootfs(parent: Path, uid: int, gid: int) -> Path:
    """A minimal container root: empty mount points and usr-merge links; /usr itself is mounted read-only."""
    rootfs = parent / "rootfs"
    if rootfs.is_dir():  # made by an earlier step of the same scenario
        return rootfs
    rootfs.mkdir()
    for name in ("usr", "proc", "dev", "sys", "etc", "tmp", "run"):
        (rootfs / name).mkdir()
    for name in ("bin", "lib", "lib64", "sbin"):
        (rootfs / name).symlink_to(f"usr/{name}")
    (rootfs / "etc" / "mtab").symlink_to("/proc/mounts")
    os.chmod(rootfs, 0o755)
    for dirpath, _dirs, _files in os.walk(rootfs):  # rootless podman writes into it as the engine user
        os.lchown(dirpath, uid, gid)
    return rootfs


def podman_missing() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed on this host"
    return None
