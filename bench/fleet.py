"""Benchmark (issue 16, the fleet): many nodes on one PostgreSQL, as the database sees them.

On a fresh PostgreSQL database (created by the bench, migrated with `poolmgr.store.migrate`, dropped at the end,
also on an error, Ctrl-C or SIGTERM), --nodes simulated nodes (`node-000`, ...) each register --pools-per-node
pools (`Registry.register_all`, one transaction a node) and bring them to `ready` through the lifecycle's
effects (Placed, PreloadStarted(CPU_PLACEMENT), PreloadSucceeded; no engines): --nodes x --pools-per-node pools
in the `pool_registry` view. Then every node heartbeats every --heartbeat-ms with grace --grace-ms, as an idle
running poolmgr does: `Registry.heartbeat_node` itself, each node at its own phase (node i at i/nodes of the
interval, on a fixed schedule), driven by --threads threads. The simulated nodes of one thread share that
thread's connection (a SQLAlchemy engine made by `poolmgr.store.make_engine`, as a node makes its own): 100
connections would be the whole of this server's max_connections; a connection per node or a shared one sends
the same statements. Measured, in this order:

  write transactions/s the transaction ids the server assigned over --window-s (pg_current_snapshot()'s xmax at
                       each end, read at once: exact, no publishing lag; a write transaction gets one, a read-only
                       one none; cluster-wide, so nothing else may write meanwhile). The goal is checked on it:
                       <= nodes / interval (the heartbeats only: one write transaction each).
  commits/s            pg_stat_database.xact_commit of the bench's database over --window-s while nothing but the
                       heartbeats runs, read over a connection to another database (the `postgres` one: those
                       reads are not counted in ours). PostgreSQL 15 publishes a backend's counts at most once a
                       second and late: each end of the window is read --pg-lag-s after it (the heartbeats go on
                       meanwhile, so the shift counts the window's commits). Next to it: the heartbeats the nodes
                       sent in the window (their transactions' start), so commits per heartbeat, and the heartbeat
                       call's latency (median / p95, the pool's checkout included) and how late the latest one
                       started against its schedule. Read-only transactions count here too (none are expected);
                       each backend publishes at most once a second, so each end is uncertain by ~1 s of commits.
  fleet view           after the window, while the heartbeats go on: --queries runs each (one every 50 ms, one
                       psycopg connection in autocommit, as orchestratord would read it; execute + fetchall) of
                         routable   SELECT pool_id, node_id, model, slots_free, endpoint_url FROM pool_registry
                                    WHERE routable
                         per model  SELECT model, count(*), sum(slots_free) FROM pool_registry WHERE routable
                                    GROUP BY model
                       median / p95 ms. Goal: p95 <= 20 ms at 1,000 pools.
  dead node            one node (the middle one) stops heartbeating at a random point of its interval; the view
                       is polled every ~20 ms (one query: that node's routable pools, and the other nodes' pools
                       that are not routable) until none of its pools is routable. Reported: the time from the
                       start of its last heartbeat transaction to the start of the poll that saw it (the view
                       computes liveness with the database's clock at that poll's start), and from the stop.
                       Goal: <= grace + one interval. The other nodes' pools must stay routable throughout.

    .venv/bin/python bench/fleet.py              # 100 nodes x 10 pools, heartbeat 1 s, grace 5 s (~1 minute)
    .venv/bin/python bench/fleet.py --quick      # smoke run: 5 nodes x 2 pools, heartbeat 200 ms, grace 800 ms
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import math
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from _common import emit, machine, median, pg_problem, print_table

from poolmgr.lifecycle.effects import Placed, PreloadStarted, PreloadSucceeded, ReadyInfo
from poolmgr.lifecycle.fsm import fire
from poolmgr.lifecycle.placing import CPU_PLACEMENT
from poolmgr.poolsfile import PoolSpec
from poolmgr.store import Registry, make_engine, migrate

PG_URL = os.environ.get("POOLMGR_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
MODELS = 10  # pool j of every node serves /models/m<j % MODELS>.gguf: the per-model query has groups
SLOTS = 4
VIEW_GOAL_MS = 20.0
POLL_S = 0.02
QUERY_GAP_S = 0.05
QUERIES = {
    "routable": "SELECT pool_id, node_id, model, slots_free, endpoint_url FROM pool_registry WHERE routable",
    "per model": "SELECT model, count(*), sum(slots_free) FROM pool_registry WHERE routable GROUP BY model",
}
DEAD_POLL = (
    "SELECT count(*) FILTER (WHERE node_id = %(n)s), count(*) FILTER (WHERE node_id = %(n)s AND routable), "
    "count(*) FILTER (WHERE node_id <> %(n)s AND NOT routable) FROM pool_registry"
)


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))])


# -- the database -----------------------------------------------------------------------------------------------
class FleetDb:
    """A fresh database on the server of `admin_url`, dropped (WITH (FORCE)) by close(); its committed
    transactions read from pg_stat_database over the admin connection (another database)."""

    def __init__(self, admin_url: str) -> None:
        import psycopg

        self.name = f"poolmgr_fleet_{uuid.uuid4().hex[:8]}"
        self.admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
        self.admin.execute(f'CREATE DATABASE "{self.name}"')
        self.url = urlunsplit(urlsplit(admin_url)._replace(path="/" + self.name))

    def commits(self) -> int:
        self.admin.execute("SELECT pg_stat_clear_snapshot()")
        row = self.admin.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (self.name,)).fetchone()
        return int(row[0]) if row is not None else 0

    def next_xid(self) -> int:
        """The next transaction id the server will assign (no lag, assigns none itself): the difference of two
        readings is the number of write transactions begun in between, in the whole cluster."""
        row = self.admin.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()
        return int(row[0]) if row is not None else 0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.admin.close()


def node_name(i: int) -> str:
    return f"node-{i:03d}"


def populate(url: str, nodes: int, per_node: int, grace_ms: int) -> float:
    """Every node's pools registered (one transaction a node) and brought to ready; each node's first
    heartbeat. Seconds."""
    began = time.perf_counter()
    for i in range(nodes):
        registry = Registry(url, node_id=node_name(i))
        try:
            ids = [f"{node_name(i)}-pool-{j:02d}" for j in range(per_node)]
            registry.register_all(
                [PoolSpec(id=p, model=f"/models/m{j % MODELS}.gguf", slots=SLOTS) for j, p in enumerate(ids)]
            )
            for pool_id in ids:
                fire(registry, pool_id, Placed())
                fire(registry, pool_id, PreloadStarted(CPU_PLACEMENT))
                ready = ReadyInfo(f"http://{node_name(i)}.fleet:8080/pools/{pool_id}/engine", None, SLOTS)
                fire(registry, pool_id, PreloadSucceeded(ready))
            registry.heartbeat_node(f"{node_name(i)}.fleet", grace_ms=grace_ms)
        finally:
            registry.close()
    return time.perf_counter() - began


# -- the nodes' heartbeats --------------------------------------------------------------------------------------
@dataclass
class Node:
    id: str
    registry: Registry
    phase_s: float
    stopped: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Sent:
    node: str
    wall: float  # time.time() at the heartbeat call's start
    mono: float  # time.monotonic() at its start
    late_s: float  # its start against its schedule
    latency_s: float


def node_registry(url: str, node_id: str, engine: Any) -> Registry:
    """A node's Registry whose heartbeat_node (unchanged) runs over `engine`: its thread's connection."""
    registry = Registry(url, node_id=node_id)
    registry.close()
    registry.engine = engine
    return registry


class Heartbeats:
    """--threads threads, each driving its share of the nodes on a fixed schedule (node i at phase i/nodes of
    the interval, then every interval); a stopped node sends no more."""

    def __init__(self, url: str, nodes: int, threads: int, interval_s: float, grace_ms: int) -> None:
        self.interval_s, self.grace_ms = interval_s, grace_ms
        self.done = threading.Event()
        self.beats: list[Sent] = []
        self.errors: list[str] = []
        self.engines = [make_engine(url) for _ in range(max(1, min(threads, nodes)))]  # as a node connects
        self.nodes = [
            Node(node_name(i), node_registry(url, node_name(i), self.engines[i % len(self.engines)]),
                 interval_s * i / nodes)
            for i in range(nodes)
        ]  # fmt: skip
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        t0 = time.monotonic() + 0.05
        for k in range(len(self.engines)):
            group = self.nodes[k :: len(self.engines)]
            thread = threading.Thread(target=self._run, args=(group, t0), name=f"heartbeats-{k}", daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, group: list[Node], t0: float) -> None:
        due = [(t0 + n.phase_s, i) for i, n in enumerate(group)]
        heapq.heapify(due)
        while due and not self.done.is_set():
            at, i = heapq.heappop(due)
            if self.done.wait(max(0.0, at - time.monotonic())):
                return
            node = group[i]
            if node.stopped.is_set():
                continue
            wall, mono = time.time(), time.monotonic()
            try:
                node.registry.heartbeat_node(f"{node.id}.fleet", grace_ms=self.grace_ms)
            except Exception as exc:  # reported, and the run fails: a heartbeat must not fail here
                self.errors.append(f"{node.id}: {type(exc).__name__}: {exc}")
            self.beats.append(Sent(node.id, wall, mono, mono - at, time.monotonic() - mono))
            heapq.heappush(due, (at + self.interval_s, i))

    def stop(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(10)
        for engine in self.engines:
            engine.dispose()

    def between(self, start: float, end: float) -> list[Sent]:
        return [b for b in list(self.beats) if start <= b.mono < end]


# -- the measures -----------------------------------------------------------------------------------------------
def steady_window(db: FleetDb, hb: Heartbeats, window_s: float, lag_s: float) -> dict[str, Any]:
    """Commits of the bench's database over the window (each end read lag_s after it), and the heartbeats."""
    start, xid_start = time.monotonic(), db.next_xid()
    time.sleep(lag_s)
    before = db.commits()
    time.sleep(max(0.0, start + window_s - time.monotonic()))
    end, xid_end = time.monotonic(), db.next_xid()
    time.sleep(lag_s)
    after = db.commits()
    beats = hb.between(start, end)
    elapsed = end - start
    latencies = [b.latency_s * 1000 for b in beats]
    return {
        "window_s": round(elapsed, 3), "commits": after - before, "commits_per_s": (after - before) / elapsed,
        "write_tx": xid_end - xid_start, "write_tx_per_s": (xid_end - xid_start) / elapsed,
        "heartbeats": len(beats), "heartbeats_per_s": len(beats) / elapsed,
        "commits_per_heartbeat": (after - before) / len(beats) if beats else float("nan"),
        "heartbeat_ms_median": median(latencies), "heartbeat_ms_p95": pct(latencies, 95),
        "heartbeat_late_ms_max": max((b.late_s * 1000 for b in beats), default=float("nan")),
    }  # fmt: skip


