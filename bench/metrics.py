"""Benchmark (issue 14): GET /metrics costs O(pools), whatever the size of the audit table.

For each database (SQLite; PostgreSQL when reachable) and each pool count (200 and 1,000), two databases
alike: the pools created through the real registry and lifecycle effects (registered, placed, preloading,
ready: four audit rows each, written "50 days ago" on a fake clock), and one round per pool of a realistic mix
of ten rows (crash, backoff, restart, preload, drain, breaker, and kinds no metric reads), so that every series
a pool will have is there. The second database then gets 1,000,000 more rows of the same mix, in one
statement: the same series, a million more rows. A poolmgr is started on each (its first scrape folds the
history once, in one query: timed) and /metrics (the collector's endpoint, exactly what the API route calls;
no engines) is scraped on both, alternately, round by round, so both see the same machine load. Then a
retention prune of the big audit's oldest rows is timed, and a poolmgr started after it must report the same
totals.

    .venv/bin/python bench/metrics.py           # about 6 minutes on 2 cores (filling and folding 4M rows)
    .venv/bin/python bench/metrics.py --quick   # a smoke run: 20 / 50 pools, 20,000 rows; numbers meaningless
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _common import emit, machine, median, print_table

from poolmgr.clock import FakeClock
from poolmgr.devices import Inventory
from poolmgr.lifecycle.effects import Placed, PreloadStarted, PreloadSucceeded, ReadyInfo
from poolmgr.lifecycle.fsm import fire
from poolmgr.lifecycle.placing import CPU_PLACEMENT
from poolmgr.observability.metrics import MetricsEndpoint, PoolMetricsCollector
from poolmgr.poolsfile import PoolSpec
from poolmgr.store import Registry, migrate

PG_URL = os.environ.get("POOLMGR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
NODE = "bench-node"
GOAL_MS = 50.0
# The filled rows cycle through these (kind, from_state, to_state, trigger, reason, backoff_ms, detail):
# seven of ten are kinds a metric reads.
MIX = (
    ("crashed", "ready", "crashed", "crash", "signal", None, None),
    ("back_off", "crashed", "backoff", "back_off", "backoff step 1", 1000, None),
    ("retry", "backoff", "preloading", "retry", None, None, None),
    ("preload_ok", "preloading", "ready", "preload_ok", None, None, None),
    ("drain", "ready", "draining", "drain", None, None, None),
    ("drained", "draining", "stopped", "drain_done", "drain finished", None, '{"duration_ms": 420}'),
    ("place", "stopped", "placed", "place", None, None, None),
    ("start_preload", "placed", "preloading", "start_preload", None, None, None),
    ("preload_ok", "preloading", "ready", "preload_ok", None, None, None),
    ("open_breaker", "crashed", "breaker-open", "open_breaker", "storm", None, None),
)  # fmt: skip


def pool_id(i: int) -> str:
    return f"pool-{i:04d}"


# -- databases --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def database(backend: str) -> Iterator[str | None]:
    """A migrated, empty database; None when PostgreSQL is not reachable."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
            url = f"sqlite:///{Path(tmp) / 'poolmgr.db'}"
            migrate(url)
            yield url
        return
    import psycopg

    base = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        admin = psycopg.connect(base, autocommit=True, connect_timeout=3)
    except psycopg.Error:
        yield None
        return
    schema = "bench_" + uuid.uuid4().hex[:10]
    with admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            url = f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
            migrate(url)
            yield url
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def make_pools(url: str, n: int, at: datetime) -> None:
    """n ready pools, through the registry and the lifecycle's effects, on a clock at `at`."""
    registry = Registry(url, node_id=NODE, clock=FakeClock(at))
    try:
        for i in range(n):
            registry.register(PoolSpec(id=pool_id(i), model="/m.gguf", slots=4))
            fire(registry, pool_id(i), Placed())
            fire(registry, pool_id(i), PreloadStarted(CPU_PLACEMENT))
            # endpoint_url: the node's data plane (poolmgr's API forwards it to the engine's unix socket)
            ready = ReadyInfo(f"http://127.0.0.1:9/pools/{pool_id(i)}/engine", None, 4)
            fire(registry, pool_id(i), PreloadSucceeded(ready))
    finally:
        registry.close()


def fill(url: str, n_pools: int, rows: int, start: datetime) -> float:
    """`rows` audit rows (round robin over the pools, each pool going through MIX in turn, 2 s apart from
    `start`) in one statement; seconds."""
    began = time.perf_counter()
    if url.startswith("sqlite"):
        _fill_sqlite(url.removeprefix("sqlite:///"), n_pools, rows, start)
    else:
        _fill_pg(url, n_pools, rows, start)
    return time.perf_counter() - began


