"""Benchmark (issue 14): how soon does poolmgr find a hung engine, with its default health-check settings?

A real `poolmgr serve` runs `--pools` pools on the real llama-server and a tiny model (the others idle beside the
one that hangs, so the prober works at the node's cadence), every health setting at its default. Each run
SIGSTOPs the watched pool's ready engine (it keeps its socket: connections are accepted by the kernel, nothing
answers) and measures SIGSTOP → the pool's crash audit row (reason health_failure), which is written once
poolmgr has SIGKILLed the hung engine; then waits for the pool to be ready again on a new engine
(POOL_MANAGERD_BACKOFF_INITIAL_MS=0, the restart-storm limit raised so the runs stay restarts).

The bound it is compared with: a probe goes at the engine's phase of the interval, at most a batch (a quarter of
the interval, at most 0.5 s) late; after the hang the first unanswered probe times out after
`HEALTH_CHECK_TIMEOUT_MS`, and each next one goes at once: `threshold` unanswered probes take threshold x timeout.
So detection ≤ interval + batch + threshold x timeout (+ the kill and the audit write).

    .venv/bin/python bench/hang.py              # 5 runs, 20 pools, about a minute
    .venv/bin/python bench/hang.py --quick      # smoke run: 1 run, 2 pools
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from typing import Any

from _common import bench_main, llama_server_path, machine, median, print_table, shared_dir
from _serve import Serve, at, remove_pool_cgroup

from poolmgr.engines._prober import _BATCH_S
from poolmgr.engines.tiny_model import write_tiny_model
from poolmgr.settings import PoolManagerConfig

POOL = "bench-hang"


def hang_once(srv: Serve, pool: str = POOL) -> dict[str, Any]:
    """SIGSTOP the ready engine; seconds until its crash row, and the row's reason."""
    before = srv.wait_state(pool, "ready")
    after_id = max((e["id"] for e in srv.events(pool)), default=0)
    t_stop = time.time()
    os.kill(int(before["pid"]), signal.SIGSTOP)
    srv.wait_for(pool, lambda s: s["state"] != "ready", timeout=120, poll_s=0.02)
    crash = next(e for e in srv.events(pool) if e["id"] > after_id and e["trigger"] == "crash")
    srv.wait_for(pool, lambda s: s["state"] == "ready" and s["pid"] not in (None, before["pid"]), timeout=120)
    return {"detect_s": at(crash) - t_stop, "reason": crash.get("reason"), "error": crash.get("detail")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    binary = llama_server_path()
    cfg = PoolManagerConfig()
    interval, timeout = cfg.health_check_interval_ms / 1000, cfg.health_check_timeout_ms / 1000
    bound = interval + min(_BATCH_S, interval / 4) + cfg.health_failure_threshold * timeout
    ids = [POOL] + [f"{POOL}-idle-{i:03d}" for i in range(args.pools - 1)]
    runs: list[dict[str, Any]] = []
    with shared_dir("poolmgr-bench-hang-") as d:
        model = write_tiny_model(d / "tiny.gguf")
        srv = Serve(d, {"POOL_MANAGERD_LLAMA_SERVER": str(binary), "POOL_MANAGERD_BACKOFF_INITIAL_MS": "0",
                        "POOL_MANAGERD_RESTART_RATE_LIMIT": "100000"})  # fmt: skip
        srv.write_pools(*({"id": i, "model": str(model), "device_mask": "cpu", "slots": 1, "ctx_size": 1024,
                           "extra_args": ["--threads", "1"]} for i in ids))  # fmt: skip
        try:
            srv.start()
            for pool_id in ids:
                srv.wait_state(pool_id, "ready", timeout=120)
            time.sleep(args.settle_s)
            for n in range(args.runs):
                runs.append(hang_once(srv))
                print(f"  run {n + 1}: {runs[-1]['detect_s']:.2f} s ({runs[-1]['reason']})", flush=True)
        finally:
            srv.close()
            for pool_id in ids:
                remove_pool_cgroup(pool_id)
    return report(args, runs, bound, cfg)


def report(
    args: argparse.Namespace, runs: list[dict[str, Any]], bound: float, cfg: PoolManagerConfig
) -> dict[str, Any]:
    times = [r["detect_s"] for r in runs]
    print_table(
        f"SIGSTOP -> crash row, {len(runs)} run(s), {args.pools} pool(s), default health settings (s)",
        ("median", "min", "max", "bound"),
        [(median(times), min(times), max(times), bound)],
    )
    settings = (f"HEALTH_CHECK_INTERVAL_MS={cfg.health_check_interval_ms}, HEALTH_CHECK_TIMEOUT_MS="
                f"{cfg.health_check_timeout_ms}, HEALTH_FAILURE_THRESHOLD={cfg.health_failure_threshold}")  # fmt: skip
    within = max(times) <= bound + 0.5  # + the kill, the audit write and this bench's own 20 ms poll
    reasons = sorted({str(r["reason"]) for r in runs})
    print(f"{settings}; every run within the bound (+0.5 s): {'yes' if within else 'NO'}; reasons: {reasons}")
    return {
        "bench": "hang", "runs": len(runs), "pools": args.pools, "detect_median_s": round(median(times), 3),
        "detect_min_s": round(min(times), 3), "detect_max_s": round(max(times), 3), "bound_s": bound,
        "within_bound": within, "reasons": reasons, "interval_ms": cfg.health_check_interval_ms,
        "timeout_ms": cfg.health_check_timeout_ms, "threshold": cfg.health_failure_threshold, "machine": machine(),
    }  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=5, help="SIGSTOPs, one after the other (default 5)")
    ap.add_argument("--pools", type=int, default=20, help="pools on the node, the watched one included (default 20)")
    ap.add_argument("--settle-s", type=float, default=3.0, help="wait after all ready (default 3)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 run, 2 pools")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.pools, args.settle_s = 1, 2, 0.5
    if args.runs < 1 or args.pools < 1:
        ap.error("--runs and --pools must be >= 1")
    return args


if __name__ == "__main__":
    raise SystemExit(bench_main(run, parse_args))