def view_times(url: str, runs: int) -> dict[str, Any]:
    """Each fleet query `runs` times (after one unmeasured run each), alternately, one every QUERY_GAP_S."""
    import psycopg

    times: dict[str, list[float]] = {name: [] for name in QUERIES}
    rows: dict[str, int] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for sql in QUERIES.values():
            conn.execute(sql).fetchall()
        for _ in range(runs):
            for name, sql in QUERIES.items():
                began = time.perf_counter()
                rows[name] = len(conn.execute(sql).fetchall())
                times[name].append((time.perf_counter() - began) * 1000)
                time.sleep(QUERY_GAP_S)
    out: dict[str, Any] = {}
    for name, values in times.items():
        key = name.replace(" ", "_")
        out.update({f"view_{key}_ms_median": median(values), f"view_{key}_ms_p95": pct(values, 95),
                    f"view_{key}_rows": rows.get(name, 0)})  # fmt: skip
    out["view_runs"] = runs
    return out


def poll_dead(conn: Any, node_id: str) -> tuple[int, int, int]:
    """(the node's pools, how many of them are routable, the other nodes' pools that are not routable)."""
    total, routable, others = conn.execute(DEAD_POLL, {"n": node_id}).fetchone()
    return int(total), int(routable), int(others)


def dead_node(url: str, hb: Heartbeats, node: Node, timeout_s: float) -> dict[str, Any]:
    """Stop `node` at a random point of its interval; poll the view until none of its pools is routable."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        total, routable_before, _ = poll_dead(conn, node.id)
        time.sleep(random.uniform(0, hb.interval_s))
        stopped = time.time()
        node.stopped.set()
        others_max, polls = 0, 0
        seen: float | None = None
        while time.time() - stopped < timeout_s:
            polled = time.time()
            _, routable, others = poll_dead(conn, node.id)
            polls, others_max = polls + 1, max(others_max, others)
            if routable == 0:
                seen = polled
                break
            time.sleep(max(0.0, polled + POLL_S - time.time()))
        _, _, others_after = poll_dead(conn, node.id)
    last = max((b.wall for b in list(hb.beats) if b.node == node.id), default=float("nan"))
    return {
        "dead_node": node.id, "dead_node_pools": total, "dead_routable_before": routable_before,
        "dead_seen": seen is not None, "dead_polls": polls,
        "dead_shown_s": (seen - last) if seen is not None else float("nan"),
        "dead_from_stop_s": (seen - stopped) if seen is not None else float("nan"),
        "others_unroutable_max": max(others_max, others_after),
    }  # fmt: skip


# -- the report -------------------------------------------------------------------------------------------------
def goals(r: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
    """(what, measured, limit, met) for each of the issue's goals."""
    interval_s = r["heartbeat_ms"] / 1000
    limits = [
        ("steady commits/s (write transactions, exact)", r["write_tx_per_s"], r["nodes"] / interval_s),
        ("fleet view p95 ms (routable)", r["view_routable_ms_p95"], VIEW_GOAL_MS),
        ("fleet view p95 ms (per model)", r["view_per_model_ms_p95"], VIEW_GOAL_MS),
        ("dead node shown s", r["dead_shown_s"], (r["grace_ms"] + r["heartbeat_ms"]) / 1000),
    ]
    out = [(what, value, limit, value == value and value <= limit) for what, value, limit in limits]
    others_ok = r["others_unroutable_max"] == 0 and r["dead_seen"]
    return [*out, ("other nodes' pools stayed routable", float(r["others_unroutable_max"]), 0.0, others_ok)]