def _fill_sqlite(path: str, n_pools: int, rows: int, start: datetime) -> None:
    def values() -> Iterator[tuple[Any, ...]]:
        for i in range(rows):
            kind, src, dst, trigger, reason, backoff, detail = MIX[(i // n_pools) % len(MIX)]
            at = (start + timedelta(seconds=2 * i)).strftime("%Y-%m-%d %H:%M:%S.%f")
            yield (pool_id(i % n_pools), at, kind, src, dst, trigger, reason, 0, backoff, NODE, detail)

    conn = sqlite3.connect(path)
    with conn:  # one transaction
        conn.executemany(
            "INSERT INTO pool_events (pool_id, at, kind, from_state, to_state, trigger, reason, restart_count, "
            "backoff_ms, node_id, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            values(),
        )
    conn.close()


_PG_ARRAYS = (("kind", "text"), ("src", "text"), ("dst", "text"), ("trigger", "text"), ("reason", "text"))


def _fill_pg(url: str, n_pools: int, rows: int, start: datetime) -> None:
    import psycopg

    columns = list(zip(*MIX, strict=True))
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        conn.execute(
            "INSERT INTO pool_events (pool_id, at, kind, from_state, to_state, trigger, reason, restart_count, "
            "backoff_ms, node_id, detail) "
            "SELECT 'pool-' || lpad((g %% %(n)s)::text, 4, '0'), %(start)s + g * interval '2 seconds', "
            + ", ".join(f"(%({c})s::{t}[])[(g / %(n)s) %% 10 + 1]" for c, t in _PG_ARRAYS)
            + ", 0, (%(backoff)s::int[])[(g / %(n)s) %% 10 + 1], %(node)s, "
            "(%(detail)s::text[])[(g / %(n)s) %% 10 + 1]::json "
            "FROM generate_series(0, %(rows)s - 1) AS g",
            {"n": n_pools, "start": start, "rows": rows, "node": NODE, "kind": list(columns[0]),
             "src": list(columns[1]), "dst": list(columns[2]), "trigger": list(columns[3]),
             "reason": list(columns[4]), "backoff": list(columns[5]), "detail": list(columns[6])},
        )  # fmt: skip
    assert len(MIX) == 10


# -- scraping ---------------------------------------------------------------------------------------------
def endpoint(registry: Registry) -> MetricsEndpoint:
    return MetricsEndpoint(PoolMetricsCollector(registry, node_id=NODE, inventory=Inventory))


class Poolmgr:
    """A poolmgr started anew on a database, as far as /metrics goes: its registry and endpoint."""

    def __init__(self, url: str) -> None:
        self.registry = Registry(url, node_id=NODE)
        self.metrics = endpoint(self.registry)
        began = time.perf_counter()
        self.body = self.metrics()[0]  # the first scrape folds the history once
        self.first_ms = (time.perf_counter() - began) * 1000
        self.times: list[float] = []

    def scrape(self) -> None:
        began = time.perf_counter()
        self.body = self.metrics()[0]
        self.times.append((time.perf_counter() - began) * 1000)

    def close(self) -> dict[str, Any]:
        self.metrics.close()
        self.registry.close()
        body = self.body
        return {"first_ms": self.first_ms, "median_ms": median(self.times), "min_ms": min(self.times, default=0.0),
                "bytes": len(body), "lines": body.count(b"\n"), "totals": totals(body)}  # fmt: skip


def interleaved(small_url: str, big_url: str, rounds: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Scrape both, one after the other, round by round: both see the same machine load."""
    small, big = Poolmgr(small_url), Poolmgr(big_url)
    for _ in range(rounds):
        small.scrape()
        big.scrape()
    return small.close(), big.close()


def restarted(url: str, rounds: int) -> dict[str, Any]:
    one = Poolmgr(url)
    for _ in range(rounds):
        one.scrape()
    return one.close()


def totals(body: bytes) -> dict[str, str]:
    """Every counter and histogram sample of an exposition (to compare two poolmgrs' totals)."""
    keep, kind = {}, ""
    for line in body.decode().splitlines():
        if line.startswith("# TYPE "):
            kind = line.split()[-1]
        elif line and not line.startswith("#") and kind in ("counter", "histogram"):
            sample, _, value = line.rpartition(" ")
            keep[sample] = value
    return keep


def prune(url: str, older_than: datetime) -> tuple[int, float]:
    registry = Registry(url, node_id=NODE)
    try:
        began = time.perf_counter()
        pruned = registry.prune_audit(older_than)
        return pruned, time.perf_counter() - began
    finally:
        registry.close()


# -- the run ----------------------------------------------------------------------------------------------
def run_case(backend: str, n_pools: int, rows: int, rounds: int) -> dict[str, Any] | None:
    """Two databases with the same pools and the same series: one with a small audit, one with `rows` more."""
    with database(backend) as small_url, database(backend) as big_url:
        if small_url is None or big_url is None:
            return None
        now = datetime.now(UTC)
        for url in (small_url, big_url):
            make_pools(url, n_pools, now - timedelta(days=50))
            fill(url, n_pools, n_pools * len(MIX), now - timedelta(days=46))  # every series there: one MIX each
        fill_s = fill(big_url, n_pools, rows, now - timedelta(days=45))
        small, big = interleaved(small_url, big_url, rounds)
        pruned, prune_s = prune(big_url, now - timedelta(days=44))
        after = restarted(big_url, max(3, rounds // 5))
    return {
        "backend": backend, "pools": n_pools, "rows": rows, "empty": small, "full": big, "fill_s": fill_s,
        "pruned": pruned, "prune_s": prune_s, "after_prune": after,
        "totals_equal_after_prune": after["totals"] == big["totals"] and len(big["totals"]) > 0,
    }  # fmt: skip


def report(cases: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [
        (c["backend"], c["pools"], f"{c['empty']['median_ms']:.1f} / {c['empty']['min_ms']:.1f}",
         f"{c['full']['median_ms']:.1f} / {c['full']['min_ms']:.1f}", f"{c['full']['first_ms']:.0f}",
         f"{c['full']['bytes'] / 1024:.0f}", c["full"]["lines"])
        for c in cases
    ]  # fmt: skip
    print_table(
        f"/metrics scrape (median / min ms, interleaved): a small audit vs {cases[0]['rows']:,} more rows",
        ("database", "pools", "small audit", "big audit", "first scrape ms (big)", "KiB", "lines"),
        rows,
    )
    prunes = [
        (c["backend"], c["pools"], c["pruned"], f"{c['prune_s']:.1f}", f"{c['pruned'] / max(c['prune_s'], 1e-9):,.0f}",
         c["totals_equal_after_prune"])
        for c in cases
    ]  # fmt: skip
    print_table(
        "retention prune of the oldest rows", ("database", "pools", "rows", "s", "rows/s", "totals equal"), prunes
    )
    worst = max(max(c["empty"]["median_ms"], c["full"]["median_ms"]) for c in cases)
    met = worst <= GOAL_MS
    print(f"goal /metrics <= {GOAL_MS:.0f} ms at every size, with and without the big audit: "
          f"{'met' if met else 'MISSED'} (worst median {worst:.1f} ms)")  # fmt: skip
    result: dict[str, Any] = {"bench": "metrics", "goal_met": met, "worst_median_ms": worst, "machine": machine()}
    for c in cases:
        key = f"{c['backend']}_{c['pools']}"
        result[f"{key}_empty_ms"] = round(c["empty"]["median_ms"], 2)
        result[f"{key}_full_ms"] = round(c["full"]["median_ms"], 2)
        result[f"{key}_empty_min_ms"] = round(c["empty"]["min_ms"], 2)
        result[f"{key}_full_min_ms"] = round(c["full"]["min_ms"], 2)
        result[f"{key}_first_ms"] = round(c["full"]["first_ms"], 1)
        result[f"{key}_bytes"] = c["full"]["bytes"]
        result[f"{key}_prune_rows_per_s"] = round(c["pruned"] / max(c["prune_s"], 1e-9), 1)
        result[f"{key}_totals_equal"] = c["totals_equal_after_prune"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few pools and rows")
    args = parser.parse_args()
    sizes, rows, rounds = ((20, 50), 20_000, 5) if args.quick else ((200, 1000), 1_000_000, 30)
    cases = []
    for backend in ("sqlite", "postgres"):
        for n in sizes:
            case = run_case(backend, n, rows, rounds)
            if case is None:
                print(f"no PostgreSQL at {PG_URL}: measured SQLite only")
                break
            cases.append(case)
    result = report(cases)
    result["postgres"] = any(c["backend"] == "postgres" for c in cases)
    emit(result)


if __name__ == "__main__":
    main()
