"""Helpers shared by the benchmarks: statistics, the result table and JSON line, engine spawning and polling.

A benchmark prints numbers: a short table for people, then one JSON line (`{"bench": ...}`) for tools. It is
not a timed test: nothing here asserts on speed. The engines a benchmark starts itself serve on a unix socket,
as poolmgr's do, and are polled over it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_LLAMA_SERVER = "/var/cache/poolmgr/llamacpp/b11434/bin/llama-server"
POLL_S = 0.001  # the floor polls the engine's /health every 1 ms
# Where the benchmarks' own engines serve: a unix socket, like poolmgr's (`--host <path>.sock`; engines get no
# TCP), so a floor and poolmgr's path pay the same transport.
TRANSPORT = "unix socket (llama-server --host <path>.sock)"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values)) if values else float("nan")


def pg_problem(url: str) -> str | None:
    """Why PostgreSQL at `url` cannot be used (None: it answers)."""
    try:
        import psycopg

        with psycopg.connect(url, autocommit=True, connect_timeout=3):
            return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def machine() -> dict[str, Any]:
    """What the numbers were measured on (they mean little without it)."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model or platform.processor() or "unknown",
        "cores": os.cpu_count() or 0,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(title)
    for n, row in enumerate(cells):
        print(
            "  "
            + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def emit(result: dict[str, Any]) -> None:
    """The machine-readable last line of every benchmark."""
    print(json.dumps(result, sort_keys=False, default=str), flush=True)


def bench_main(run: Callable[[Any], dict[str, Any]], parse_args: Callable[[], Any]) -> int:
    """A benchmark's entry point: its arguments, its run (which prints its tables), its JSON line last."""
    emit(run(parse_args()))
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The HTTP status of GET `url` (http://HOST:PORT/PATH, e.g. poolmgr's API); None when nothing answers
    (refused, reset, timeout). Plain http.client on a fresh connection: a cheap probe."""
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", "/" + path)
        resp = conn.getresponse()
        resp.read()
        return int(resp.status)
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def uds_status(sock: Path | str, target: str = "/health", timeout: float = 1.0) -> int | None:
    """The HTTP status of GET `target` over the unix socket `sock`; None when nothing answers (no socket yet,
    refused, reset, timeout). A raw AF_UNIX socket and one HTTP/1.0 request (the server closes after its answer):
    cheaper than an HTTP client, so a 1 ms poll adds little to what it measures."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(sock))
            s.sendall(f"GET {target} HTTP/1.0\r\nHost: engine\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        except OSError:
            return None
    status = answer.split(b"\r\n", 1)[0].split()
    return int(status[1]) if len(status) >= 2 and status[0].startswith(b"HTTP/") and status[1].isdigit() else None


def wait_health_200(sock: Path, deadline_s: float, *, proc: subprocess.Popen[bytes] | None = None) -> float:
    """Poll GET /health over the unix socket `sock` every POLL_S until 200; returns time.monotonic() of the first
    200 answer's arrival."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if uds_status(sock, timeout=0.5) == 200:
            return time.monotonic()
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"engine exited with {proc.returncode} before /health answered 200")
        time.sleep(POLL_S)
    raise TimeoutError(f"{sock}: GET /health did not answer 200 within {deadline_s} s")


def engine_argv(binary: Path, model: Path, sock: Path, *extra: str) -> list[str]:
    """llama-server serving `model` on the unix socket `sock` (a path ending in .sock), whose stale file from an
    earlier engine is removed first (llama-server leaves it behind, and could not bind over it)."""
    sock.unlink(missing_ok=True)
    return [str(binary), "-m", str(model), "--host", str(sock), *extra]


def llama_server_path() -> Path:
    path = Path(os.environ.get("POOL_MANAGERD_LLAMA_SERVER") or DEFAULT_LLAMA_SERVER)
    if not os.access(path, os.X_OK):
        raise SystemExit(f"no llama-server at {path} (set POOL_MANAGERD_LLAMA_SERVER)")
    return path


@dataclass(frozen=True)
class ColdStart:
    """One engine start: spawn → first /health 200 (`total_s`), and the engine's own part of it (`engine_s`: its
    log's relative timestamp on the `listening on` line, i.e. from its logger's start in main() after exec)."""

    total_s: float
    engine_s: float | None


_LISTEN_STAMP = re.compile(rb"^(\d+)\.(\d{2})\.(\d{3})\.(\d{3}) [A-Z] .*listening on ", re.MULTILINE)


def engine_listen_s(log: bytes) -> float | None:
    """llama.cpp prefixes each line with minutes.seconds.millis.micros since it started logging: the last
    `listening on` line's stamp in seconds (llama-server prints it once the model is loaded)."""
    found = None
    for m in _LISTEN_STAMP.finditer(log):
        found = int(m[1]) * 60 + int(m[2]) + int(m[3]) / 1e3 + int(m[4]) / 1e6
    return found


def engine_cold_start(
    binary: Path, model: Path, *, sock: Path, log_path: Path, ctx: int = 1024, timeout_s: float = 60
) -> ColdStart:
    """The floor: spawn llama-server on the unix socket `sock`, poll /health over it every 1 ms until the first
    200."""
    argv = engine_argv(binary, model, sock, "-c", str(ctx), "--parallel", "1")
    with open(log_path, "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        total = wait_health_200(sock, timeout_s, proc=proc) - t0
        engine_s = wait_listen_line(log_path)
    finally:
        stop_process(proc)
    return ColdStart(total, engine_s)


def wait_listen_line(log_path: Path, timeout_s: float = 2.0) -> float | None:
    """The engine's `listening on` stamp, once its log thread has written it (it may trail /health's 200)."""
    end = time.monotonic() + timeout_s
    while True:
        found = engine_listen_s(log_path.read_bytes())
        if found is not None or time.monotonic() >= end:
            return found
        time.sleep(0.01)


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def engine_pids(marker: str) -> list[int]:
    """Processes whose environment holds `marker` (e.g. POOLMGR_POOL=<id>): poolmgr's engines of a pool."""
    found = []
    want = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if want in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def kill_pids(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def shared_dir(prefix: str) -> Iterator[Path]:
    """A 0755 directory: as root, engines run as an unprivileged user who must reach the model inside."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


__all__ = [
    "POLL_S",
    "REPO",
    "TRANSPORT",
    "ColdStart",
    "emit",
    "engine_argv",
    "engine_cold_start",
    "engine_listen_s",
    "engine_pids",
    "free_port",
    "http_status",
    "kill_pids",
    "llama_server_path",
    "machine",
    "mean",
    "median",
    "print_table",
    "shared_dir",
    "stop_process",
    "uds_status",
    "wait_health_200",
    "wait_listen_line",
]
