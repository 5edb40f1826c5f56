"""Benchmark (issue: steady-state cost grows with changes, not with pools x seconds): N pools on one node.

One `poolmgr serve` runs N real pools (llama-server, the tiny model, slots 1) on SQLite, then on PostgreSQL (a
database the bench creates and drops), and N fake pools (bench/fake_engine.c, compiled by the bench) when memory
allows. Per row:

  idle poolmgr CPU       % of one core used by the serve process itself (utime+stime of /proc/<pid>/stat, its
                         children excluded) over --window-s, starting --settle-s after every pool is ready
  idle DB commits/s      the same window. SQLite: write commits, counted exactly from the change counter of the
                         wal-index header (iChange in <db>-shm, read as a file: no connection, no lock); PostgreSQL:
                         pg_stat_database.xact_commit of the bench's database, read over a connection to another
                         database (the reads are not counted in the bench's)
  GET /metrics, /pools   median / p95 of --requests requests after the window (one keep-alive client), /metrics size
  cold start             spawn serve with N pools on a fresh state dir and database -> GET /pools shows all ready;
                         next to it "engines alone": N bare engines started at once, each on a unix socket (as
                         poolmgr's engines serve), until all answer /health 200
  kill -9 -> re-adopted  SIGKILL serve (its engines keep running), start a new serve on the same state; from the new
                         serve's first GET /health 200 until every pool is ready with the same engine pid and has its
                         `adopted` audit row (negative: all were re-adopted before the API answered); engines
                         restarted (goal 0), and the total from the kill

`--base REV` runs the same rows for REV's poolmgr (a temporary `git worktree`, PYTHONPATH=<it>, the same .venv),
interleaved row by row with this tree, and prints both tables and the ratios (this tree / REV). Commits before
the data plane run their engines on TCP, this tree on unix sockets: each table says which.

    .venv/bin/python bench/scale.py                          # N = 10, 50, 200 real + 1,000 fake, both databases
    .venv/bin/python bench/scale.py --pools 10 --fake-pools 0 --db sqlite --base HEAD~1
    .venv/bin/python bench/scale.py --quick                  # smoke run: N = 2, short windows, no fake row
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from _common import (
    REPO,
    TRANSPORT,
    emit,
    engine_argv,
    free_port,
    http_status,
    llama_server_path,
    machine,
    median,
    pg_problem,
    print_table,
    shared_dir,
    stop_process,
    wait_health_200,
)
from _serve import MARKER, remove_pool_cgroup

from poolmgr.engines.tiny_model import write_tiny_model

PREFIX = "POOL_MANAGERD_"
REQUIRED_SETTINGS = ("ADDR", "STATE_DIR", "CONFIG", "DATABASE_URL", "LLAMA_SERVER")
OPTIONAL_SETTINGS = {"LOG_LEVEL": "WARNING"}
PG_URL = os.environ.get("POOLMGR_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
FAKE_ENGINE = REPO / "bench" / "fake_engine.c"  # a C stand-in: 1,000 Python ones cost more than 2 cores have
CLK_TCK = os.sysconf("SC_CLK_TCK")
MEMORY_SHARE = 0.70  # a row runs only if its estimate fits in this share of MemAvailable
SERVE_BASE_BYTES = 200 * 2**20  # the estimate of serve's own memory: base + per pool (generous)
SERVE_PER_POOL_BYTES = 2**20
HEADER = (
    "N pools", "idle poolmgr CPU", "idle DB commits/s", "GET /metrics (ms, bytes)", "GET /pools (ms)",
    "cold start -> all ready", "kill -9 -> all re-adopted",
)  # fmt: skip
# (key, limit, label): the goals, set for 200 real pools (applied to every real row) and 1,000 fake ones.
GOALS_REAL = (
    ("idle_cpu_pct", 1.0, "CPU %"), ("idle_commits_per_s", 1.0, "commits/s"),
    ("metrics_ms_p95", 50.0, "/metrics p95 ms"), ("pools_ms_p95", 20.0, "/pools p95 ms"),
    ("cold_start_s", 10.0, "cold start s"), ("readopt_after_api_s", 1.0, "re-adopted s after the API"),
    ("restarted", 0, "restarted"),
)  # fmt: skip
GOALS_FAKE = (
    ("idle_cpu_pct", 5.0, "CPU %"), ("metrics_ms_p95", 50.0, "/metrics p95 ms"),
    ("readopt_after_api_s", 1.0, "re-adopted s after the API"), ("restarted", 0, "restarted"),
)  # fmt: skip


# -- what runs: source trees, engines -------------------------------------------------------------------------
@dataclass(frozen=True)
class Tree:
    """A poolmgr source tree whose `serve` is measured (this checkout, or the --base worktree)."""

    label: str
    path: Path
    rev: str
    settings: frozenset[str]  # the POOL_MANAGERD_* variables its settings understand
    transport: str  # where its engines serve: "unix socket" (this tree), "TCP" (commits before the data plane)


def load_tree(label: str, path: Path) -> Tree:
    code = (
        "import dataclasses, poolmgr\nfrom poolmgr.settings import PoolManagerConfig\nprint(poolmgr.__file__)\n"
        "print(' '.join(f.name.upper() for f in dataclasses.fields(PoolManagerConfig)))\n"
        "import poolmgr.lifecycle.runtime as r\nprint('unix socket' if hasattr(r, 'ENGINE_SOCKET') else 'TCP')"
    )
    env = {**os.environ, "PYTHONPATH": str(path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=path, env=env, capture_output=True, text=True, check=True)
    where, names, transport = out.stdout.splitlines()[-3:]
    if not Path(where).resolve().is_relative_to(path.resolve()):
        raise SystemExit(f"{label}: poolmgr imports from {where}, not from {path}")
    rev = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return Tree(label, path, rev.stdout.strip() + ("+changes" if dirty else ""),
                frozenset(PREFIX + n for n in names.split()), transport)  # fmt: skip


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A temporary detached `git worktree` of `rev` (in a 0755 directory), removed afterwards."""
    holder = Path(tempfile.mkdtemp(prefix="poolmgr-scale-base-"))
    holder.chmod(0o755)
    path = holder / "tree"
    git = ["git", "-C", str(REPO), "worktree"]
    added = subprocess.run([*git, "add", "--detach", str(path), rev], check=False, capture_output=True, text=True)
    try:
        if added.returncode != 0:
            raise SystemExit(f"git worktree add --detach {path} {rev}: {added.stderr.strip()}")
        yield path
    finally:
        subprocess.run([*git, "remove", "--force", str(path)], check=False, capture_output=True)
        shutil.rmtree(holder, ignore_errors=True)
        subprocess.run([*git, "prune"], check=False, capture_output=True)


