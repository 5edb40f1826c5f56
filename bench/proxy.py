"""Benchmark (issue 15): what poolmgr's data plane adds between a client and an engine, side by side in one run.

One real llama-server (the tiny model, `--threads 1`, 8 slots) on a unix socket, as poolmgr runs engines. One
poolmgr data plane in a process of its own: `DataPlane` around the real API app (`create_app`, SQLite registry),
served by uvicorn on loopback as the daemon serves it (its "auto" HTTP: httptools, a dependency since 2026-12-06;
no access log, a JSON log line per request to a file), the pool open, an inference token required. Every
measurement is taken both ways, alternately request by request, so both see the same machine load:

- added latency of a 1-token completion (`/v1/completions` and the passthrough `/pools/{id}/engine/completion`),
  over a kept-alive client connection on both sides (poolmgr opens one to the engine per request): p50 and p95
  of proxied minus direct; goal ≤ 1 ms at p50. poolmgr's CPU time per request (its process's schedstat);
- streaming: tokens per second of one long generation (`ignore_eos`), proxied / direct; goal ≥ 97 %;
- 64 concurrent streams through poolmgr: errors (non-200, a broken stream, no `data: [DONE]`); goal 0.

    .venv/bin/python bench/proxy.py            # about a minute
    .venv/bin/python bench/proxy.py --quick    # smoke run: few requests, numbers meaningless
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    emit,
    engine_argv,
    free_port,
    llama_server_path,
    machine,
    median,
    print_table,
    shared_dir,
    stop_process,
    wait_health_200,
)

from poolmgr.engines.tiny_model import write_tiny_model

POOL = "tiny"
TOKEN = "bench-inference-token"
GOAL_ADDED_P50_MS = 1.0
GOAL_STREAM_RATIO = 0.97
CONCURRENT = 64


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# -- the two sides ----------------------------------------------------------------------------------------
class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60) -> None:
        super().__init__("engine", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


@dataclass(frozen=True)
class Side:
    """How a client reaches the engine: directly on its socket, or through poolmgr (paths differ, bodies not)."""

    name: str
    connect: Callable[[], http.client.HTTPConnection]
    prefix: str  # "" for the engine itself; "/pools/tiny/engine" for poolmgr's passthrough
    headers: dict[str, str]

    def path(self, route: str) -> str:
        return route if route.startswith("/v1/") else self.prefix + route


def sides(sock: Path, port: int) -> tuple[Side, Side]:
    json_headers = {"Content-Type": "application/json"}
    direct = Side("direct", lambda: UnixConnection(str(sock)), "", json_headers)
    proxied = Side(
        "poolmgr", lambda: http.client.HTTPConnection("127.0.0.1", port, timeout=60), f"/pools/{POOL}/engine",
        {**json_headers, "Authorization": f"Bearer {TOKEN}"},
    )  # fmt: skip
    return direct, proxied


def http_impl() -> str:
    """The HTTP implementation uvicorn picks by default ("auto"), as the daemon runs it: httptools if installed."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


def serve_plane(sock: str, port: int, db: str) -> None:
    """The poolmgr side (run in a process of its own by `--serve-plane`)."""
    import uvicorn

    from poolmgr.api.app import create_app
    from poolmgr.api.dataplane import DataPlane
    from poolmgr.lifecycle.traffic import Mode, TrafficBoard
    from poolmgr.observability.logs import setup_logging
    from poolmgr.store import Registry, migrate

    setup_logging("json", "INFO")
    migrate(db)
    board = TrafficBoard(queue_timeout_s=30, socket_for=lambda _pool: sock)
    board.get(POOL).set(Mode.OPEN, "ready")
    app = DataPlane(create_app(Registry(db, node_id="bench")), board=board, inference_tokens=[TOKEN])
    # As the daemon serves it: its own asyncio loop (uvicorn.run would take uvloop when installed), http "auto".
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off", loop="asyncio")