def report(r: dict[str, Any]) -> None:
    print()
    print_table(
        f"fleet: {r['nodes']} nodes x {r['pools_per_node']} pools = {r['pools']} pools, heartbeat "
        f"{r['heartbeat_ms']} ms, grace {r['grace_ms']} ms, {r['threads']} threads, window {r['window_s']} s",
        ("measure", "value"),
        [
            ("steady write transactions/s (xids assigned, exact)", r["write_tx_per_s"]),
            ("steady commits/s (pg_stat_database.xact_commit, +-1 s of commits at each end)", r["commits_per_s"]),
            ("heartbeats/s sent in the window", r["heartbeats_per_s"]),
            ("commits per heartbeat", r["commits_per_heartbeat"]),
            ("heartbeat latency median / p95 ms", f"{r['heartbeat_ms_median']:.2f} / {r['heartbeat_ms_p95']:.2f}"),
            ("heartbeat start, latest behind schedule ms", r["heartbeat_late_ms_max"]),
            (f"view 'routable' ({r['view_routable_rows']} rows) median / p95 ms",
             f"{r['view_routable_ms_median']:.2f} / {r['view_routable_ms_p95']:.2f}"),
            (f"view 'per model' ({r['view_per_model_rows']} rows) median / p95 ms",
             f"{r['view_per_model_ms_median']:.2f} / {r['view_per_model_ms_p95']:.2f}"),
            (f"dead {r['dead_node']}: last heartbeat -> not routable s", r["dead_shown_s"]),
            ("dead node: stop -> not routable s", r["dead_from_stop_s"]),
            ("other nodes' pools not routable (max seen)", r["others_unroutable_max"]),
        ],
    )  # fmt: skip
    print()
    for what, value, limit, met in r["goals"]:
        print(f"  goal {what}: {value:.2f} <= {limit:g} {'MET' if met else 'MISSED'}")
    print(f"  all goals: {'MET' if r['goal_met'] else 'MISSED'}")