@dataclass
class Engine:
    """What POOL_MANAGERD_LLAMA_SERVER points to, the model, and the memory one engine takes (Pss, probed)."""

    kind: str  # "real" | "fake"
    binary: Path
    model: Path
    pss_bytes: float = float("nan")


def make_engines(assets: Path, *, real: bool, fake: bool) -> dict[str, Engine]:
    model = write_tiny_model(assets / "tiny.gguf")
    model.chmod(0o644)
    engines = {}
    if real:
        engines["real"] = Engine("real", llama_server_path(), model)
    if fake:
        binary = assets / "llama-server"
        subprocess.run(["cc", "-O2", "-o", str(binary), str(FAKE_ENGINE)], check=True)
        binary.chmod(0o755)
        engines["fake"] = Engine("fake", binary, model)
    for engine in engines.values():
        engine.pss_bytes = probe_pss(engine)
    return engines


def probe_pss(engine: Engine, count: int = 3) -> float:
    """Mean Pss of `count` engines started directly (as serve starts them: the tiny model, -c 2048, 1 slot, a unix
    socket), once each answers /health 200: the per-engine memory the estimate of a row uses."""
    with running_engines(engine, count, engine.model.parent, 60) as procs:
        return sum(pss_bytes(p.pid) for p in procs) / count


