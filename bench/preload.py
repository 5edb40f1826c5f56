"""Benchmark (issue 3): how long after the engine itself is ready does poolmgr record the pool ready?

In one run, interleaved N times:
- floor: spawn the real llama-server (`-m tiny.gguf --host <dir>/floor.sock -c 1024 --parallel 1`) ourselves
  and poll GET /health over that unix socket every 1 ms until the first 200 (poolmgr's engines serve on a unix
  socket too, and have no TCP: both sides pay the same transport);
- the same floor through poolmgr's isolation trampoline (engine user, cgroup, rlimits, caps, no_new_privs,
  Landlock, seccomp, clean env), prepared the way the daemon prepares it;
- poolmgr: a real `poolmgr serve`; drain the pool to stopped, then POST /pools/{id}/preload and read the audit
  rows up to preload_ok. The launcher's spawn header (engine log), the engine's own log stamps and our own 1 ms
  probe of the new engine's /health (over its socket, `<state>/work/<pool>/engine.sock`) split the time into:
  before spawn, engine start, detection.
lag = median(poolmgr POST → preload_ok) - median(floor). Goal: <= 20 ms (the daemon poolmgr replaces polled
every 500 ms). The trampoline alone (`true` through it vs `true` directly) is timed too.

    .venv/bin/python bench/preload.py            # 9 runs, under a minute
    .venv/bin/python bench/preload.py --quick    # smoke run: 1 run, numbers meaningless
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

from _common import (
    TRANSPORT,
    bench_main,
    engine_cold_start,
    engine_listen_s,
    llama_server_path,
    machine,
    mean,
    median,
    print_table,
    shared_dir,
)
from _serve import (
    ReadyProbe,
    Serve,
    at,
    bare_true,
    isolation_summary,
    kill_marked,
    last_spawn_stamp,
    layer_names,
    newest_run,
    remove_pool_cgroup,
    trampoline_only,
    wrapped_cold_start,
)

from poolmgr.engines.tiny_model import write_tiny_model

POOL = "bench-preload"
FLOOR_POOL = "bench-floor"  # the wrapped floor's own cgroup and workdir
GOAL_LAG_MS = 20.0


def preload_once(srv: Serve) -> dict[str, float]:
    """Drain the pool to stopped, then preload it; the phases in seconds."""
    srv.post(f"/pools/{POOL}/drain", {"deadline_ms": 0})
    srv.wait_state(POOL, "stopped")
    after_id = max((e["id"] for e in srv.events(POOL)), default=0)
    time.sleep(0.1)  # let the stop settle (engine reaped, worker idle)
    probe = ReadyProbe(POOL, srv.engine_socket(POOL))
    probe.start()
    t_req = time.time()
    srv.post(f"/pools/{POOL}/preload")
    engine_ready = probe.result()  # first: polling the API while the engine starts would slow it (2 cores)
    srv.wait_state(POOL, "ready")
    events = [e for e in srv.events(POOL) if e["id"] > after_id]
    requested = next(e for e in events if e["kind"] == "preload_requested")
    place, start, ok = (next(e for e in events if e["trigger"] == t) for t in ("place", "start_preload", "preload_ok"))
    log = srv.engine_log(POOL)
    spawn, engine_s = last_spawn_stamp(log), engine_listen_s(newest_run(log).encode())
    if spawn is None or engine_s is None:
        raise RuntimeError("no spawn header or no `listening on` line in the engine log")
    return {
        "total": at(ok) - t_req,
        "start_to_ok": at(ok) - at(start),
        "request_to_requested": at(requested) - t_req,
        "requested_to_place": at(place) - at(requested),
        "place_to_start": at(start) - at(place),
        "start_to_spawn": spawn - at(start),
        "spawn_to_engine_ready": engine_ready - spawn,
        "engine_own": engine_s,
        "engine_ready_to_ok": at(ok) - engine_ready,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    binary = llama_server_path()
    with shared_dir("poolmgr-bench-preload-") as d:
        model = write_tiny_model(d / "tiny.gguf")
        model.chmod(0o644)
        srv = Serve(d, {"POOL_MANAGERD_LLAMA_SERVER": str(binary)})
        srv.write_pools({"id": POOL, "model": str(model), "device_mask": "cpu", "slots": 1, "ctx_size": 1024})
        ph: dict[str, list[float]] = {}
        try:
            srv.start()
            srv.wait_state(POOL, "ready")
            floor_start = functools.partial(engine_cold_start, binary, model, sock=d / "floor.sock",
                                            log_path=d / "floor.log")  # fmt: skip
            floor_start()  # warm the page cache for both sides
            for _ in range(args.runs):
                floor = floor_start()
                wrapped = wrapped_cold_start(
                    binary, model, d / "floor-work", pool_id=FLOOR_POOL, log_path=d / "wrapped.log"
                )
                sample = {"floor": floor.total_s, "floor_engine": floor.engine_s or 0.0}
                sample.update(wrapped=wrapped.total_s, wrapped_engine=wrapped.engine_s or 0.0)
                sample.update(preload_once(srv))
                for key, value in sample.items():
                    ph.setdefault(key, []).append(value)
            ph["trampoline"] = trampoline_only(d / "floor-work", pool_id=FLOOR_POOL, runs=max(3, args.runs))
            ph["true"] = bare_true(max(3, args.runs))
            layers = isolation_summary(srv.log_tail(200_000))
        finally:
            srv.close()
            kill_marked(FLOOR_POOL)
            remove_pool_cgroup(POOL)
    return report(args, ph, layers)


_LABELS = (
    ("floor: llama-server spawn -> first /health 200 (1 ms polling, its socket)", "floor"),
    ("  of which the engine's own startup (its log: start -> listening)", "floor_engine"),
    ("floor through poolmgr's isolation trampoline", "wrapped"),
    ("  of which the engine's own startup", "wrapped_engine"),
    ("trampoline alone (`true` through it - `true` bare)", "trampoline_alone"),
    ("poolmgr: POST preload -> preload_ok audit row", "total"),
    ("  POST -> preload_requested row (API, 1 tx)", "request_to_requested"),
    ("  preload_requested -> place row (worker wakes, 1 tx)", "requested_to_place"),
    ("  place -> start_preload row (placement, 1 tx)", "place_to_start"),
    ("  start_preload -> spawn (stray scan, isolation prep, fork)", "start_to_spawn"),
    ("  spawn -> engine's first 200 (our 1 ms probe of its socket, same run)", "spawn_to_engine_ready"),
    ("    of which the engine's own startup", "engine_own"),
    ("  engine's first 200 -> preload_ok row (detection, tx)", "engine_ready_to_ok"),
    ("poolmgr: start_preload row -> preload_ok row", "start_to_ok"),
)


def report(args: argparse.Namespace, ph: dict[str, list[float]], layers: str) -> dict[str, Any]:
    ms = {k: median(v) * 1000 for k, v in ph.items()}
    low = {k: min(v) * 1000 for k, v in ph.items()}
    ms["trampoline_alone"] = ms["trampoline"] - ms["true"]
    low["trampoline_alone"] = low["trampoline"] - low["true"]
    lag = ms["total"] - ms["floor"]
    rows = [(label, ms[key], low[key]) for label, key in _LABELS]
    print_table(f"Preload readiness, {args.runs} run(s), in ms", ("", "median", "min"), rows)
    # Means add up exactly (medians do not): the lag split into its parts.
    m = {k: mean(v) * 1000 for k, v in ph.items()}
    parts = _lag_parts(m)
    paired = median([t - f for t, f in zip(ph["total"], ph["floor"], strict=True)]) * 1000
    print(f"engines, the floors' and poolmgr's alike, serve on a {TRANSPORT}; /health polled over it")
    print(f"lag = poolmgr {ms['total']:.1f} ms - floor {ms['floor']:.1f} ms = {lag:.1f} ms (medians); "
          f"median of the per-run differences: {paired:.1f} ms")  # fmt: skip
    print(f"the lag's parts (means, which add up: {m['total'] - m['floor']:.1f} ms):")
    for name, value in parts.items():
        print(f"  {name}: {value:.1f} ms")
    dominant = max(parts, key=lambda k: parts[k])
    print(f"dominant: {dominant}")
    print(f"isolation layers in force (poolmgr's log): {layer_names(layers) or 'not logged'}")
    met = lag <= GOAL_LAG_MS
    print(f"goal lag <= {GOAL_LAG_MS:.0f} ms: {'MET' if met else 'MISSED'} ({lag:.1f} ms)")
    result = _result(args, ms, lag=lag, paired=paired, parts=parts)
    result.update(goal_lag_ms=GOAL_LAG_MS, goal_met=met, dominant=dominant, isolation_layers=layer_names(layers))
    result["machine"] = machine()
    return result


def _lag_parts(m: dict[str, float]) -> dict[str, float]:
    """The preload lag (poolmgr minus the floor) split into parts, from means (which add up)."""
    return {
        "before spawn (POST -> spawn: API, wake, place, 3 tx, stray scan, isolation prep)": m["request_to_requested"]
        + m["requested_to_place"]
        + m["place_to_start"]
        + m["start_to_spawn"],
        "engine start before its own log (trampoline, exec) vs the floor's": (
            m["spawn_to_engine_ready"] - m["engine_own"] - (m["floor"] - m["floor_engine"])
        ),
        "the engine's own startup vs the floor's (CPU contention)": m["engine_own"] - m["floor_engine"],
        "readiness detection + final write (engine's 200 -> preload_ok)": m["engine_ready_to_ok"],
    }


def _result(
    args: argparse.Namespace, ms: dict[str, float], *, lag: float, paired: float, parts: dict[str, float]
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "bench": "preload",
        "runs": args.runs,
        "engine_transport": "unix socket",
        "floor_ms": round(ms["floor"], 2),
        "floor_wrapped_ms": round(ms["wrapped"], 2),
        "trampoline_ms": round(ms["trampoline_alone"], 2),
        "preload_ms": round(ms["total"], 2),
        "start_preload_to_ready_ms": round(ms["start_to_ok"], 2),
        "lag_ms": round(lag, 2),
        "lag_paired_ms": round(paired, 2),
        "detection_ms": round(ms["engine_ready_to_ok"], 2),
    }
    skip = {"floor", "wrapped", "total", "start_to_ok", "trampoline", "true", "trampoline_alone"}
    result.update({f"{k}_ms": round(v, 2) for k, v in ms.items() if k not in skip})
    result["lag_parts_mean_ms"] = {k.split(" (")[0]: round(v, 2) for k, v in parts.items()}
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=9, help="interleaved runs of the floors and poolmgr (default 9)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 run")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs = 1
    return args


if __name__ == "__main__":
    raise SystemExit(bench_main(run, parse_args))