@contextlib.contextmanager
def engine_and_plane(tmp: Path, *, parallel: int) -> Iterator[tuple[Path, int, subprocess.Popen[bytes]]]:
    model = write_tiny_model(tmp / "tiny.gguf")
    sock, port = tmp / "engine.sock", free_port()
    argv = engine_argv(llama_server_path(), model, sock, "--threads", "1", "-c", str(512 * parallel),
                       "--parallel", str(parallel), "--threads-http", str(CONCURRENT + 8))  # fmt: skip
    with open(tmp / "engine.log", "wb") as log:
        engine = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    with open(tmp / "plane.log", "wb") as log:
        plane = subprocess.Popen(
            [sys.executable, __file__, "--serve-plane", str(sock), str(port), f"sqlite:///{tmp / 'poolmgr.db'}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO,
        )  # fmt: skip
    try:
        wait_health_200(sock, 60, proc=engine)
        _wait_plane(port, plane)
        yield sock, port, plane
    finally:
        stop_process(plane)
        stop_process(engine)


def _wait_plane(port: int, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        if proc.poll() is not None:
            raise RuntimeError(f"the data plane exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError("the data plane did not answer /health in 30 s")


def cpu_ns(pid: int) -> int:
    """Time the process has run on a CPU, all its threads (schedstat: nanoseconds)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


# -- measurements ------------------------------------------------------------------------------------------
def one_token(conn: http.client.HTTPConnection, side: Side, route: str) -> float:
    body = {"prompt": "hello", "max_tokens": 1, "n_predict": 1}
    if route.startswith("/v1/"):
        body["model"] = POOL
    data = json.dumps(body)
    started = time.perf_counter()
    conn.request("POST", side.path(route), data, side.headers)
    response = conn.getresponse()
    response.read()
    took = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"{side.name} {route}: HTTP {response.status}")
    return took


def latency(direct: Side, proxied: Side, route: str, n: int, plane_pid: int) -> dict[str, float]:
    """1-token completions, alternately direct and through poolmgr (which goes first alternates too)."""
    conns = {s.name: s.connect() for s in (direct, proxied)}
    times: dict[str, list[float]] = {"direct": [], "poolmgr": []}
    for side in (direct, proxied):  # warm up: connections, prompt cache
        for _ in range(5):
            one_token(conns[side.name], side, route)
    cpu_before = cpu_ns(plane_pid)
    for i in range(n):
        for side in (direct, proxied) if i % 2 else (proxied, direct):
            times[side.name].append(one_token(conns[side.name], side, route))
    cpu = (cpu_ns(plane_pid) - cpu_before) / n / 1e6
    for conn in conns.values():
        conn.close()
    added = [p - d for p, d in zip(times["poolmgr"], times["direct"], strict=True)]
    return {
        "direct_p50_ms": median(times["direct"]) * 1e3, "poolmgr_p50_ms": median(times["poolmgr"]) * 1e3,
        "added_p50_ms": (median(times["poolmgr"]) - median(times["direct"])) * 1e3,
        "added_p95_ms": (percentile(times["poolmgr"], 0.95) - percentile(times["direct"], 0.95)) * 1e3,
        "added_pairwise_p50_ms": median(added) * 1e3, "poolmgr_cpu_ms_per_request": cpu,
    }  # fmt: skip


def stream(side: Side, tokens: int) -> tuple[float, int, bool]:
    """One streamed completion of `tokens` tokens: (seconds, data events, ended with [DONE])."""
    body = json.dumps({"model": POOL, "prompt": "hello", "max_tokens": tokens, "ignore_eos": True, "stream": True})
    conn = side.connect()
    try:
        started = time.perf_counter()
        conn.request("POST", "/v1/completions", body, side.headers)
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{side.name}: HTTP {response.status}: {response.read()[:200]!r}")
        events, done = 0, False
        while line := response.readline():
            if line.startswith(b"data: "):
                done = line.strip() == b"data: [DONE]"
                events += not done
        return time.perf_counter() - started, events, done
    finally:
        conn.close()


def streaming(direct: Side, proxied: Side, tokens: int, rounds: int) -> dict[str, float]:
    rates: dict[str, list[float]] = {"direct": [], "poolmgr": []}
    for i in range(rounds):
        for side in (direct, proxied) if i % 2 else (proxied, direct):
            seconds, events, done = stream(side, tokens)
            if not done:
                raise RuntimeError(f"{side.name}: the stream ended without [DONE] after {events} events")
            rates[side.name].append(tokens / seconds)
    direct_rate, proxied_rate = median(rates["direct"]), median(rates["poolmgr"])
    return {"direct_tokens_s": direct_rate, "poolmgr_tokens_s": proxied_rate, "ratio": proxied_rate / direct_rate}


def concurrent_streams(side: Side, n: int, tokens: int) -> dict[str, Any]:
    """`n` streams at once (released together): errors (and the first), and wall time."""
    results: list[tuple[float, int, bool] | BaseException] = []
    gate = threading.Barrier(n)

    def run() -> None:
        gate.wait()
        try:
            results.append(stream(side, tokens))
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    failed = [r for r in results if isinstance(r, BaseException) or not r[2]]  # no [DONE]: a broken stream
    first = repr(failed[0]) if failed else ""
    return {"streams": n, "errors": len(failed), "first_error": first, "wall_s": wall}


# -- the run -----------------------------------------------------------------------------------------------
def run(quick: bool) -> dict[str, Any]:
    n, tokens, rounds, conc_tokens = (20, 64, 2, 8) if quick else (400, 512, 5, 32)
    with shared_dir("bench-proxy-") as tmp, engine_and_plane(tmp, parallel=8) as (sock, port, plane):
        direct, proxied = sides(sock, port)
        result: dict[str, Any] = {
            "latency_v1": latency(direct, proxied, "/v1/completions", n, plane.pid),
            "latency_passthrough": latency(direct, proxied, "/completion", n, plane.pid),
            "streaming": streaming(direct, proxied, tokens, rounds),
            "concurrent_direct": concurrent_streams(direct, CONCURRENT, conc_tokens),
            "concurrent_poolmgr": concurrent_streams(proxied, CONCURRENT, conc_tokens),
            "requests": n, "stream_tokens": tokens, "concurrent_tokens": conc_tokens, "http": http_impl(),
        }  # fmt: skip
    return result


def report(result: dict[str, Any]) -> None:
    v1, raw, st = result["latency_v1"], result["latency_passthrough"], result["streaming"]
    cd, cp = result["concurrent_direct"], result["concurrent_poolmgr"]
    rows = []
    for name, lat in (("/v1/completions", v1), ("/pools/{id}/engine/completion", raw)):
        rows.append([f"1-token completion {name}: p50 ms", lat["direct_p50_ms"], lat["poolmgr_p50_ms"],
                     lat["added_p50_ms"], "added ≤ 1.00", _met(lat["added_p50_ms"] <= GOAL_ADDED_P50_MS)])  # fmt: skip
        rows.append([f"  p95 ms ({result['requests']} each)", "", "", lat["added_p95_ms"], "-", ""])
        rows.append(["  poolmgr CPU ms / request", "", lat["poolmgr_cpu_ms_per_request"], "", "-", ""])
    rows.append([f"streaming tokens/s ({result['stream_tokens']} tokens)", st["direct_tokens_s"],
                 st["poolmgr_tokens_s"], f"{st['ratio'] * 100:.1f} %", "≥ 97 %",
                 _met(st["ratio"] >= GOAL_STREAM_RATIO)])  # fmt: skip
    rows.append([f"{CONCURRENT} concurrent streams: errors", cd["errors"], cp["errors"], "", "0 errors",
                 _met(cp["errors"] == 0)])  # fmt: skip
    rows.append(["  wall s", cd["wall_s"], cp["wall_s"], "", "-", ""])
    title = f"Data plane (bench/proxy.py; uvicorn with {result['http']})"
    print_table(title, ["measure", "direct", "poolmgr", "added / ratio", "goal", "met"], rows)


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-plane":
        serve_plane(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, numbers meaningless")
    args = parser.parse_args()
    result = run(args.quick)
    report(result)
    emit({"bench": "proxy", "machine": machine(), "pid": os.getpid(), **result})


if __name__ == "__main__":
    main()
