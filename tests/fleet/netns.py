"""A small network of hosts on this machine for the fleet tests: one bridge in the root namespace and one network
namespace per host (the nodes and a client), each with `lo` up, a veth pair to the bridge, an address of the
bridge's /24 and a default route through it.

Names are short and unique per run: `pm` + a kind (`b` bridge, `v`/`p` the two ends of a veth, `f` a namespace)
+ the test process's pid in 7 digits + the run's number in this process (one base-36 digit) + the host's index:
12 characters at most, under the 15 an interface name allows. The /24 is 10.231.X.0 with X picked from the pid and
skipped while an address or route of this machine already uses it. `Network` is a context manager: leaving it (a
failure included) kills every process in its namespaces (the engines too: they run in the node's namespace, in
sessions of their own), deletes the namespaces, the veth pairs and the bridge. What a killed test process could not
clean up (SIGKILL, a timeout) is swept by the next `Network`: names whose pid no longer runs.

Commands enter a host with `nsenter --net=/run/netns/<ns>`: the network namespace only. (`ip netns exec` also
remounts /sys for the namespace, which hides /sys/fs/cgroup from poolmgr's engine sandbox; a node here differs
from a real host in its network, not in its filesystem.) A unix socket path — PostgreSQL's — is reachable from
every namespace, since they share the filesystem.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import psycopg
from psycopg.rows import dict_row

NETNS_DIR = Path("/run/netns")
_RUNS = itertools.count()
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_KINDS = ("pmb", "pmv", "pmf")


def unavailable() -> str | None:
    """Why namespaces cannot be built here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"no `{tool}` on PATH"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _free_prefix(seed: int) -> str:
    used = _ip("-o", "-4", "addr", "show").stdout + _ip("-4", "route", "show").stdout
    for step in range(250):
        third = 1 + (seed + step) % 250
        if f"10.231.{third}." not in used:
            return f"10.231.{third}"
    raise RuntimeError("no free 10.231.X.0/24 on this machine")


def _owner(name: str) -> int | None:
    """The pid of the test process that made `name` (one of ours), else None."""
    if name[:3] in _KINDS and name[3:10].isdigit():
        return int(name[3:10])
    return None


