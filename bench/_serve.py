"""A real `poolmgr serve` subprocess for the benchmarks (the same way tests/e2e/conftest.py's Serve runs it),
plus running an engine through poolmgr's isolation trampoline outside the daemon, to time that part alone."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from _common import (
    POLL_S,
    REPO,
    ColdStart,
    engine_argv,
    engine_pids,
    free_port,
    kill_pids,
    stop_process,
    uds_status,
    wait_health_200,
    wait_listen_line,
)

from poolmgr.isolation import DEFAULT_ENGINE_USER, build_isolation, ensure_engine_user, prepare, release, wrap_command
from poolmgr.lifecycle.runtime import ENGINE_SOCKET

MARKER = "POOLMGR_POOL"


class Serve:
    """`poolmgr serve` on a free port with its state in `workdir` (which must be 0755: engines run as another
    user when poolmgr is root, and read their model from there)."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("POOL_MANAGERD_")},
            "POOL_MANAGERD_ADDR": f"127.0.0.1:{self.port}",
            "POOL_MANAGERD_STATE_DIR": str(workdir / "state"),
            "POOL_MANAGERD_CONFIG": str(workdir / "pools.toml"),
            "POOL_MANAGERD_STOP_GRACE_MS": "2000",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "serve.log"
        self.pool_ids: list[str] = []
        self.client = httpx.Client(timeout=30, trust_env=False)

    def write_pools(self, *pools: dict[str, Any]) -> None:
        self.pool_ids = [p["id"] for p in pools]
        lines = []
        for pool in pools:
            lines.append("[[pool]]")
            lines += [f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in pool.items()]
        (self.workdir / "pools.toml").write_text("\n".join(lines) + "\n")

    def start(self) -> Serve:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "poolmgr.cli", "serve"], env=self.env, stdout=log, stderr=log, cwd=REPO
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get(self.base + "/health", timeout=1).status_code == 200:
                    return self
            time.sleep(0.02)
        raise RuntimeError("serve did not answer /health in 60 s")

    def close(self) -> None:
        """Stop serve (it stops its engines), then SIGKILL anything of ours that is left."""
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc, grace_s=20)
        for pool_id in self.pool_ids:
            kill_pids(engine_pids(f"{MARKER}={pool_id}"))
        self.client.close()

    def post(self, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        resp = self.client.post(self.base + path, json=body)
        if resp.status_code >= 400:
            raise RuntimeError(f"POST {path}: HTTP {resp.status_code}: {resp.text}")
        return resp

    def status(self, pool_id: str) -> dict[str, Any]:
        resp = self.client.get(f"{self.base}/pools/{pool_id}/status")
        resp.raise_for_status()
        return dict(resp.json())

    def events(self, pool_id: str) -> list[dict[str, Any]]:
        resp = self.client.get(f"{self.base}/pools/{pool_id}/events", params={"limit": 10000})
        resp.raise_for_status()
        return list(resp.json())

    def wait_for(self, pool_id: str, pred: Any, timeout: float = 60, poll_s: float = 0.005) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.status(pool_id)
            if pred(last):
                return last
            time.sleep(poll_s)
        raise RuntimeError(f"pool {pool_id}: condition not reached in {timeout}s; last {last}\n{self.log_tail()}")

    def wait_state(self, pool_id: str, state: str, timeout: float = 60) -> dict[str, Any]:
        return self.wait_for(pool_id, lambda s: s["state"] == state, timeout)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def engine_socket(self, pool_id: str) -> Path:
        """Where the pool's engine serves: the unix socket in its workdir (`<state>/work/<pool_id>/engine.sock`)."""
        return (self.workdir / "state" / "work" / pool_id / ENGINE_SOCKET).absolute()

    def engine_log(self, pool_id: str) -> str:
        try:
            return (self.workdir / "state" / "logs" / f"{pool_id}.log").read_text(errors="replace")
        except OSError:
            return ""


def at(event: dict[str, Any]) -> float:
    """An audit row's `at` as a Unix timestamp."""
    return datetime.fromisoformat(str(event["at"]).replace("Z", "+00:00")).timestamp()


def last_spawn_stamp(engine_log: str) -> float | None:
    """The launcher's `--- poolmgr <ISO time>: spawn ...` header of the newest run, as a Unix timestamp."""
    for line in reversed(engine_log.splitlines()):
        if line.startswith("--- poolmgr ") and ": spawn " in line:
            stamp = line[len("--- poolmgr ") :].split(": spawn ", 1)[0]
            return datetime.fromisoformat(stamp).timestamp()
    return None


def isolation_summary(serve_log: str) -> str:
    """The layers in force, as poolmgr logged them at the newest spawn (`engine isolation: ...`)."""
    import json

    found = ""
    for line in serve_log.splitlines():
        if "engine isolation:" not in line:
            continue
        with contextlib.suppress(ValueError):
            line = str(json.loads(line).get("message", line))
        found = line.split("engine isolation:", 1)[1].strip()
    return found


def layer_names(summary: str) -> str:
    """`in force: user (...), cgroup (...) | skipped: ...` → `user, cgroup | skipped: ...` (details dropped)."""
    names, depth, word = [], 0, ""
    head, _, skipped = summary.partition(" | ")
    for ch in head.removeprefix("in force:"):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and ch == ",":
            names.append(word.split("(")[0].strip())
            word = ""
        else:
            word += ch
    if word.strip():
        names.append(word.split("(")[0].strip())
    return ", ".join(names) + (f" | {skipped}" if skipped else "")


@contextlib.contextmanager
def trampoline(pool_id: str, workdir_root: Path, readable: tuple[Path, ...]) -> Iterator[Any]:
    """poolmgr's isolation for one engine, prepared as the daemon prepares it (engine user, workdir, cgroup,
    rlimits, caps, no_new_privs, Landlock, seccomp: no TCP at all, clean env); yields wrap(argv, env). The
    cgroup goes afterwards."""
    user = DEFAULT_ENGINE_USER if os.geteuid() == 0 else ""
    if user:
        ensure_engine_user(user)
    iso = build_isolation({}, engine_user=user, workdir_root=workdir_root, pool_id=pool_id, readable_paths=readable)
    prepared = prepare(iso)
    try:
        yield lambda argv, env: wrap_command(prepared, argv, env)
    finally:
        release(prepared)


def wrapped_cold_start(
    binary: Path, model: Path, workdir_root: Path, *, pool_id: str, log_path: Path, timeout_s: float = 60
) -> ColdStart:
    """The floor through poolmgr's trampoline: spawn → first /health 200, polled every 1 ms over the engine's unix
    socket in its workdir (where poolmgr puts it, the one place the sandbox lets it create one)."""
    workdir = (workdir_root / pool_id).absolute()
    with trampoline(pool_id, workdir_root, (model, binary)) as wrap:
        sock = workdir / ENGINE_SOCKET
        argv = engine_argv(binary, model, sock, "-c", "1024", "--parallel", "1")
        full, env = wrap(argv, {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), MARKER: pool_id})
        with open(log_path, "wb") as log:
            t0 = time.monotonic()
            proc = subprocess.Popen(full, env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)  # fmt: skip
        try:
            total = wait_health_200(sock, timeout_s, proc=proc) - t0
            engine_s = wait_listen_line(log_path)
        finally:
            stop_process(proc)
    return ColdStart(total, engine_s)


