"""A fork server for `poolmgr serve`: imports poolmgr once, then forks one `serve` per request.

Importing poolmgr's daemon takes 1.5-3 s on a busy 2-core machine; a chaos test that restarts `serve` dozens of
times cannot pay that each time. Each child runs exactly what the `poolmgr serve` command runs
(`poolmgr.cli.main(["serve", ...])`) in a process of its own, so SIGKILL kills that `serve` and nothing else.

Protocol: one JSON object per line on stdin, one answer per line on stdout.
    {"cmd": "serve", "args": [...], "log": PATH}   -> {"pid": N}
    {"cmd": "wait", "pid": N, "timeout": S}        -> {"status": EXIT_CODE | -SIGNAL | null (still running)}
The environment (POOL_MANAGERD_*) is this process's own.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
import traceback

_PRELOAD = (
    "poolmgr.cli", "poolmgr._cli_ops", "poolmgr.daemon", "poolmgr.observability.logs", "poolmgr.poolsfile",
    "poolmgr.lifecycle.reconciler", "poolmgr.lifecycle.sandbox", "poolmgr.lifecycle.drain", "poolmgr.lifecycle.watch",
    "poolmgr.isolation", "poolmgr.observability.metrics", "alembic.command", "alembic.config", "psycopg",
    "sqlalchemy.dialects.postgresql.psycopg", "sqlalchemy.dialects.sqlite", "uvicorn.protocols.http.h11_impl",
    "uvicorn.protocols.http.httptools_impl", "uvicorn.lifespan.off", "uvicorn.loops.asyncio",
)  # fmt: skip
_children: dict[int, int | None] = {}


def _reap() -> None:
    for pid, status in list(_children.items()):
        if status is None:
            with contextlib.suppress(ChildProcessError):
                done, raw = os.waitpid(pid, os.WNOHANG)
                if done:
                    _children[pid] = os.waitstatus_to_exitcode(raw)


def _serve(args: list[str], log: str) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        _children[pid] = None
        return pid
    code = 1
    try:
        out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(out)
        os.close(null)
        from poolmgr.cli import main

        code = main(["serve", *args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        _reap()
        if _children.get(pid) is not None or time.monotonic() >= deadline:
            return _children.get(pid)
        time.sleep(0.02)


def main() -> None:
    for name in _PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        _reap()
        if req["cmd"] == "serve":
            answer: dict[str, object] = {"pid": _serve(list(req.get("args", [])), req["log"])}
        elif req["cmd"] == "wait":
            answer = {"status": _wait(int(req["pid"]), float(req.get("timeout", 0)))}
        else:
            answer = {"error": f"unknown command {req['cmd']!r}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