def sweep_stale() -> list[str]:
    """Delete the namespaces and links of test processes that no longer run; returns what it deleted."""
    names = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    names += [line.split(":")[1].strip().split("@")[0] for line in _ip("-o", "link", "show").stdout.splitlines()]
    stale = [n for n in names if (pid := _owner(n)) is not None and not Path(f"/proc/{pid}").exists()]
    for name in stale:
        if name.startswith("pmf"):
            for member in _ip("netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(member), signal.SIGKILL)
            _ip("netns", "del", name, check=False)
        else:
            _ip("link", "del", name, check=False)
    return stale


@dataclass(frozen=True)
class Host:
    """One namespace: `role` (node-a, client), its namespace, its address and the root side of its veth."""

    role: str
    netns: str
    ip: str
    veth: str

    def argv(self, *cmd: str) -> list[str]:
        return ["nsenter", f"--net={NETNS_DIR / self.netns}", "--", *cmd]


class Network:
    """A bridge and one namespace per role; see the module's docstring."""

    def __init__(self, roles: Sequence[str]) -> None:
        assert 0 < len(roles) <= 36, "one base-36 digit per host"
        run = next(_RUNS)
        self.tag = f"{os.getpid():07d}{_DIGITS[run % 36]}"
        self.prefix = "10.231.0"  # chosen in __enter__, once stale networks are swept
        self.gateway = ""
        self.bridge = f"pmb{self.tag}"
        self.hosts: dict[str, Host] = {}
        self._roles = tuple(roles)
        self._seed = os.getpid() + 37 * run
        self.procs: list[subprocess.Popen[bytes]] = []
        self._closed = False

    def __enter__(self) -> Network:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        sweep_stale()
        self.prefix = _free_prefix(self._seed)
        self.gateway = f"{self.prefix}.1"
        self.hosts = {
            role: Host(role, f"pmf{self.tag}{_DIGITS[i]}", f"{self.prefix}.{i + 2}", f"pmv{self.tag}{_DIGITS[i]}")
            for i, role in enumerate(self._roles)
        }
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, host in enumerate(self.hosts.values()):
            peer = f"pmp{self.tag}{_DIGITS[i]}"
            _ip("netns", "add", host.netns)
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", peer, "netns", host.netns)
            _ip("link", "set", host.veth, "master", self.bridge, "up")
            inside = ("-n", host.netns)
            _ip(*inside, "link", "set", "lo", "up")
            _ip(*inside, "link", "set", peer, "name", "eth0")
            _ip(*inside, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _ip(*inside, "link", "set", "eth0", "up")
            _ip(*inside, "route", "add", "default", "via", self.gateway)

    def run(
        self, role: str, cmd: Sequence[str], *, input: str | None = None, timeout: float = 60, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` inside `role`'s namespace and wait for it."""
        return subprocess.run(
            self.hosts[role].argv(*cmd),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=cwd,
        )

    def start(
        self, role: str, cmd: Sequence[str], *, env: Mapping[str, str], log: IO[Any], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `cmd` inside `role`'s namespace. nsenter execs it (no fork without --pid), so the pid is the
        command's own: a kill -9 of it reaches the program itself."""
        proc = subprocess.Popen(self.hosts[role].argv(*cmd), env=dict(env), stdout=log, stderr=log, cwd=cwd)
        self.procs.append(proc)
        return proc

    def pids(self, role: str) -> list[int]:
        """Every process in `role`'s namespace."""
        out = _ip("netns", "pids", self.hosts[role].netns, check=False).stdout
        return [int(p) for p in out.split()]

    def close(self) -> None:
        """Kill every process of the namespaces, delete them and the bridge; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for role in self.hosts:
            self._kill_all(role)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for host in self.hosts.values():
            _ip("netns", "del", host.netns, check=False)
            _ip("link", "del", host.veth, check=False)
        _ip("link", "del", self.bridge, check=False)

    def _kill_all(self, role: str) -> None:
        deadline = time.monotonic() + 10
        while (pids := self.pids(role)) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    def leftovers(self) -> list[str]:
        """Namespaces and links of this network that still exist (empty after close)."""
        names = _ip("netns", "list", check=False).stdout + _ip("-o", "link", "show", check=False).stdout
        return [n for n in (self.bridge, *(h.netns for h in self.hosts.values())) if n in names]


# --- poolmgr nodes on the network ------------------------------------------------------------------------------

API_PORT = 9200


@dataclass
class Node:
    """One `poolmgr serve` in its own namespace, with its own state dir, pools file and engines."""

    node_id: str
    role: str
    ip: str
    workdir: Path
    env: dict[str, str]
    pool_id: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://{self.ip}:{API_PORT}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "serve.log"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else "(no log)"


def pools_toml(*pools: Mapping[str, Any]) -> str:
    """A pools file (JSON strings and lists are TOML too)."""
    lines = []
    for pool in pools:
        lines.append("[[pool]]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in pool.items())
    return "\n".join(lines) + "\n"


REPO = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).with_name("client.py")


@dataclass(frozen=True)
class FleetConfig:
    """What every node shares: the engine, the model, the database (nodes: `db_url`, through the unix socket;
    the test: `view_url`, over TCP in the root namespace), the tokens and the settings of the nodes."""

    root: Path
    llama_server: Path
    model: Path
    db_url: str
    view_url: str
    settings: Mapping[str, str]
    admin_token: str = "fleet-admin-token"
    inference_token: str = "fleet-inference-token"


class Fleet:
    """Nodes `node-a`, `node-b`, … (one tiny pool each) and a `client` host on one `Network`."""

    def __init__(self, net: Network, cfg: FleetConfig) -> None:
        self.net = net
        self.cfg = cfg
        tokens = cfg.root / "inference-tokens"
        tokens.write_text(cfg.inference_token + "\n")
        tokens.chmod(0o600)
        self.nodes = {
            f"node-{role[-1]}": self._node(f"node-{role[-1]}", net.hosts[role], tokens)
            for role in net.hosts
            if role.startswith("node-")
        }

    def _node(self, node_id: str, host: Host, tokens: Path) -> Node:
        workdir = self.cfg.root / node_id
        workdir.mkdir(mode=0o755)
        workdir.chmod(0o755)  # engines run as another user: they must reach their files
        pool_id = f"tiny-{node_id[-1]}-{self.net.tag}"
        spec = {"model": str(self.cfg.model), "slots": 1, "ctx_size": 512}
        (workdir / "pools.toml").write_text(pools_toml({"id": pool_id, **spec, **self.pool_extras()}))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("POOL_MANAGERD_")},
            "POOL_MANAGERD_ADDR": f"{host.ip}:{API_PORT}",
            "POOL_MANAGERD_API_TOKEN": self.cfg.admin_token,
            "POOL_MANAGERD_INFERENCE_TOKENS_FILE": str(tokens),
            "POOL_MANAGERD_NODE_ID": node_id,
            "POOL_MANAGERD_STATE_DIR": str(workdir / "state"),
            "POOL_MANAGERD_CONFIG": str(workdir / "pools.toml"),
            "POOL_MANAGERD_LLAMA_SERVER": str(self.cfg.llama_server),
            "POOL_MANAGERD_DATABASE_URL": self.cfg.db_url,
            **self.cfg.settings,
        }
        return Node(node_id, host.role, host.ip, workdir, env, pool_id)

    @staticmethod
    def pool_extras() -> dict[str, Any]:
        return {"device_mask": "cpu", "extra_args": ["--threads", "1"]}

    # -- nodes --------------------------------------------------------------------------------------------------

    def start(self, *node_ids: str, timeout: float = 30) -> None:
        """Start the nodes' serves (same env, same state dir every time), all at once, and wait for their /health."""
        for node_id in node_ids:
            node = self.nodes[node_id]
            with open(node.log_path, "ab") as log:
                cmd = [sys.executable, "-m", "poolmgr.cli", "serve"]
                node.proc = self.net.start(node.role, cmd, env=node.env, log=log, cwd=REPO)
        deadline = time.monotonic() + timeout
        for node_id in node_ids:
            self._wait_health(self.nodes[node_id], deadline)

    @staticmethod
    def _wait_health(node: Node, deadline: float) -> None:
        assert node.proc is not None
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise AssertionError(f"{node.node_id}: serve exited {node.proc.returncode}:\n{node.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(node.base + "/health", timeout=1, trust_env=False).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"{node.node_id}: serve did not answer /health in time:\n{node.log_tail()}")

    def kill9(self, node_id: str) -> None:
        proc = self.nodes[node_id].proc
        assert proc is not None and proc.poll() is None, f"{node_id} is not running"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL

    def api(self, node_id: str, method: str, path: str, **kw: Any) -> httpx.Response:
        """The node's admin API, from the test's own host (the root namespace, on the bridge)."""
        headers = {"Authorization": f"Bearer {self.cfg.admin_token}"}
        return httpx.request(
            method, self.nodes[node_id].base + path, headers=headers, timeout=30, trust_env=False, **kw
        )

    def logs(self) -> str:
        return "\n".join(f"--- {n.node_id} ---\n{n.log_tail(1500)}" for n in self.nodes.values())

    # -- the fleet view -----------------------------------------------------------------------------------------

    def view(self) -> dict[str, dict[str, Any]]:
        """`pool_registry` by pool id; `pid` from the view, or from `pools` while the view has no such column."""
        with psycopg.connect(self.cfg.view_url, row_factory=dict_row, autocommit=True) as conn:
            rows = {r["pool_id"]: dict(r) for r in conn.execute("SELECT * FROM pool_registry")}
            if rows and "pid" not in next(iter(rows.values())):
                for r in conn.execute("SELECT id, pid FROM pools"):
                    if r["id"] in rows:
                        rows[r["id"]]["pid"] = r["pid"]
        return rows

    def wait_view(self, pred: Any, timeout: float, what: str) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        rows: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            rows = self.view()
            if pred(rows):
                return rows
            time.sleep(0.1)
        raise AssertionError(f"{what}: not reached in {timeout} s; the view: {rows}\n{self.logs()}")

    # -- the client host ----------------------------------------------------------------------------------------

    def client(self, requests: Sequence[Mapping[str, Any]], role: str = "client") -> list[dict[str, Any]]:
        """Send `requests` (dicts of method, url, json, token) from `role`'s namespace, one after the other;
        each answer is {"status", "body"} or {"error"} when no connection was made."""
        proc = self.net.run(role, [sys.executable, str(CLIENT)], input=json.dumps(list(requests)), cwd=REPO)
        assert proc.returncode == 0, f"client exited {proc.returncode}: {proc.stderr[-2000:]}"
        return list(json.loads(proc.stdout))

    def completion(self, endpoint_url: str, token: str | None) -> dict[str, Any]:
        return {
            "method": "POST",
            "url": f"{endpoint_url}/completion",
            "json": {"prompt": "hi", "n_predict": 2, "ignore_eos": True},
            "token": token,
        }