@contextlib.contextmanager
def running_engines(
    engine: Engine, n: int, where: Path, deadline_s: float, extra: Sequence[str] = ()
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`n` engines started at once, each on its own unix socket in `where` (where this tree's serve runs its engines
    too), yielded once every one answers /health 200 over it; stopped afterwards."""
    procs: list[tuple[Path, subprocess.Popen[bytes]]] = []
    try:
        for i in range(n):
            sock = where / f"alone-{i}.sock"
            argv = engine_argv(engine.binary, engine.model, sock, "-c", "2048", "-np", "1", *extra)
            procs.append((sock, subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL, start_new_session=True)))  # fmt: skip
        for sock, proc in procs:
            wait_health_200(sock, deadline_s, proc=proc)
        yield [proc for _, proc in procs]
    finally:
        for sock, proc in procs:
            stop_process(proc)
            sock.unlink(missing_ok=True)


def pss_bytes(pid: int) -> float:
    for name, key in ((f"/proc/{pid}/smaps_rollup", "Pss:"), (f"/proc/{pid}/status", "VmRSS:")):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1]) * 1024.0
    return float("nan")


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def memory_problem(n: int, engine: Engine) -> str | None:
    """Why N engines (and serve) would not fit in MEMORY_SHARE of MemAvailable now, or None."""
    avail = mem_available()
    need = n * engine.pss_bytes * 1.1 + SERVE_BASE_BYTES + n * SERVE_PER_POOL_BYTES
    if need <= MEMORY_SHARE * avail:
        return None
    return (
        f"{n} engines x {engine.pss_bytes / 2**20:.1f} MiB (Pss of 3 probe engines, +10 %) + serve "
        f"~{(SERVE_BASE_BYTES + n * SERVE_PER_POOL_BYTES) / 2**20:.0f} MiB = {need / 2**30:.1f} GiB > "
        f"{MEMORY_SHARE:.0%} of MemAvailable {avail / 2**30:.1f} GiB"
    )


# -- databases ------------------------------------------------------------------------------------------------
def shm_change_counter(db_path: Path) -> int | None:
    """SQLite's wal-index header (the first 48 bytes of <db>-shm, twice): iChange, +1 on every write commit of any
    connection; None without a -shm file (or while a writer is between the two copies)."""
    for _ in range(100):
        try:
            with open(f"{db_path}-shm", "rb") as f:
                head = f.read(96)
        except OSError:
            return None
        if len(head) == 96 and head[:48] == head[48:]:
            return int(struct.unpack_from("=I", head, 8)[0])
        time.sleep(0.001)
    return None


class SqliteDb:
    label = "sqlite"
    counter = "write commits: wal-index iChange (<db>-shm)"
    lag_s = 0.0  # the counter is the writers' own, at once

    def __init__(self, state: Path) -> None:
        self.path = state / "poolmgr.db"
        self.url = f"sqlite:///{self.path}"

    def commits(self) -> int | None:
        return shm_change_counter(self.path)

    @contextlib.contextmanager
    def events(self) -> Iterator[EventReader]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            yield EventReader(conn, "?")
        finally:
            conn.close()

    def close(self) -> None:
        pass


class PgDb:
    """A fresh database on the server of `admin_url`, dropped by close(); commits read from pg_stat_database over
    the admin connection (another database: its own reads land in that database's counters, not in ours)."""

    label = "postgresql"
    counter = "pg_stat_database.xact_commit"

    def __init__(self, admin_url: str, lag_s: float) -> None:
        import psycopg

        self.lag_s = lag_s
        self.name = f"poolmgr_scale_{uuid.uuid4().hex[:8]}"
        self.admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
        self.admin.execute(f'CREATE DATABASE "{self.name}"')
        self.url = urlunsplit(urlsplit(admin_url)._replace(path="/" + self.name))

    def commits(self) -> int | None:
        self.admin.execute("SELECT pg_stat_clear_snapshot()")
        row = self.admin.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (self.name,)).fetchone()
        return None if row is None else int(row[0])

    @contextlib.contextmanager
    def events(self) -> Iterator[EventReader]:
        import psycopg

        conn = psycopg.connect(self.url, autocommit=True)
        try:
            yield EventReader(conn, "%s")
        finally:
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.admin.close()


class EventReader:
    """The audit table read directly (a plain DB-API connection): where the kill is, and who was re-adopted."""

    def __init__(self, conn: Any, placeholder: str) -> None:
        self.conn, self.p = conn, placeholder

    def max_id(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM pool_events").fetchone()[0])

    def adopted_since(self, cut: int) -> tuple[int, float | None]:
        """(pools with an `adopted` row after event `cut`, the newest such row's time as a Unix timestamp)."""
        sql = f"SELECT COUNT(DISTINCT pool_id), MAX(at) FROM pool_events WHERE id > {self.p} AND kind = 'adopted'"
        count, last = self.conn.execute(sql, (cut,)).fetchone()
        if isinstance(last, str):
            last = datetime.fromisoformat(last)
        if isinstance(last, datetime):
            return int(count), (last if last.tzinfo else last.replace(tzinfo=UTC)).timestamp()
        return int(count), None


# -- one serve ------------------------------------------------------------------------------------------------
class ServeProc:
    """`python -m poolmgr.cli serve` of a tree (cwd and PYTHONPATH the tree, this .venv), logging to a file."""

    def __init__(self, tree: Tree, settings: dict[str, str], log_path: Path) -> None:
        self.tree, self.log_path = tree, log_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
        self.env.update(settings, PYTHONPATH=str(tree.path))
        self.base = "http://" + settings[PREFIX + "ADDR"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.engine_pids: list[int] = []  # the engines the first serve left behind at its SIGKILL

    def spawn(self) -> float:
        """Start it; time.monotonic() just before the spawn."""
        with open(self.log_path, "ab") as log:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "poolmgr.cli", "serve"],
                env=self.env, cwd=self.tree.path, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        return t0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"serve exited {self.proc.returncode}; its log ends:\n{self.log_tail()}")

    def cpu_ticks(self) -> int:
        """utime + stime of the serve process (all its threads; not its children), in clock ticks."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, grace_s: float) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s=grace_s)

    def log_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""


# Each engine runs one thread: N engines on 2 cores with llama.cpp's default (a thread per core, spinning
# while it waits) took 37 s to start 50 here, against 3.3 s with one thread each (docs/benchmarks.md).
ENGINE_ARGS = ("--threads", "1")


def write_pools(path: Path, ids: Sequence[str], model: Path) -> None:
    extra = ", ".join(f'"{a}"' for a in ENGINE_ARGS)
    path.write_text("".join(
        f'[[pool]]\nid = "{i}"\nmodel = "{model}"\nslots = 1\ndevice_mask = "cpu"\nextra_args = [{extra}]\n\n'
        for i in ids
    ))  # fmt: skip


def engines_alone(engine: Engine, n: int, where: Path) -> float:
    """The floor of a cold start: `n` bare engines (same model and flags as serve gives them, each on a unix socket
    in `where`) started at once, until every one answers /health 200."""
    started = time.monotonic()
    with running_engines(engine, n, where, 60 + 0.5 * n, ENGINE_ARGS):
        return time.monotonic() - started


def marked_pids(prefix: str) -> list[int]:
    """Live processes whose environment carries POOLMGR_POOL=<a pool id starting with prefix>: one /proc pass."""
    want, found = f"{MARKER}={prefix}".encode(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                env = (entry / "environ").read_bytes().split(b"\0")
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] not in ("Z", "X") and any(v.startswith(want) for v in env):
                    found.append(int(entry.name))
    return found


def pools_now(client: httpx.Client, base: str) -> list[dict[str, Any]]:
    resp = client.get(base + "/pools")
    resp.raise_for_status()
    return list(resp.json())


def count_states(pools: list[dict[str, Any]]) -> str:
    states: dict[str, int] = {}
    for p in pools:
        states[p["state"]] = states.get(p["state"], 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "no pools"


# -- the phases of a row ----------------------------------------------------------------------------------------
def cold_start(serve: ServeProc, client: httpx.Client, n: int, deadline_s: float) -> float:
    """Spawn serve; seconds until GET /pools shows all N ready (polled, at most half of the API's time)."""
    t0 = serve.spawn()
    last: list[dict[str, Any]] = []
    while time.monotonic() < t0 + deadline_s:
        serve.check_alive()
        asked = time.monotonic()
        with contextlib.suppress(httpx.HTTPError):
            last = pools_now(client, serve.base)
            if len(last) == n and all(p["state"] == "ready" for p in last):
                return time.monotonic() - t0
        time.sleep(max(0.02, time.monotonic() - asked))
    raise TimeoutError(f"not all {n} pools ready in {deadline_s:.0f} s ({count_states(last)})\n{serve.log_tail()}")


def idle_window(serve: ServeProc, db: SqliteDb | PgDb, settle_s: float, window_s: float) -> dict[str, float]:
    """serve's CPU over [T0, T0 + window] (T0: settle_s after all ready), and the database's commits over the same
    window as its counter shows them `db.lag_s` later (PostgreSQL publishes a backend's counts up to 10 s late)."""
    time.sleep(settle_s)
    t0 = time.monotonic()
    cpu: list[tuple[float, int]] = []
    commits: list[tuple[float, int | None]] = []
    for offset, what in sorted([(0.0, "cpu"), (window_s, "cpu"), (db.lag_s, "db"), (window_s + db.lag_s, "db")]):
        time.sleep(max(0.0, t0 + offset - time.monotonic()))
        if what == "cpu":
            cpu.append((time.monotonic(), serve.cpu_ticks()))
        else:
            commits.append((time.monotonic(), db.commits()))
    (a, k0), (b, k1) = cpu
    (c, c0), (d, c1) = commits
    rate = float("nan") if c0 is None or c1 is None else (c1 - c0 if c1 >= c0 else c1) / (d - c)
    return {"idle_cpu_pct": (k1 - k0) / CLK_TCK / (b - a) * 100, "idle_commits_per_s": rate,
            "serve_rss_mib": rss_mib(serve.pid)}  # fmt: skip


def rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def p95(values: Sequence[float]) -> float:
    ranked = sorted(values)
    return ranked[max(0, math.ceil(0.95 * len(ranked)) - 1)] if ranked else float("nan")


def timed_gets(client: httpx.Client, url: str, count: int) -> tuple[list[float], int]:
    """Seconds of each GET (to the whole body), and the last body's size in bytes."""
    times, size = [], 0
    for _ in range(count):
        t0 = time.perf_counter()
        resp = client.get(url)
        size = len(resp.content)
        times.append(time.perf_counter() - t0)
        resp.raise_for_status()
    return times, size


def request_timings(client: httpx.Client, base: str, count: int) -> dict[str, float]:
    metrics, size = timed_gets(client, base + "/metrics", count)
    pools, _ = timed_gets(client, base + "/pools", count)
    return {
        "metrics_ms_median": median(metrics) * 1000, "metrics_ms_p95": p95(metrics) * 1000, "metrics_bytes": size,
        "pools_ms_median": median(pools) * 1000, "pools_ms_p95": p95(pools) * 1000,
    }  # fmt: skip


def wait_api(serve: ServeProc, deadline_s: float) -> float:
    """Poll GET /health every 2 ms; time.time() of the first 200."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        serve.check_alive()
        if http_status(serve.base + "/health", timeout=0.5) == 200:
            return time.time()
        time.sleep(0.002)
    raise TimeoutError(f"the new serve did not answer /health in {deadline_s:.0f} s\n{serve.log_tail()}")


def kill_and_readopt(serve: ServeProc, client: httpx.Client, db: SqliteDb | PgDb, deadline_s: float) -> dict[str, Any]:
    before = {p["pool_id"]: p["pid"] for p in pools_now(client, serve.base)}
    serve.engine_pids = [int(pid) for pid in before.values() if pid]
    client.close()  # its keep-alive connection would outlive the killed serve
    with db.events() as events:
        cut = events.max_id()
        t_kill = time.time()
        serve.kill9()
        serve.spawn()
        t_api = wait_api(serve, deadline_s)
        with httpx.Client(timeout=30, trust_env=False) as fresh:
            t_done, restarted = wait_readopted(serve, fresh, events, cut, before, time.monotonic() + deadline_s)
    return {
        "readopt_after_api_s": t_done - t_api,
        "readopt_from_kill_s": t_done - t_kill,
        "api_after_kill_s": t_api - t_kill,
        "restarted": restarted,
    }


def wait_readopted(
    serve: ServeProc, client: httpx.Client, events: EventReader, cut: int, before: dict[str, Any], end: float
) -> tuple[float, int]:
    """Until every pool is ready, and each one with its old engine pid has its `adopted` row after `cut`: (the
    last adopted row's time, or when we saw all ready if some engine was replaced; how many were replaced)."""
    n, checked, last = len(before), 0.0, []
    while time.monotonic() < end:
        serve.check_alive()
        count, last_at = events.adopted_since(cut)
        if count >= n or time.monotonic() - checked > 0.25:
            checked, last = time.monotonic(), pools_now(client, serve.base)
            ready = [p for p in last if p["state"] == "ready" and p["pool_id"] in before]
            moved = sum(1 for p in ready if p["pid"] != before[p["pool_id"]])
            if len(ready) == n and count >= n - moved:
                return (last_at if moved == 0 and last_at is not None else time.time()), moved
        time.sleep(0.01)
    raise TimeoutError(f"not re-adopted in time ({count_states(last)})\n{serve.log_tail()}")


# -- a row ------------------------------------------------------------------------------------------------------
@dataclass
class RowSpec:
    tree: Tree
    db: str  # "sqlite" | "postgresql"
    engine: Engine
    n: int

    @property
    def name(self) -> str:
        return f"{self.tree.label} {self.db} {self.n} {self.engine.kind}"


@dataclass
class Ctx:
    args: argparse.Namespace
    settings: frozenset[str]  # the POOL_MANAGERD_* names every tree understands
    results: list[dict[str, Any]] = field(default_factory=list)


def row_head(spec: RowSpec) -> dict[str, Any]:
    return {"bench": "scale", "tree": spec.tree.label, "rev": spec.tree.rev, "db": spec.db,
            "engine": spec.engine.kind, "pools": spec.n, "engine_transport": spec.tree.transport}  # fmt: skip


def run_row(ctx: Ctx, spec: RowSpec) -> dict[str, Any]:
    row = row_head(spec)
    problem = memory_problem(spec.n, spec.engine)
    if problem is not None:
        print(f"  {spec.name}: skipped: {problem}", flush=True)
        return {**row, "skipped": problem}
    tag = uuid.uuid4().hex[:6]
    prefix = f"scale-{tag}-"
    ids = [f"{prefix}{i:04d}" for i in range(spec.n)]
    with shared_dir(f"poolmgr-scale-{tag}-") as d, contextlib.ExitStack() as stack:
        state = d / "state"
        state.mkdir(mode=0o755)
        db: SqliteDb | PgDb = SqliteDb(state) if spec.db == "sqlite" else PgDb(ctx.args.pg_url, ctx.args.pg_lag_s)
        stack.callback(db.close)
        write_pools(d / "pools.toml", ids, spec.engine.model)
        serve = ServeProc(
            spec.tree, serve_settings(ctx, state, d / "pools.toml", db.url, spec.engine), state / "serve.log"
        )
        floor = engines_alone(spec.engine, spec.n, d)
        stack.callback(cleanup, serve, prefix, ids, spec.n)
        row.update(measure(ctx, serve, db, spec.n), commit_counter=db.counter, engines_alone_s=floor)
    return row


def serve_settings(ctx: Ctx, state: Path, pools: Path, db_url: str, engine: Engine) -> dict[str, str]:
    wanted = {
        "ADDR": f"127.0.0.1:{free_port()}", "STATE_DIR": str(state), "CONFIG": str(pools), "DATABASE_URL": db_url,
        "LLAMA_SERVER": str(engine.binary), **OPTIONAL_SETTINGS,
    }  # fmt: skip
    return {PREFIX + k: v for k, v in wanted.items() if PREFIX + k in ctx.settings}


def measure(ctx: Ctx, serve: ServeProc, db: SqliteDb | PgDb, n: int) -> dict[str, Any]:
    args = ctx.args
    client = httpx.Client(timeout=60, trust_env=False)
    try:
        out: dict[str, Any] = {"cold_start_s": cold_start(serve, client, n, 60 + 0.5 * n)}
        out.update(idle_window(serve, db, args.settle_s, args.window_s))
        out.update(request_timings(client, serve.base, args.requests))
        out.update(kill_and_readopt(serve, client, db, 30 + 0.2 * n))
    finally:
        client.close()
    out.update(window_s=args.window_s, settle_s=args.settle_s, requests=args.requests)
    return out


def cleanup(serve: ServeProc, prefix: str, ids: Sequence[str], n: int) -> None:
    """SIGTERM serve (it stops its engines), SIGKILL whatever of this row is left, remove the pools' cgroups."""
    serve.stop(grace_s=30 + 0.1 * n)
    left = marked_pids(prefix)
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if left:
        print(f"  warning: {len(left)} engine process(es) outlived serve's SIGTERM; killed", flush=True)
    # The engines orphaned by the SIGKILL are init's children now: wait (a little) until it has reaped them.
    end = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in serve.engine_pids) and time.monotonic() < end:
        time.sleep(0.05)
    for pool_id in ids:
        remove_pool_cgroup(pool_id)


# -- the report -------------------------------------------------------------------------------------------------
def cells(r: dict[str, Any]) -> list[str]:
    label = f"{r['pools']}" + (" fake" if r["engine"] == "fake" else "")
    if r.get("skipped") or r.get("error"):
        return [label, "skipped" if r.get("skipped") else "FAILED", *["-"] * 5]
    readopt = (
        f"{r['readopt_after_api_s']:.2f} s ({r['restarted']} restarted; {r['readopt_from_kill_s']:.2f} s from kill)"
    )
    return [
        label, f"{r['idle_cpu_pct']:.2f} %", num(r["idle_commits_per_s"]),
        f"{r['metrics_ms_median']:.1f} / {r['metrics_ms_p95']:.1f} ms, {r['metrics_bytes']:,} B",
        f"{r['pools_ms_median']:.1f} / {r['pools_ms_p95']:.1f} ms",
        f"{r['cold_start_s']:.2f} s (engines alone {r['engines_alone_s']:.2f} s)", readopt,
    ]  # fmt: skip


def num(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}"


def goal_check(r: dict[str, Any]) -> tuple[bool, str]:
    goals = GOALS_FAKE if r["engine"] == "fake" else GOALS_REAL
    parts, met = [], True
    for key, limit, label in goals:
        value = round(float(r[key]), 2)  # no finer than the table shows (1 clock tick = 0.1 % over 10 s)
        ok = value == value and value <= limit
        met &= ok
        parts.append(f"{label} {value:g} <= {limit:g} {'ok' if ok else 'MISSED'}")
    return met, "; ".join(parts)


def report(results: list[dict[str, Any]], trees: Sequence[Tree]) -> None:
    for tree in trees:
        for db in dict.fromkeys(r["db"] for r in results):
            rows = [r for r in results if r["tree"] == tree.label and r["db"] == db]
            print()
            print_table(f"{tree.label} ({tree.rev}, engines on {tree.transport}), {db}, "
                        f"{rows[0].get('commit_counter', '')}: median / p95 of the GETs", HEADER,
                        [cells(r) for r in rows])  # fmt: skip
            for r in rows:
                if r.get("goal_met") is not None:
                    print(f"  goal ({'1,000 fake' if r['engine'] == 'fake' else '200 real'} pools) at "
                          f"{cells(r)[0]}: {'MET' if r['goal_met'] else 'MISSED'} - {r['goal_detail']}")  # fmt: skip
                elif r.get("skipped") or r.get("error"):
                    print(f"  {cells(r)[0]}: {r.get('skipped') or r.get('error')}")
    if len(trees) == 2:
        ratios(results, trees)


RATIO_KEYS = ("idle_cpu_pct", "idle_commits_per_s", "metrics_ms_median", "pools_ms_median", "cold_start_s",
              "readopt_from_kill_s")  # fmt: skip


def ratios(results: list[dict[str, Any]], trees: Sequence[Tree]) -> None:
    head, base = trees
    rows = []
    for r in results:
        if r["tree"] != head.label or "cold_start_s" not in r:
            continue
        key = (r["db"], r["engine"], r["pools"])
        other = next((b for b in results if b["tree"] == base.label and (b["db"], b["engine"], b["pools"]) == key), {})
        rows.append([f"{r['pools']}{' fake' if r['engine'] == 'fake' else ''} {r['db']}",
                     *(ratio(r.get(k), other.get(k)) for k in RATIO_KEYS)])  # fmt: skip
    print()
    header = ("N pools", "CPU", "commits/s", "/metrics", "/pools", "cold start", "kill -9 -> re-adopted (total)")
    print_table(f"ratios {head.label} ({head.rev}) / {base.label} ({base.rev}), medians; < 1: cheaper now",
                header, rows)  # fmt: skip


def ratio(a: Any, b: Any) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or b != b or a != a:
        return "-"
    return f"{a / b:.2f}x" if b else ("1.00x" if a == 0 else "inf")


# -- main -------------------------------------------------------------------------------------------------------
def plan(args: argparse.Namespace, trees: Sequence[Tree], engines: dict[str, Engine]) -> list[RowSpec]:
    """Every row, each tree's next to the other's (interleaved: both see the same machine load)."""
    specs = []
    for db in args.db:
        sizes = [("real", n) for n in args.pools] + ([("fake", args.fake_pools)] if args.fake_pools else [])
        for kind, n in sizes:
            specs += [RowSpec(tree, db, engines[kind], n) for tree in trees]
    return specs


def run_all(args: argparse.Namespace, trees: Sequence[Tree]) -> list[dict[str, Any]]:
    ctx = Ctx(args, frozenset.intersection(*(t.settings for t in trees)))
    missing = [PREFIX + s for s in REQUIRED_SETTINGS if PREFIX + s not in ctx.settings]
    if missing:
        raise SystemExit(f"a tree does not understand {', '.join(missing)}")
    dropped = sorted(PREFIX + s for s in OPTIONAL_SETTINGS if PREFIX + s not in ctx.settings)
    if dropped:
        print(f"not passed (a tree does not understand them): {', '.join(dropped)}")
    with shared_dir("poolmgr-scale-assets-") as assets:
        engines = make_engines(assets, real=bool(args.pools), fake=bool(args.fake_pools))
        for e in engines.values():
            print(f"{e.kind} engine {e.binary}: {e.pss_bytes / 2**20:.1f} MiB Pss each (3 probes)", flush=True)
        print(f"engines alone (the cold start's floor): bare engines, each on a {TRANSPORT}", flush=True)
        for tree in trees:
            if tree.transport != "unix socket":
                print(f"{tree.label} ({tree.rev}) runs its engines on {tree.transport}, not on a unix socket "
                      "(a commit before the data plane): its serve is measured as it is", flush=True)  # fmt: skip
        for spec in plan(args, trees, engines):
            ctx.results.append(run_one(ctx, spec))
    return ctx.results


def run_one(ctx: Ctx, spec: RowSpec) -> dict[str, Any]:
    print(f"row {spec.name} ...", flush=True)
    try:
        row = run_row(ctx, spec)
    except Exception as exc:
        print(f"  {spec.name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
        return {**row_head(spec), "error": f"{type(exc).__name__}: {exc}"[:2000]}
    if "cold_start_s" in row:
        row["goal_met"], row["goal_detail"] = goal_check(row)
        print(f"  {' | '.join(cells(row)[1:])}", flush=True)
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--pools", default="10,50,200", help="real pool counts (default 10,50,200; '' for none)")
    ap.add_argument("--fake-pools", type=int, default=None, help="fake-engine pools (default 1000, --quick 0; 0: none)")
    ap.add_argument("--db", default="sqlite,postgresql", help="sqlite,postgresql (default both)")
    ap.add_argument("--pg-url", default=PG_URL, help=f"PostgreSQL server to create the bench's database on ({PG_URL})")
    ap.add_argument("--window-s", type=float, default=None, help="idle window in seconds (default 10, --quick 1)")
    ap.add_argument("--settle-s", type=float, default=None, help="wait after all ready (default 3, --quick 1)")
    ap.add_argument("--requests", type=int, default=None, help="GETs of /metrics and of /pools (default 20, --quick 5)")
    ap.add_argument(
        "--pg-lag-s",
        type=float,
        default=None,
        help="read pg_stat_database this long after each end of the window (default 11, --quick 0)",
    )
    ap.add_argument("--base", metavar="REV", help="also run REV's poolmgr (a temporary git worktree), side by side")
    ap.add_argument("--quick", action="store_true", help="smoke run: N=2, short windows, no fake row")
    ap.add_argument("--json", action="store_true", help="end with one JSON line per row")
    args = ap.parse_args(argv)
    quick = args.quick
    args.pools = [2] if quick and args.pools == "10,50,200" else [int(x) for x in args.pools.split(",") if x.strip()]
    args.db = [x.strip() for x in args.db.split(",") if x.strip()]
    if unknown := set(args.db) - {"sqlite", "postgresql"}:
        ap.error(f"--db: unknown {', '.join(sorted(unknown))} (allowed: sqlite, postgresql)")
    defaults = {
        "fake_pools": (0, 1000),
        "window_s": (1.0, 10.0),
        "settle_s": (1.0, 3.0),
        "requests": (5, 20),
        "pg_lag_s": (0.0, 11.0),
    }
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a SIGTERM unwinds: every row cleans up
    if "postgresql" in args.db and (problem := pg_problem(args.pg_url)) is not None:
        print(f"PostgreSQL at {args.pg_url} not reachable ({problem}): PostgreSQL rows skipped")
        args.db.remove("postgresql")
    print(f"machine: {machine()}; MemAvailable {mem_available() / 2**30:.1f} GiB", flush=True)
    with contextlib.ExitStack() as stack:
        trees = [load_tree("this tree", REPO)]
        if args.base:
            trees.append(load_tree(f"base {args.base}", stack.enter_context(worktree(args.base))))
        results = run_all(args, trees)
    report(results, trees)
    if args.json:
        for r in results:
            emit({**r, "machine": machine()})
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