# -- main -------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "bench": "fleet", "nodes": args.nodes, "pools_per_node": args.pools_per_node,
        "pools": args.nodes * args.pools_per_node, "heartbeat_ms": args.heartbeat_ms, "grace_ms": args.grace_ms,
        "threads": args.threads, "pg_lag_s": args.pg_lag_s,
    }  # fmt: skip
    with contextlib.ExitStack() as stack:
        db = FleetDb(args.pg_url)
        stack.callback(db.close)
        migrate(db.url)
        print(f"database {db.name}: migrated; {result['pools']} pools ...", flush=True)
        result["setup_s"] = populate(db.url, args.nodes, args.pools_per_node, args.grace_ms)
        hb = Heartbeats(db.url, args.nodes, args.threads, args.heartbeat_ms / 1000, args.grace_ms)
        stack.callback(hb.stop)
        hb.start()
        print(f"  ready in {result['setup_s']:.1f} s; heartbeats running; window {args.window_s} s ...", flush=True)
        result.update(steady_window(db, hb, args.window_s, args.pg_lag_s))
        result.update(view_times(db.url, args.queries))
        timeout_s = (args.grace_ms + 3 * args.heartbeat_ms) / 1000 + 5
        result.update(dead_node(db.url, hb, hb.nodes[args.nodes // 2], timeout_s))
        if hb.errors:
            raise RuntimeError(f"{len(hb.errors)} heartbeat(s) failed, first: {hb.errors[0]}")
    result["goals"] = goals(result)
    result["goal_met"] = all(met for *_, met in result["goals"])
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--nodes", type=int, help="simulated nodes (default 100, --quick 5)")
    ap.add_argument("--pools-per-node", type=int, help="pools a node (default 10, --quick 2)")
    ap.add_argument("--heartbeat-ms", type=int, help="heartbeat interval (default 1000, --quick 200)")
    ap.add_argument("--grace-ms", type=int, help="node grace (default 5000, --quick 800)")
    ap.add_argument("--window-s", type=float, help="steady-state window (default 10, --quick 2)")
    ap.add_argument("--pg-lag-s", type=float, help="read the commit counter this long after each end (default 3)")
    ap.add_argument("--queries", type=int, help="runs of each fleet query (default 100, --quick 10)")
    ap.add_argument("--threads", type=int, default=4, help="threads driving the nodes (default 4)")
    ap.add_argument("--pg-url", default=PG_URL, help=f"PostgreSQL server to create the bench's database on ({PG_URL})")
    ap.add_argument("--quick", action="store_true", help="smoke run: 5 nodes x 2 pools, short windows")
    args = ap.parse_args(argv)
    defaults = {
        "nodes": (5, 100), "pools_per_node": (2, 10), "heartbeat_ms": (200, 1000), "grace_ms": (800, 5000),
        "window_s": (2.0, 10.0), "pg_lag_s": (1.5, 3.0), "queries": (10, 100),
    }  # fmt: skip
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if args.quick else full)
    if args.nodes < 2:
        ap.error("--nodes: at least 2 (one dies, the others must stay routable)")
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a SIGTERM unwinds: the database is dropped
    if (problem := pg_problem(args.pg_url)) is not None:
        print(f"PostgreSQL at {args.pg_url} not reachable: {problem}", file=sys.stderr)
        return 2
    print(f"machine: {machine()}", flush=True)
    try:
        result = run(args)  # the database is dropped however run() ends
    except KeyboardInterrupt:
        print("interrupted: the bench's database was dropped", file=sys.stderr)
        return 130
    report(result)
    emit({**result, "machine": machine()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
