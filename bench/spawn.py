"""Benchmark (issue 19, item 1): an engine spawn whose isolation costs close to nothing.

One real isolation plan, prepared as the daemon prepares it (as root: engine user, cgroup, rlimits, every
capability set, no_new_privs, Landlock, seccomp, clean env), and four ways to start a program, measured side by
side, interleaved round by round (the order rotates each round), N runs:
- bare: the program spawned directly, no isolation (the floor);
- python: poolmgr's Python trampoline (`python -I -S _trampoline.py '<plan json>' -- argv`);
- fork server: a prototype kept in the benchmarks (bench/_forkserver.py): a long-lived Python that imported the
  trampoline forks on request, applies the plan in the child (`_trampoline.apply`) and execs; timed from the
  request;
- c: the compiled helper (`poolmgr-spawn KEY=VALUE... -- argv`, poolmgr/isolation/_spawner.c).
Two programs: `/bin/true` (spawn -> exit seen) and llama-server on the tiny model (spawn -> first /health 200
over its unix socket in the workdir, polled every 1 ms; `--no-engine` leaves it out). Each spawner's layers are
checked once from /proc of the program it ran. Prints medians, minimums and the paired overhead over the floor,
and which spawner is kept: the fastest that keeps every layer in force.

    .venv/bin/python bench/spawn.py             # 30 runs
    .venv/bin/python bench/spawn.py --quick     # smoke run: 1 run, numbers meaningless
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_LLAMA_SERVER,
    TRANSPORT,
    bench_main,
    engine_argv,
    machine,
    median,
    print_table,
    shared_dir,
    stop_process,
    wait_health_200,
)
from _forkserver import ForkServer

from poolmgr.engines.tiny_model import write_tiny_model
from poolmgr.isolation import (
    DEFAULT_ENGINE_USER,
    PreparedIsolation,
    build_isolation,
    ensure_engine_user,
    ensure_spawner,
    prepare,
    release,
    wrap_command,
)
from poolmgr.lifecycle.runtime import ENGINE_SOCKET

POOL = "bench-spawn"
PROGRAMS = {"true": "/bin/true: spawn -> exit", "health": "llama-server: spawn -> first /health 200"}
# Runs as the spawned program (sh is what was exec'd: $$ is the spawned pid): what /proc says about it.
PROBE = """cat /proc/$$/status
echo "Cwd: $(pwd)"
echo "Cgroups: $(grep -c '/poolmgr/{pool}$' /proc/$$/cgroup)"
echo "Core: $(awk '/^Max core file size/ {{print $5, $6}}' /proc/$$/limits)"
if (: > /tmp/{marker}) 2>/dev/null; then rm -f /tmp/{marker}; echo "Outside: writable"; else echo "Outside: denied"; fi
"""


@dataclass(frozen=True)
class Candidate:
    """A way to start a program: `wrap` the argv once (outside the timing), then `start` it or `run` it to exit."""

    name: str
    label: str
    isolated: bool
    wrap: Callable[[list[str]], list[str]]
    start: Callable[[list[str], Path], Any]  # a handle with pid, poll(), stop()
    run: Callable[[list[str], Path], int]  # the exit status


class _Child:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc, self.pid = proc, proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def stop(self) -> None:
        stop_process(self.proc)


def _popen(env: dict[str, str]) -> tuple[Callable[[list[str], Path], _Child], Callable[[list[str], Path], int]]:
    def start(argv: list[str], log: Path) -> _Child:
        with open(log, "wb") as out:
            return _Child(subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                           start_new_session=True))  # fmt: skip

    def run(argv: list[str], log: Path) -> int:
        with open(log, "wb") as out:
            return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                  start_new_session=True, check=False).returncode  # fmt: skip

    return start, run


@contextlib.contextmanager
def candidates(prepared: PreparedIsolation, env: dict[str, str]) -> Iterator[list[Candidate]]:
    """The four spawners (three where no C compiler built the helper), the fork server started."""
    start, run = _popen(env)
    server = ForkServer()
    plan = dict(prepared.plan)
    python, helper = replace(prepared, spawner=None), ensure_spawner()
    found = [
        Candidate("bare", "bare exec (the floor)", False, lambda argv: argv, start, run),
        Candidate("python", "Python trampoline", True, lambda argv: wrap_command(python, argv, env)[0], start, run),
        Candidate("forkserver", "fork server (prototype)", True, lambda argv: argv,
                  lambda argv, log: server.spawn(argv, env, plan, log),
                  lambda argv, log: server.run(argv, env, plan, log)),
    ]  # fmt: skip
    if helper is not None:
        compiled = replace(prepared, spawner=helper)
        found.append(Candidate("c", "compiled helper", True, lambda argv: wrap_command(compiled, argv, env)[0],
                               start, run))  # fmt: skip
    try:
        yield found
    finally:
        server.close()


def time_true(cand: Candidate, argv: list[str], log: Path) -> float:
    t0 = time.monotonic()
    status = cand.run(argv, log)
    took = time.monotonic() - t0
    if status != 0:
        raise RuntimeError(f"{cand.label}: /bin/true exited {status}: {log.read_text(errors='replace')[-500:]}")
    return took


def time_health(cand: Candidate, argv: list[str], log: Path, sock: Path) -> float:
    sock.unlink(missing_ok=True)  # a stale socket file from the run before
    t0 = time.monotonic()
    handle = cand.start(argv, log)
    try:
        return wait_health_200(sock, 60, proc=handle) - t0
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{cand.label}: {exc}: {log.read_text(errors='replace')[-800:]}") from None
    finally:
        handle.stop()


def layers_missing(cand: Candidate, prepared: PreparedIsolation, log: Path) -> list[str]:
    """The layers of `prepared` that the program `cand` started does not have (from its own /proc)."""
    marker = f"poolmgr-bench-spawn-{uuid.uuid4().hex[:8]}"
    status = cand.run(cand.wrap(["/bin/sh", "-c", PROBE.format(pool=POOL, marker=marker)]), log)
    seen = {k: v.strip() for k, _, v in (ln.partition(":") for ln in log.read_text().splitlines())}
    if status != 0:
        raise RuntimeError(f"{cand.label}: the layer probe exited {status}: {log.read_text()[-500:]}")
    plan = prepared.plan
    want = {
        "user": prepared.uid is None
        or (seen["Uid"].split() == [str(prepared.uid)] * 4 and seen["Gid"].split() == [str(prepared.gid)] * 4
            and seen["Groups"] == ""),
        "workdir": seen["Cwd"] == str(prepared.spec.workdir.absolute()),
        "cgroup": int(seen["Cgroups"]) == len(plan["cgroups"]),
        "rlimits": seen["Core"] == "0 0",
        "capabilities": all(int(seen[f], 16) == 0 for f in ("CapInh", "CapPrm", "CapEff", "CapAmb"))
        and (not plan["bounding"] or int(seen["CapBnd"], 16) == 0),
        "no_new_privs": seen["NoNewPrivs"] == "1",
        "landlock": seen["Outside"] == "denied",
        "seccomp": seen["Seccomp"] == "2",
    }  # fmt: skip
    return [name for name, ok in want.items() if name in prepared.in_force and not ok]


def measure(args: argparse.Namespace, d: Path, prepared: PreparedIsolation, env: dict[str, str]) -> dict[str, Any]:
    workdir = prepared.spec.workdir.absolute()
    sock = workdir / ENGINE_SOCKET
    programs: dict[str, list[str]] = {"true": ["/bin/true"]}
    if args.binary is not None:
        programs["health"] = engine_argv(args.binary, args.model, sock, "-c", "1024", "--parallel", "1")
    times: dict[str, dict[str, list[float]]] = {p: {} for p in programs}
    with candidates(prepared, env) as cands:
        missing = {c.name: layers_missing(c, prepared, d / f"{c.name}.probe") for c in cands if c.isolated}
        wrapped = {(c.name, p): c.wrap(argv) for c in cands for p, argv in programs.items()}
        for n in range(-1, args.runs):  # round -1 warms the page cache and every spawner up
            order = cands[n % len(cands) :] + cands[: n % len(cands)]
            for program in programs:
                for c in order:
                    log = d / f"{c.name}.log"
                    argv = wrapped[(c.name, program)]
                    took = time_true(c, argv, log) if program == "true" else time_health(c, argv, log, sock)
                    if n >= 0:
                        times[program].setdefault(c.name, []).append(took)
        labels = {c.name: c.label for c in cands}
    return {"times": times, "missing": missing, "labels": labels}


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = os.geteuid() == 0
    if root:
        ensure_engine_user(DEFAULT_ENGINE_USER)
    with shared_dir("poolmgr-bench-spawn-") as d:
        readable: tuple[Path, ...] = ()
        if args.binary is not None:
            args.model = write_tiny_model(d / "tiny.gguf")
            args.model.chmod(0o644)
            readable = (args.binary, args.model)
        iso = build_isolation({}, engine_user=DEFAULT_ENGINE_USER if root else "", workdir_root=d / "work",
                              pool_id=POOL, readable_paths=readable)  # fmt: skip
        prepared = prepare(iso)
        try:
            env = wrap_command(prepared, ["true"], {"PATH": "/usr/bin:/bin"})[1]
            found = measure(args, d, prepared, env)
        finally:
            release(prepared)
    return report(args, prepared, found)


def _layers(missing: list[str] | None) -> str:
    if missing is None:
        return "none (floor)"
    return "MISSING " + ",".join(missing) if missing else "all in force"


def _rows(times: dict[str, list[float]], found: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Per spawner: median, min, and the median of its per-round differences from the floor, in ms."""
    bare = times["bare"]
    rows: list[tuple[Any, ...]] = []
    for name, values in times.items():
        over = median([v - b for v, b in zip(values, bare, strict=True)]) * 1000
        layers = _layers(found["missing"].get(name))
        rows.append((found["labels"][name], median(values) * 1000, min(values) * 1000, over, layers))
    return rows


