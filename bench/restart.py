"""Benchmark (issue 4): SIGKILL a ready engine; how soon does poolmgr serve again, next to a cold start?

A real `poolmgr serve` (POOL_MANAGERD_BACKOFF_INITIAL_MS=0, restart-storm limit raised so N kills in a row stay
restarts) runs one pool on the real llama-server and a tiny model. Each run SIGKILLs the engine and measures
kill → the preload_ok audit row of the new engine (it is written once the new engine answered /health 200 on
its unix socket, `<state>/work/<pool>/engine.sock`), split by the audit rows (crash, back_off, retry) and the
launcher's spawn header. Interleaved with the engine's cold-start floor (spawn → first /health 200, polled every
1 ms), bare and through poolmgr's isolation trampoline. The floors serve on a unix socket too, as poolmgr's
engines do (they have no TCP), so both sides pay the same transport. Goal: ≤ 2x the floor. (supervisord 4.3 with
autorestart, on TCP: 44x, about 1 s.)

Beside it, in the same run, a `runtime = "podman"` pool (issue 17: the engine in a rootless container on a
minimal root filesystem, tests/container_rootfs.py) on a second serve: the same SIGKILL, the same phases. Its
row is skipped, with one line saying why, where podman is missing or we are not root (`--runtime process`
leaves it out).

    .venv/bin/python bench/restart.py            # 10 runs, about a minute (two with the container row)
    .venv/bin/python bench/restart.py --quick    # smoke run: 1 run, numbers meaningless
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import time
from pathlib import Path
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
    kill_marked,
    last_spawn_stamp,
    newest_run,
    remove_pool_cgroup,
    wrapped_cold_start,
)

from poolmgr.engines.tiny_model import write_tiny_model
from poolmgr.isolation import DEFAULT_ENGINE_USER, ensure_engine_user, ensure_subids

POOL = "bench-restart"
POD_POOL = "bench-restart-pod"
FLOOR_POOL = "bench-floor"
GOAL_RATIO = 2.0
RUNTIMES = ("process", "podman")


def podman_unavailable() -> str | None:
    """Why the container row cannot run here, or None."""
    if shutil.which("podman") is None:
        return "podman is not installed"
    if os.geteuid() != 0:
        return "not root (poolmgr runs podman as its engine user)"
    return None


def container_serve(d: Path, binary: Path, model: Path) -> Serve:
    """A second serve with one `runtime = "podman"` pool on a minimal root filesystem (built once, cached)."""
    from tests.container_rootfs import minimal_rootfs

    uid, gid = ensure_engine_user(DEFAULT_ENGINE_USER)
    ensure_subids(DEFAULT_ENGINE_USER)  # what `poolmgr setup` does
    rootfs = minimal_rootfs(binary, uid, gid)
    (d / "podman").mkdir(mode=0o755)
    srv = Serve(d / "podman", _serve_env(binary))
    srv.write_pools({"id": POD_POOL, "model": str(model), "device_mask": "cpu", "slots": 1, "ctx_size": 1024,
                     "runtime": "podman", "rootfs": str(rootfs)})  # fmt: skip
    return srv


def _serve_env(binary: Path) -> dict[str, str]:
    return {
        "POOL_MANAGERD_LLAMA_SERVER": str(binary),
        "POOL_MANAGERD_BACKOFF_INITIAL_MS": "0",
        "POOL_MANAGERD_RESTART_RATE_LIMIT": "100000",
    }


def restart_once(srv: Serve, pool: str = POOL) -> dict[str, float]:
    """SIGKILL the ready engine; the phases until the new engine's preload_ok row, in seconds (audit rows, the
    launcher's spawn header, and our own 1 ms probe of the new engine's /health)."""
    before = srv.wait_state(pool, "ready")
    after_id = max((e["id"] for e in srv.events(pool)), default=0)
    time.sleep(0.2)  # the engine settles (poolmgr's watch is armed)
    probe = ReadyProbe(pool, srv.engine_socket(pool))
    probe.start()
    t_kill = time.time()
    os.kill(int(before["pid"]), signal.SIGKILL)
    engine_ready = probe.result()  # first: polling the API while the engine starts would slow it (2 cores)
    srv.wait_for(pool, lambda s: s["state"] == "ready" and s["pid"] not in (None, before["pid"]), timeout=60)
    rows = [e for e in srv.events(pool) if e["id"] > after_id]
    first = {trig: next(e for e in rows if e["trigger"] == trig) for trig in ("crash", "retry", "preload_ok")}
    log = srv.engine_log(pool)
    spawn, engine_s = last_spawn_stamp(log), engine_listen_s(newest_run(log).encode())
    if spawn is None or engine_s is None:
        raise RuntimeError("no spawn header or no `listening on` line in the engine log")
    return {
        "total": at(first["preload_ok"]) - t_kill,
        "health": engine_ready - t_kill,
        "kill_to_crash": at(first["crash"]) - t_kill,
        "crash_to_retry": at(first["retry"]) - at(first["crash"]),
        "retry_to_spawn": spawn - at(first["retry"]),
        "spawn_to_engine_ready": engine_ready - spawn,
        "engine_own": engine_s,
        "engine_ready_to_ok": at(first["preload_ok"]) - engine_ready,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    binary = llama_server_path()
    skipped = podman_unavailable() if "podman" in args.runtimes else "not asked for (--runtime)"
    with shared_dir("poolmgr-bench-restart-") as d:
        model = write_tiny_model(d / "tiny.gguf")
        model.chmod(0o644)
        srv = Serve(d, _serve_env(binary))
        srv.write_pools({"id": POOL, "model": str(model), "device_mask": "cpu", "slots": 1, "ctx_size": 1024})
        pod = None if skipped else container_serve(d, binary, model)
        ph: dict[str, list[float]] = {}
        try:
            for s in (srv, pod):
                if s is not None:
                    s.start()
            srv.wait_state(POOL, "ready")
            if pod is not None:
                pod.wait_state(POD_POOL, "ready", timeout=120)
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
                sample.update(restart_once(srv))
                if pod is not None:
                    sample.update({f"pod_{k}": v for k, v in restart_once(pod, POD_POOL).items()})
                for key, value in sample.items():
                    ph.setdefault(key, []).append(value)
            restarts = srv.status(POOL).get("restart_count")
        finally:
            for s in (pod, srv):
                if s is not None:
                    s.close()
            kill_marked(FLOOR_POOL)
            remove_pool_cgroup(POOL)
    return report(args, ph, restarts, skipped)


_LABELS = (
    ("floor: llama-server spawn -> first /health 200 (1 ms polling, its socket)", "floor"),
    ("  of which the engine's own startup (its log: start -> listening)", "floor_engine"),
    ("floor through poolmgr's isolation trampoline", "wrapped"),
    ("  of which the engine's own startup", "wrapped_engine"),
    ("poolmgr: SIGKILL -> preload_ok row of the new engine", "total"),
    ("poolmgr: SIGKILL -> new engine's first /health 200", "health"),
    ("  SIGKILL -> crash row (pidfd, exit classification, tx)", "kill_to_crash"),
    ("  crash row -> retry row (back_off 0 ms, 2 tx)", "crash_to_retry"),
    ("  retry row -> spawn (stray scan, placement, isolation prep)", "retry_to_spawn"),
    ("  spawn -> engine's first 200 (our 1 ms probe of its socket, same run)", "spawn_to_engine_ready"),
    ("    of which the engine's own startup", "engine_own"),
    ("  engine's first 200 -> preload_ok row (detection, tx)", "engine_ready_to_ok"),
)


_POD_LABELS = (
    ("container pool (podman): SIGKILL -> preload_ok row of the new engine", "pod_total"),
    ("container pool: SIGKILL -> new engine's first /health 200", "pod_health"),
    ("  SIGKILL -> crash row (pidfd, podman inspect, podman rm)", "pod_kill_to_crash"),
    ("  crash row -> retry row", "pod_crash_to_retry"),
    ("  retry row -> spawn (stray scan, placement, isolation prep, profile)", "pod_retry_to_spawn"),
    ("  spawn -> engine's first 200 (podman run, the container, the engine)", "pod_spawn_to_engine_ready"),
    ("    of which the engine's own startup", "pod_engine_own"),
    ("  engine's first 200 -> preload_ok row", "pod_engine_ready_to_ok"),
)


def container_report(ms: dict[str, float], skipped: str | None) -> dict[str, Any]:
    """The container row's summary line and JSON keys (`container_*`); one line saying why when it was skipped."""
    if skipped is not None or "pod_total" not in ms:
        print(f"container pool (runtime = podman): skipped: {skipped}")
        return {"runtimes": ["process"], "container_skipped": skipped}
    print(f"container pool restart {ms['pod_total']:.1f} ms = {ms['pod_total'] / ms['floor']:.2f}x the floor, "
          f"{ms['pod_total'] / ms['total']:.2f}x the process pool's {ms['total']:.1f} ms (medians)")  # fmt: skip
    out: dict[str, Any] = {"runtimes": ["process", "podman"], "container_skipped": None}
    out.update({f"container_{k[4:]}_ms": round(v, 2) for k, v in ms.items() if k.startswith("pod_")})
    out.update(container_restart_ms=out.pop("container_total_ms"),
               container_restart_to_health_ms=out.pop("container_health_ms"),
               container_ratio=round(ms["pod_total"] / ms["floor"], 3),
               container_vs_process=round(ms["pod_total"] / ms["total"], 3))  # fmt: skip
    return out


