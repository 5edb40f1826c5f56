"""The chaos rig: `poolmgr serve` processes (forked by tests/chaos/_zygote.py) running fake llama-servers.

Everything an engine reads (the wrapper, fake_engine.py, the model files) lives in a 0755 directory under /tmp:
as root, engines run as the unprivileged engine user. Each engine listens on a unix socket in its pool's workdir
(`engine()` talks to it there, as serve does). Engines carry POOLMGR_POOL=<pool id> in their environment;
`cleanup()` kills every such process of this rig's pools, and every `serve` it started, whatever the test's outcome.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
FAKE_ENGINE = REPO / "tests" / "fake_engine.py"
ZYGOTE = Path(__file__).with_name("_zygote.py")
GGUF_HEAD = b"GGUF" + b"\0" * 60  # enough of a header for the fake engine's model check


@dataclass(frozen=True)
class Proc:
    pid: int
    start_time: int
    session: int
    state: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat(pid: int) -> Proc | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    return Proc(pid=pid, start_time=int(rest[19]), session=int(rest[3]), state=rest[0])


def marked_processes(pool_id: str) -> list[Proc]:
    """Live (not zombie) processes whose environment carries POOLMGR_POOL=<pool_id>."""
    marker = f"POOLMGR_POOL={pool_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                proc = _stat(int(entry.name))
                if proc is not None and proc.state not in ("Z", "X"):
                    found.append(proc)
    return found


def engines(pool_id: str) -> list[Proc]:
    """The pool's engines: marked session leaders (an engine runs in a session of its own)."""
    return [p for p in marked_processes(pool_id) if p.session == p.pid]


def model_file(path: Path, mode: str) -> Path:
    path.write_bytes(GGUF_HEAD + f"\nfake-engine-mode: {mode}\n".encode())
    path.chmod(0o644)
    return path