def report(args: argparse.Namespace, prepared: PreparedIsolation, found: dict[str, Any]) -> dict[str, Any]:
    times: dict[str, dict[str, list[float]]] = found["times"]
    header = ("", "median", "min", "over bare", "layers")
    print(f"as {'root' if os.geteuid() == 0 else 'uid ' + str(os.geteuid())}; layers in the plan: "
          f"{', '.join(prepared.in_force)}")  # fmt: skip
    for program, label in PROGRAMS.items():
        if program in times:
            print_table(f"{label}, {args.runs} run(s) interleaved, in ms", header, _rows(times[program], found))
        else:
            print(f"{label}: skipped ({args.skipped})")
    if "health" in times:
        print(f"llama-server serves on a {TRANSPORT}; /health polled over it every 1 ms")
    basis = "health" if "health" in times else "true"
    full = [name for name, missing in found["missing"].items() if not missing]
    kept = min(full, key=lambda name: median(times[basis][name])) if full else None
    print(f"kept: {found['labels'][kept] if kept else 'none (no spawner kept every layer in force)'} "
          f"(the fastest with every layer in force, by median {PROGRAMS[basis]}); poolmgr now spawns through: "
          f"{'compiled helper' if prepared.spawner_kind == 'c' else 'Python trampoline'}")  # fmt: skip
    result: dict[str, Any] = {"bench": "spawn", "runs": args.runs, "root": os.geteuid() == 0, "kept": kept}
    for program, per in times.items():
        for name, values in per.items():
            result[f"{program}_{name}_ms"] = round(median(values) * 1000, 3)
            result[f"{program}_{name}_min_ms"] = round(min(values) * 1000, 3)
    result["layers_missing"] = found["missing"]
    result["poolmgr_spawner"] = prepared.spawner_kind
    result["machine"] = machine()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=30, help="interleaved rounds (default 30)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 run")
    ap.add_argument("--no-engine", action="store_true", help="the /bin/true rows only (no llama-server)")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs = 1
    path = Path(os.environ.get("POOL_MANAGERD_LLAMA_SERVER") or DEFAULT_LLAMA_SERVER)
    args.binary, args.skipped = None, "--no-engine"
    if not args.no_engine:
        if os.access(path, os.X_OK):
            args.binary = path
        else:
            args.skipped = f"no llama-server at {path}"
    return args


if __name__ == "__main__":
    raise SystemExit(bench_main(run, parse_args))