def report(args: argparse.Namespace, ph: dict[str, list[float]], restarts: Any, skipped: str | None) -> dict[str, Any]:
    ms = {k: median(v) * 1000 for k, v in ph.items()}
    low = {k: min(v) * 1000 for k, v in ph.items()}
    ratio = ms["total"] / ms["floor"]
    labels = _LABELS + (_POD_LABELS if "pod_total" in ms else ())
    rows = [(label, ms[key], low[key]) for label, key in labels]
    print_table(f"Restart after SIGKILL, {args.runs} run(s), in ms", ("", "median", "min"), rows)
    m = {k: mean(v) * 1000 for k, v in ph.items()}
    parts = {
        "detection (SIGKILL -> crash row)": m["kill_to_crash"],
        "supervision (crash row -> retry row)": m["crash_to_retry"],
        "before spawn (retry row -> spawn)": m["retry_to_spawn"],
        "engine start before its own log (trampoline, exec) vs the floor's": (
            m["spawn_to_engine_ready"] - m["engine_own"] - (m["floor"] - m["floor_engine"])
        ),
        "the engine's own startup vs the floor's (CPU contention)": m["engine_own"] - m["floor_engine"],
        "readiness detection + final write (engine's 200 -> preload_ok)": m["engine_ready_to_ok"],
    }
    paired = median([t / f for t, f in zip(ph["total"], ph["floor"], strict=True)])
    print(f"engines, the floors' and poolmgr's alike, serve on a {TRANSPORT}; /health polled over it")
    print(f"restart {ms['total']:.1f} ms = {ratio:.2f}x the floor {ms['floor']:.1f} ms (medians); "
          f"median of the per-run ratios: {paired:.2f}x")  # fmt: skip
    print(f"what comes on top of the floor (means, which add up: {m['total'] - m['floor']:.1f} ms):")
    for name, value in parts.items():
        print(f"  {name}: {value:.1f} ms")
    dominant = max(parts, key=lambda k: parts[k])
    print(f"dominant: {dominant}")
    met = ratio <= GOAL_RATIO
    print(
        f"goal restart <= {GOAL_RATIO:g}x the floor: {'MET' if met else 'MISSED'} ({ratio:.2f}x to the preload_ok row; "
        f"{ms['health'] / ms['floor']:.2f}x to the new engine's first 200)"
    )
    result: dict[str, Any] = {
        "bench": "restart",
        "runs": args.runs,
        "engine_transport": "unix socket",
        "floor_ms": round(ms["floor"], 2),
        "floor_wrapped_ms": round(ms["wrapped"], 2),
        "restart_ms": round(ms["total"], 2),
        "restart_to_health_ms": round(ms["health"], 2),
        "ratio": round(ratio, 3),
        "ratio_paired": round(paired, 3),
        "ratio_to_health": round(ms["health"] / ms["floor"], 3),
    }
    result.update({f"{k}_ms": round(v, 2) for k, v in ms.items()
                   if k not in ("floor", "wrapped", "total", "health") and not k.startswith("pod_")})  # fmt: skip
    result["extra_parts_mean_ms"] = {k.split(" (")[0]: round(v, 2) for k, v in parts.items()}
    result.update(goal_ratio=GOAL_RATIO, goal_met=met, dominant=dominant, restart_count=restarts)
    result.update(container_report(ms, skipped))
    result["machine"] = machine()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=10, help="SIGKILLs, interleaved with cold starts (default 10)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 run")
    ap.add_argument("--runtime", default=",".join(RUNTIMES),
                    help="pools to kill, comma-separated: process, podman (default: both)")  # fmt: skip
    args = ap.parse_args(argv)
    args.runtimes = [r.strip() for r in args.runtime.split(",") if r.strip()]
    if "process" not in args.runtimes or not set(args.runtimes) <= set(RUNTIMES):
        ap.error(f"--runtime: process, optionally with podman (got {args.runtime!r})")
    if args.quick:
        args.runs = 1
    return args


if __name__ == "__main__":
    raise SystemExit(bench_main(run, parse_args))