def newest_run(engine_log: str) -> str:
    """The part of a pool's engine log after the launcher's last `--- poolmgr ...: spawn` header."""
    cut = engine_log.rfind("\n--- poolmgr ")
    return engine_log[engine_log.find("\n", cut + 1) + 1 :] if cut >= 0 else engine_log


def trampoline_only(workdir_root: Path, *, pool_id: str, runs: int) -> list[float]:
    """Seconds from spawning `true` through the trampoline to its exit: python start + every layer + exec."""
    times = []
    with trampoline(pool_id, workdir_root, ()) as wrap:
        full, env = wrap(["true"], {"PATH": "/usr/bin:/bin"})
        for _ in range(runs):
            t0 = time.monotonic()
            rc = subprocess.run(full, env=env, stdin=subprocess.DEVNULL, check=False).returncode
            times.append(time.monotonic() - t0)
            if rc != 0:
                raise RuntimeError(f"the trampoline failed (exit {rc})")
    return times


def bare_true(runs: int) -> list[float]:
    """Seconds to spawn `true` directly and see it exit: what a spawn costs without the trampoline."""
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        subprocess.run(["true"], stdin=subprocess.DEVNULL, check=True)
        times.append(time.monotonic() - t0)
    return times


class ReadyProbe(threading.Thread):
    """Watches for the pool's next engine while poolmgr starts it, at the floor's own cost: polls GET /health over
    the pool's unix socket `sock` every 1 ms, once the socket file there is a new one (another inode or ctime than the
    engine before it: poolmgr removes the old file before the spawn, and the new engine binds a new one; a dead
    engine's leftover file refuses connections anyway). `ready_at`: time.time() of the first 200, the engine's own
    readiness inside the very run poolmgr measures. (Until 2026-12-06 it looked for the new engine's pid by reading
    every /proc/*/environ each millisecond until the spawn, ~1 ms of CPU a look: on 2 cores that slowed the
    engine's start in poolmgr's runs only, and counted as poolmgr's.)"""

    def __init__(self, pool_id: str, sock: Path, timeout_s: float = 60) -> None:
        super().__init__(daemon=True, name=f"probe-{pool_id}")
        self.sock = sock
        self.old_inode = _inode(sock)
        self.deadline = time.monotonic() + timeout_s
        self.ready_at: float | None = None
        self._stop_flag = threading.Event()

    def run(self) -> None:
        while time.monotonic() < self.deadline and not self._stop_flag.is_set():
            inode = _inode(self.sock)
            if inode is not None and inode != self.old_inode and uds_status(self.sock, timeout=0.5) == 200:
                self.ready_at = time.time()
                return
            time.sleep(POLL_S)

    def result(self, timeout_s: float = 10) -> float:
        self.join(timeout_s)
        self._stop_flag.set()
        if self.ready_at is None:
            raise RuntimeError(f"probe: never saw the new engine answer 200 (socket {self.sock})")
        return self.ready_at


def _inode(path: Path) -> tuple[int, int] | None:
    """The file's identity: inode and change time (a freed inode number may be given to the next file)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_ctime_ns


def kill_marked(pool_id: str) -> None:
    kill_pids(engine_pids(f"{MARKER}={pool_id}"))


def remove_pool_cgroup(pool_id: str) -> None:
    """poolmgr keeps a pool's (empty) cgroup for its next start; a benchmark's pools have none, so remove it.
    The path depends on our own cgroup (v1 nests under it), which `serve`, our child, shares."""
    from poolmgr.isolation import _cgroup

    with contextlib.suppress(OSError):
        _cgroup.remove(_cgroup.create(pool_id, _cgroup.CgroupLimits()))


__all__ = [
    "MARKER",
    "ReadyProbe",
    "Serve",
    "at",
    "bare_true",
    "isolation_summary",
    "kill_marked",
    "last_spawn_stamp",
    "layer_names",
    "newest_run",
    "remove_pool_cgroup",
    "trampoline",
    "trampoline_only",
    "wrapped_cold_start",
]
