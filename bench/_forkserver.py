"""A fork-server prototype, kept in the benchmarks only (bench/spawn.py measures it beside the other spawners).

A long-lived Python that has imported poolmgr's trampoline gets a spawn request over a socketpair (one JSON line:
argv, env, the plan, a log file), forks, applies the plan in the child with `_trampoline.apply` and execs the
engine; it answers the child's pid at once, and its exit status when asked (`wait`: the engine is the server's
child, not the caller's, so only the server can reap it).

    python bench/_forkserver.py FD     # the server, on the socket FD it inherited
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class ForkServer:
    """The client side: starts the server and asks it to spawn."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        self.sock = ours
        self.reader = ours.makefile("rb")
        cmd = [sys.executable, str(Path(__file__).resolve()), str(theirs.fileno())]
        self.proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        line = self.reader.readline()
        if not line:
            raise RuntimeError(f"the fork server is gone (exit {self.proc.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def spawn(self, argv: list[str], env: dict[str, str], plan: dict[str, Any], log: Path) -> Forked:
        answer = self._ask({"op": "spawn", "argv": argv, "env": env, "plan": plan, "log": str(log)})
        return Forked(self, int(answer["pid"]))

    def run(self, argv: list[str], env: dict[str, str], plan: dict[str, Any], log: Path) -> int:
        """Spawn and wait in one round trip: the exit status."""
        answer = self._ask({"op": "spawn", "argv": argv, "env": env, "plan": plan, "log": str(log), "wait": True})
        return int(answer["status"])

    def wait(self, pid: int) -> int:
        return int(self._ask({"op": "wait", "pid": pid})["status"])

    def close(self) -> None:
        self.reader.close()
        self.sock.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Forked:
    """An engine the server forked: poll, stop and reap it through the server."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server, self.pid = server, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """Not the exit status (the server reaps): 1 once the engine has ended, None while it runs."""
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return 1
        return 1 if state in ("Z", "X") else None

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = self.server.wait(self.pid)
        return self.returncode

    def stop(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            self.wait()


# ---- the server ----------------------------------------------------------------------------------------------


def _child(request: dict[str, Any], tr: Any) -> None:
    """In the forked child: log file as stdout/stderr, the plan, exec. Never returns."""
    try:
        os.setsid()
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        tr.apply(request["plan"])
        argv, env = request["argv"], request["env"]
        os.execve(tr.find_executable(argv[0], env.get("PATH", "/usr/bin:/bin")), argv, env)
    except tr.IsolationStepError as exc:
        os.write(2, f"poolmgr-isolation: {exc}\n".encode())
        os._exit(126)
    except OSError as exc:
        os.write(2, f"poolmgr-isolation: exec: {request['argv'][0]}: {exc.strerror}\n".encode())
        os._exit(127)
    except BaseException:
        os._exit(126)


def serve(fd: int) -> None:
    sys.path.insert(0, str(REPO))
    from poolmgr.isolation import _trampoline as tr

    os.set_inheritable(fd, False)  # the engines must not inherit it
    conn = socket.socket(fileno=fd)
    for line in conn.makefile("rb"):
        request = json.loads(line)
        if request["op"] == "spawn":
            pid = os.fork()
            if pid == 0:
                _child(request, tr)
            answer: dict[str, Any] = {"pid": pid}
            if request.get("wait"):
                answer["status"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        else:
            answer = {"status": os.waitstatus_to_exitcode(os.waitpid(request["pid"], 0)[1])}
        conn.sendall(json.dumps(answer).encode() + b"\n")


if __name__ == "__main__":
    serve(int(sys.argv[1]))
