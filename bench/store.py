"""Benchmark (issue 2): audited transitions per second through the real store and FSM.

Each transition is `fire(registry, pool_id, effect)` (lifecycle/fsm.py), i.e. `Registry.apply(pool_id, effect,
machine=MACHINE)`, the one write path: one transaction that reads the pool row (locked, with its lease count), asks
the `transitions` machine for the target state, updates the row where its version still matches and inserts the
audit row. The pool cycles through the real effects of a drain and a preload: ready -DrainRequested-> draining
-Drained-> stopped -Placed-> placed -PreloadStarted-> preloading -PreloadSucceeded-> ready.

Measured next to the floor of the same two statements (UPDATE pools SET <the columns the effect writes>, state,
version, updated_at WHERE id=? AND version=?; INSERT INTO pool_events ...; COMMIT) in plain sqlite3 with poolmgr's
own pragmas (WAL, synchronous=FULL), in the same run, rounds interleaved so both see the same disk and the same
machine load. PostgreSQL likewise (psycopg floor).

    .venv/bin/python bench/store.py            # about a minute
    .venv/bin/python bench/store.py --quick    # a smoke run: a few transitions, numbers meaningless
    .venv/bin/python bench/store.py --profile  # also print where a poolmgr transition spends its time
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import bench_main, machine, median, print_table
from sqlalchemy import event

from poolmgr.inflight import Drain
from poolmgr.lifecycle.effects import Drained, DrainRequested, Placed, PreloadStarted, PreloadSucceeded, ReadyInfo
from poolmgr.lifecycle.fsm import fire
from poolmgr.lifecycle.placing import CPU_PLACEMENT
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import PoolState, Trigger
from poolmgr.store import Effect, PoolView, Registry, migrate
from poolmgr.store._db import _sqlite_pragmas

POOL = "bench"
CYCLE = (Trigger.DRAIN, Trigger.DRAIN_DONE, Trigger.PLACE, Trigger.START_PRELOAD, Trigger.PRELOAD_OK)
READY = ReadyInfo(f"http://127.0.0.1:8080/pools/{POOL}/engine", "bench", 1)  # the node's data plane
FROM_STATES = ("ready", "draining", "stopped", "placed", "preloading")
TO_STATES = ("draining", "stopped", "placed", "preloading", "ready")
NOW = object()  # in a floor's column values: the time of the write
FLOOR_POOL = "floor"  # the floors write their own row: poolmgr's CAS and theirs never meet
PG_URL = os.environ.get("POOLMGR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
GOAL_SQLITE_PER_S = 2000.0
GOAL_SQLITE_RATIO = 0.60
GOAL_PG_PER_S = 1000.0

_UPDATE = "UPDATE pools SET {sets}state={p}, version={p}, updated_at={p} WHERE id={p} AND version={p}"
_INSERT = (
    "INSERT INTO pool_events (pool_id, at, kind, from_state, to_state, trigger, reason, restart_count, node_id) "
    "VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})"
)


@dataclass
class Series:
    label: str
    rates: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return median(self.rates)


# -- poolmgr ----------------------------------------------------------------------------------------------


def ready_registry(url: str, *, synchronous_off: bool = False, pools: tuple[str, ...] = (POOL,)) -> Registry:
    """A migrated registry whose `pools` are ready."""
    migrate(url)
    reg = Registry(url, node_id="bench")
    if synchronous_off:
        # Runs after poolmgr's own pragma hook: the CPU-only variant, to split CPU from fsync.
        event.listen(reg.engine, "connect", lambda conn, _rec: conn.execute("PRAGMA synchronous=OFF"))
    for pool_id in pools:
        reg.register(PoolSpec(id=pool_id, model="/models/tiny.gguf", slots=1, ctx_size=1024))
        for effect in (Placed(), PreloadStarted(CPU_PLACEMENT), PreloadSucceeded(READY)):
            fire(reg, pool_id, effect)
    return reg


def cycle_effects(now: datetime) -> tuple[Effect, ...]:
    """The effects of one cycle, in the order of CYCLE (a drain that finished, then a preload)."""
    effects = (
        DrainRequested(Drain(now, 30_000, "bench")), Drained({"outcome": "drained", "duration_ms": 0}), Placed(),
        PreloadStarted(CPU_PLACEMENT), PreloadSucceeded(READY),
    )  # fmt: skip
    assert tuple(e.trigger for e in effects) == CYCLE
    return effects


def fire_round(reg: Registry, cycles: int, *, pool_id: str = POOL) -> float:
    """Audited transitions per second over `cycles` full cycles (the pool ends ready, as it began)."""
    effects = cycle_effects(datetime.now(UTC))
    n = cycles * len(CYCLE)
    t0 = time.perf_counter()
    for i in range(n):
        fire(reg, pool_id, effects[i % len(CYCLE)])
    elapsed = time.perf_counter() - t0
    if reg.get(pool_id).state is not PoolState.READY:
        raise RuntimeError("the cycle did not end in ready")
    return n / elapsed


# -- floors -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloorStep:
    """One step of the cycle as the floor writes it: the columns poolmgr's UPDATE writes for that effect."""

    sql: str
    values: tuple[Any, ...]  # NOW where the write's time goes
    to_state: str