class Rig:
    """One poolmgr installation (state dir, database, API port) and the `serve` processes run on it."""

    def __init__(self, db_url: str, **env: str) -> None:
        tag = uuid.uuid4().hex[:6]
        self.dir = Path(tempfile.mkdtemp(prefix=f"poolmgr-chaos-{tag}-"))
        self.dir.chmod(0o755)
        shutil.copy(FAKE_ENGINE, self.dir / "fake_engine.py")
        (self.dir / "fake_engine.py").chmod(0o644)
        wrapper = self.dir / "llama-server"
        # Env for the fake engine is set here: the sandbox passes an engine only an allow-list of poolmgr's env.
        wrapper.write_text(
            "#!/bin/sh\n"
            "export FAKE_ENGINE_LOAD_MS=150 FAKE_ENGINE_CRASH_AFTER_MS=600 FAKE_ENGINE_EXIT_CODE=3\n"
            f'exec python3 {self.dir / "fake_engine.py"} "$@"\n'
        )
        wrapper.chmod(0o755)
        self.tag = tag
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = self.dir / "serve.log"
        self.pool_ids: list[str] = []
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("POOL_MANAGERD_")},
            "POOL_MANAGERD_ADDR": f"127.0.0.1:{self.port}",
            "POOL_MANAGERD_STATE_DIR": str(self.dir / "state"),
            "POOL_MANAGERD_DATABASE_URL": db_url,
            "POOL_MANAGERD_CONFIG": str(self.dir / "pools.toml"),
            "POOL_MANAGERD_LLAMA_SERVER": str(wrapper),
            "POOL_MANAGERD_LOG_FORMAT": "text",
            "POOL_MANAGERD_BACKOFF_INITIAL_MS": "100",
            "POOL_MANAGERD_BACKOFF_MAX_MS": "600",
            "POOL_MANAGERD_HEALTH_CHECK_INTERVAL_MS": "200",
            "POOL_MANAGERD_STOP_GRACE_MS": "1500",
            "POOL_MANAGERD_PRELOAD_TIMEOUT_MS": "15000",
            **env,
        }
        self._zygote: subprocess.Popen[str] | None = None
        self.serves: list[int] = []
        self.client = httpx.Client(base_url=self.base, timeout=10, trust_env=False)

    # -- set-up ---------------------------------------------------------------------------------------
    def pool_id(self, name: str) -> str:
        return f"chaos-{self.tag}-{name}"

    def write_pools(self, pools: dict[str, Path]) -> None:
        """{pool id: model file}: CPU pools, one slot each."""
        self.pool_ids = list(pools)
        text = "".join(f'[[pool]]\nid = "{pid}"\nmodel = "{model}"\n' for pid, model in pools.items())
        (self.dir / "pools.toml").write_text(text)

    # -- serve ----------------------------------------------------------------------------------------
    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._zygote is None:
            self._zygote = subprocess.Popen(
                [sys.executable, str(ZYGOTE)], env=self.env, cwd=REPO, text=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )  # fmt: skip
            assert self._zygote.stdout is not None
            assert json.loads(self._zygote.stdout.readline()) == {"ready": True}
        assert self._zygote.stdin is not None and self._zygote.stdout is not None
        self._zygote.stdin.write(json.dumps(request) + "\n")
        self._zygote.stdin.flush()
        answer: dict[str, Any] = json.loads(self._zygote.stdout.readline())
        return answer

    def start(self, *args: str) -> int:
        """Fork a `serve`; its pid. Does not wait for it to answer."""
        pid = int(self._ask({"cmd": "serve", "args": list(args), "log": str(self.log_path)})["pid"])
        self.serves.append(pid)
        return pid

    def start_and_wait(self, *args: str, timeout: float = 20) -> int:
        pid = self.start(*args)
        self.wait_until(lambda: self.api_up(), timeout, "the API to answer")
        return pid

    def kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.wait_exit(pid, 10)

    def wait_exit(self, pid: int, timeout: float) -> int | None:
        status = self._ask({"cmd": "wait", "pid": pid, "timeout": timeout})["status"]
        return None if status is None else int(status)

    def term(self, pid: int, timeout: float = 20) -> int | None:
        os.kill(pid, signal.SIGTERM)
        return self.wait_exit(pid, timeout)

    # -- engines --------------------------------------------------------------------------------------
    def engine_socket(self, pool_id: str) -> Path:
        """Where serve runs the pool's engine: a unix socket in the pool's workdir (engines have no TCP port)."""
        return self.dir / "state" / "work" / pool_id / "engine.sock"

    def engine(self, pool_id: str) -> httpx.Client:
        """A client straight to the pool's engine over its socket, not through serve (close it after use)."""
        transport = httpx.HTTPTransport(uds=str(self.engine_socket(pool_id)))
        return httpx.Client(transport=transport, base_url="http://engine", timeout=10, trust_env=False)

    def endpoint_url(self, pool_id: str) -> str:
        """The address serve records for a ready pool: its own data plane's route to the engine."""
        return f"{self.base}/pools/{pool_id}/engine"

    # -- API ------------------------------------------------------------------------------------------
    def api_up(self) -> bool:
        try:
            return self.client.get("/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def status(self, pool_id: str) -> dict[str, Any]:
        resp = self.client.get(f"/pools/{pool_id}/status")
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    def wait_until(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                if pred():
                    return
            time.sleep(0.05)
        raise AssertionError(f"{what}: not reached in {timeout:g} s\n--- serve log tail:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    # -- teardown -------------------------------------------------------------------------------------
    def cleanup(self) -> None:
        for pid in self.serves:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._zygote is not None:
            with contextlib.suppress(Exception):
                self._zygote.kill()
                self._zygote.wait(5)
            for stream in (self._zygote.stdin, self._zygote.stdout):
                if stream is not None:
                    with contextlib.suppress(Exception):
                        stream.close()
        for pool_id in self.pool_ids:
            for proc in marked_processes(pool_id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        self.client.close()
        keep = os.environ.get("POOLMGR_CHAOS_KEEP_LOGS")  # a directory: serve's and the engines' logs go there
        if keep:
            with contextlib.suppress(OSError):
                shutil.copytree(self.dir, Path(keep) / self.dir.name, ignore=shutil.ignore_patterns("work"))
        shutil.rmtree(self.dir, ignore_errors=True)