def floor_steps(view: PoolView, placeholder: str) -> tuple[FloorStep, ...]:
    """The UPDATE of each step of the cycle with the same columns as poolmgr's (its derived state, version and
    updated_at last), values in plain DB-API form: JSON as text, datetimes as the time of the write."""
    steps = []
    now = datetime.now(UTC)
    for effect, to_state in zip(cycle_effects(now), TO_STATES, strict=True):
        cols = dict(effect.columns(view, now))
        sets = "".join(f"{k}={placeholder}, " for k in cols)
        values = tuple(NOW if isinstance(v, datetime) else json.dumps(v) if isinstance(v, dict) else v
                       for v in cols.values())  # fmt: skip
        steps.append(FloorStep(_UPDATE.format(sets=sets, p=placeholder), values, to_state))
    return tuple(steps)


class Floor:
    """The same UPDATE (compare-and-swap on version) + INSERT + COMMIT, without poolmgr, on one DB-API connection."""

    def __init__(
        self, conn: Any, view: PoolView, *, placeholder: str, begin: str | None, now: Callable[[], Any]
    ) -> None:
        self.conn = conn
        self.pool_id = view.id
        self.now = now
        self.steps = floor_steps(view, placeholder)
        self.insert = _INSERT.format(p=placeholder)
        self.begin = begin
        cur = conn.cursor()
        cur.execute(f"SELECT version FROM pools WHERE id = {placeholder}", (self.pool_id,))
        self.version = int(cur.fetchone()[0])
        cur.close()

    def round(self, cycles: int) -> float:
        cur = self.conn.cursor()
        n = cycles * len(self.steps)
        t0 = time.perf_counter()
        for i in range(n):
            step = i % len(self.steps)
            write = self.steps[step]
            now = self.now()
            if self.begin:
                cur.execute(self.begin)
            values = [now if v is NOW else v for v in write.values]
            cur.execute(write.sql, (*values, write.to_state, self.version + 1, now, self.pool_id, self.version))
            if cur.rowcount != 1:
                raise RuntimeError("floor: compare-and-swap lost (another writer?)")
            cur.execute(self.insert, (self.pool_id, now, CYCLE[step].value, FROM_STATES[step], write.to_state,
                                      CYCLE[step].value, "bench", 0, "bench"))  # fmt: skip
            self.conn.commit() if self.begin is None else cur.execute("COMMIT")
            self.version += 1
        elapsed = time.perf_counter() - t0
        cur.close()
        return n / elapsed


def _now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")  # how SQLAlchemy stores a DateTime in SQLite


def floor_pool(url: str, pool_id: str = FLOOR_POOL) -> PoolView:
    """A migrated database with the floor's pool ready (poolmgr's own rows); the pool as it is."""
    reg = ready_registry(url, pools=(pool_id,))
    try:
        return reg.get(pool_id)
    finally:
        reg.close()


def sqlite_floor(path: Path, *, synchronous_off: bool = False) -> Floor:
    view = floor_pool(f"sqlite:///{path}")
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    _sqlite_pragmas(conn, None)  # poolmgr's own pragmas: WAL, synchronous=FULL, busy_timeout, foreign_keys
    if synchronous_off:
        conn.execute("PRAGMA synchronous=OFF")
    return Floor(conn, view, placeholder="?", begin="BEGIN IMMEDIATE", now=_now_text)


def sqlite_settings(path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    _sqlite_pragmas(conn, None)
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    sync = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[conn.execute("PRAGMA synchronous").fetchone()[0]]
    conn.close()
    return {"journal_mode": mode, "synchronous": sync}


@contextlib.contextmanager
def pg_schema(base: str) -> Iterator[str | None]:
    """A fresh schema on `base` (yielded as a URL whose search_path is it), dropped afterwards; None if no server."""
    import psycopg

    schema = "bench_" + uuid.uuid4().hex[:10]
    try:
        with psycopg.connect(base, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except psycopg.Error as exc:
        print(f"PostgreSQL at {base} not reachable, skipped: {str(exc).strip().splitlines()[0]}")
        yield None
        return
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '10s'")  # never hang on a lock a leaked session holds
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# -- the run ----------------------------------------------------------------------------------------------


def profile_transition(reg: Registry, cycles: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fire_round(reg, cycles)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("cumulative").print_stats(r"poolmgr|sqlalchemy/(orm/session|engine/base)|transitions/core", 25)
    return out.getvalue()


def run(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        d = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="poolmgr-bench-store-", dir=args.dir)))
        pg = stack.enter_context(pg_schema(args.pg_url))
        # Closed before the temp dir and the schema go (ExitStack unwinds in reverse order).
        regs: dict[str, Registry] = {}
        floors: dict[str, Floor] = {}
        stack.callback(_close_all, regs, floors)
        regs["full"] = ready_registry(f"sqlite:///{d / 'poolmgr.db'}")
        regs["off"] = ready_registry(f"sqlite:///{d / 'poolmgr-off.db'}", synchronous_off=True)
        floors["full"] = sqlite_floor(d / "floor.db")
        floors["off"] = sqlite_floor(d / "floor-off.db", synchronous_off=True)
        series = {
            "floor_full": Series("sqlite3 floor, synchronous=FULL"),
            "full": Series("poolmgr fire, SQLite synchronous=FULL"),
            "floor_off": Series("sqlite3 floor, synchronous=OFF (CPU only)"),
            "off": Series("poolmgr fire, SQLite synchronous=OFF (CPU only)"),
        }
        rounds: list[tuple[str, Callable[[int], float]]] = [
            ("floor_full", floors["full"].round),
            ("full", lambda c: fire_round(regs["full"], c)),
            ("floor_off", floors["off"].round),
            ("off", lambda c: fire_round(regs["off"], c)),
        ]
        if pg is not None:
            import psycopg

            # The same schema twice: as poolmgr configures it, and with synchronous_commit=off (no wait for the
            # WAL flush at COMMIT), to split PostgreSQL's fsync from CPU and round trips.
            for key, url, what in ((
                ("pg", pg, "PostgreSQL"),
                ("pgoff", pg + "%20-csynchronous_commit%3Doff", "PostgreSQL synchronous_commit=off"),
            )):  # fmt: skip
                regs[key] = ready_registry(url, pools=(f"{POOL}-{key}", f"{FLOOR_POOL}-{key}"))
                view = regs[key].get(f"{FLOOR_POOL}-{key}")
                floors[key] = Floor(psycopg.connect(url), view, placeholder="%s", begin=None,
                                    now=lambda: datetime.now(UTC))  # fmt: skip
                series["floor_" + key] = Series(f"psycopg floor, {what}")
                series[key] = Series(f"poolmgr fire, {what}")
            rounds += [
                ("floor_pg", floors["pg"].round),
                ("pg", lambda c: fire_round(regs["pg"], c, pool_id=f"{POOL}-pg")),
                ("floor_pgoff", floors["pgoff"].round),
                ("pgoff", lambda c: fire_round(regs["pgoff"], c, pool_id=f"{POOL}-pgoff")),
            ]
        for _name, fn in rounds:  # warm-up: connections, statement caches
            fn(1)
        for _ in range(args.rounds):
            for name, fn in rounds:
                series[name].rates.append(fn(args.cycles))
        profile = profile_transition(regs["full"], max(1, args.cycles // 2)) if args.profile else ""
        settings = sqlite_settings(d / "poolmgr.db")
    return report(args, series, settings, profile)


def _close_all(regs: dict[str, Registry], floors: dict[str, Floor]) -> None:
    for floor in floors.values():
        with contextlib.suppress(Exception):
            floor.conn.rollback() if hasattr(floor.conn, "rollback") else None
        floor.conn.close()
    for reg in regs.values():
        reg.close()


def report(
    args: argparse.Namespace, series: dict[str, Series], settings: dict[str, Any], profile: str
) -> dict[str, Any]:
    n = args.cycles * len(CYCLE)
    rows = []
    for key, s in series.items():
        floor = series.get("floor_" + key) if not key.startswith("floor") else None
        vs = f"{s.median / floor.median:.0%} of its floor" if floor else ""
        rows.append((s.label, s.median, 1000.0 / s.median, min(s.rates), max(s.rates), vs))
    print_table(
        f"Audited transitions per second (state + audit row per transaction), {args.rounds} round(s) of {n}, "
        f"medians; SQLite {settings['journal_mode']} synchronous={settings['synchronous']}",
        ("path", "per s", "ms each", "min/s", "max/s", ""),
        rows,
    )
    if profile:
        print("\nwhere a poolmgr transition spends its time (cProfile, SQLite synchronous=FULL):")
        print(profile)
    sq, sq_floor = series["full"].median, series["floor_full"].median
    ratio = sq / sq_floor
    cpu_ms = 1000.0 / series["off"].median
    fsync_ms = max(0.0, 1000.0 / sq_floor - 1000.0 / series["floor_off"].median)
    result: dict[str, Any] = {
        "bench": "store",
        "transitions_per_round": n,
        "rounds": args.rounds,
        "sqlite_journal_mode": settings["journal_mode"],
        "sqlite_synchronous": settings["synchronous"],
        "sqlite_floor_per_s": round(sq_floor, 1),
        "sqlite_per_s": round(sq, 1),
        "sqlite_ratio": round(ratio, 3),
        "sqlite_cpu_only_per_s": round(series["off"].median, 1),
        "sqlite_floor_cpu_only_per_s": round(series["floor_off"].median, 1),
        "poolmgr_cpu_ms": round(cpu_ms, 3),
        "fsync_ms": round(fsync_ms, 3),
        "goal_sqlite_per_s": GOAL_SQLITE_PER_S,
        "goal_sqlite_ratio": GOAL_SQLITE_RATIO,
        "sqlite_goal_met": sq >= GOAL_SQLITE_PER_S,
        "sqlite_ratio_goal_met": ratio >= GOAL_SQLITE_RATIO,
        "floor_reaches_goal": sq_floor >= GOAL_SQLITE_PER_S,
    }
    if "pg" in series:
        result.update(
            postgres_floor_per_s=round(series["floor_pg"].median, 1),
            postgres_per_s=round(series["pg"].median, 1),
            postgres_ratio=round(series["pg"].median / series["floor_pg"].median, 3),
            goal_postgres_per_s=GOAL_PG_PER_S,
            postgres_goal_met=series["pg"].median >= GOAL_PG_PER_S,
            postgres_floor_reaches_goal=series["floor_pg"].median >= GOAL_PG_PER_S,
            postgres_async_commit_per_s=round(series["pgoff"].median, 1),
            postgres_async_commit_floor_per_s=round(series["floor_pgoff"].median, 1),
        )
    else:
        result.update(postgres_per_s=None, postgres_goal_met=None)
    verdicts(result)
    result["machine"] = machine()
    return result


def verdicts(r: dict[str, Any]) -> None:
    def word(ok: bool) -> str:
        return "MET" if ok else "MISSED"

    print(
        f"goal SQLite >= {GOAL_SQLITE_PER_S:,.0f}/s: {word(r['sqlite_goal_met'])} ({r['sqlite_per_s']:,.0f}/s)"
        + ("" if r["floor_reaches_goal"] else f"; the sqlite3 floor itself does {r['sqlite_floor_per_s']:,.0f}/s here")
    )
    print(f"goal SQLite >= {GOAL_SQLITE_RATIO:.0%} of the floor: {word(r['sqlite_ratio_goal_met'])} "
          f"({r['sqlite_ratio']:.0%})")  # fmt: skip
    print(f"  breakdown per transition: fsync ~{r['fsync_ms']:.2f} ms (floor FULL vs OFF), "
          f"poolmgr CPU ~{r['poolmgr_cpu_ms']:.2f} ms (poolmgr with synchronous=OFF)")  # fmt: skip
    if r.get("postgres_per_s") is not None:
        print(f"goal PostgreSQL >= {GOAL_PG_PER_S:,.0f}/s: {word(r['postgres_goal_met'])} "
              f"({r['postgres_per_s']:,.0f}/s, {r['postgres_ratio']:.0%} of the psycopg floor "
              f"{r['postgres_floor_per_s']:,.0f}/s)")  # fmt: skip
        print(f"  with synchronous_commit=off: poolmgr {r['postgres_async_commit_per_s']:,.0f}/s, "
              f"floor {r['postgres_async_commit_floor_per_s']:,.0f}/s")  # fmt: skip
    else:
        print("goal PostgreSQL: not measured (no server)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--cycles", type=int, default=60, help="cycles of 5 transitions per round (default 60)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per path (default 7)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 cycles")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of poolmgr's transition")
    ap.add_argument("--pg-url", default=PG_URL, help="PostgreSQL server (a fresh schema is created and dropped)")
    ap.add_argument("--dir", default=None, help="where the SQLite files go (default: the system temp dir)")
    args = ap.parse_args(argv)
    if args.quick:
        args.cycles, args.rounds = 2, 1
    return args


if __name__ == "__main__":
    raise SystemExit(bench_main(run, parse_args))
