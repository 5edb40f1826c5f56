"""Fleet fixtures: three `poolmgr serve` nodes, each in its own network namespace with its own state dir and a
real llama-server on a tiny model, on one PostgreSQL schema (reached through its unix socket), and a client host.

`POOLMGR_TEST_E2E=required` turns a missing llama-server or missing namespace support into a failure,
`POOLMGR_TEST_POSTGRES=required` an unreachable PostgreSQL (see tests/conftest.py); otherwise they skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from poolmgr.engines._install import resolve_llama_server
from poolmgr.engines.tiny_model import write_tiny_model
from poolmgr.errors import EngineError
from poolmgr.store import migrate
from tests.conftest import pg_schema_url
from tests.fleet.netns import Fleet, FleetConfig, Network, unavailable

E2E_REQUIRED = os.environ.get("POOLMGR_TEST_E2E", "") == "required"
PG_SOCKET_DIR = os.environ.get("POOLMGR_TEST_POSTGRES_SOCKET_DIR", "/var/run/postgresql")
ROLES = ("node-a", "node-b", "node-c", "client")

# Short heartbeats and grace keep the kill -9 story short; the rest as in tests/e2e.
SETTINGS = {
    "POOL_MANAGERD_NODE_HEARTBEAT_MS": "500",
    "POOL_MANAGERD_NODE_GRACE_MS": "2000",
    "POOL_MANAGERD_HEALTH_CHECK_INTERVAL_MS": "500",
    "POOL_MANAGERD_BACKOFF_INITIAL_MS": "50",
    "POOL_MANAGERD_BACKOFF_MAX_MS": "400",
    "POOL_MANAGERD_STOP_GRACE_MS": "2000",
}
GRACE_S = int(SETTINGS["POOL_MANAGERD_NODE_GRACE_MS"]) / 1000
HEARTBEAT_S = int(SETTINGS["POOL_MANAGERD_NODE_HEARTBEAT_MS"]) / 1000


def _missing(why: str) -> None:
    if E2E_REQUIRED:
        pytest.fail(f"end-to-end tests are required (POOLMGR_TEST_E2E=required) but: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def fleet_engine() -> Iterator[tuple[Path, Path]]:
    """(llama-server, the tiny model in a 0755 directory the engines' user can read)."""
    if why := unavailable():
        _missing(why)
    try:
        server = resolve_llama_server(os.environ.get("POOL_MANAGERD_LLAMA_SERVER", ""))
    except EngineError as exc:
        _missing(f"no llama-server: {exc}")
    path = Path(tempfile.mkdtemp(prefix="poolmgr-fleet-model-"))
    path.chmod(0o755)
    model = write_tiny_model(path / "tiny.gguf")
    model.chmod(0o644)
    yield server, model
    shutil.rmtree(path, ignore_errors=True)


def socket_url(tcp_url: str) -> str:
    """The same database and schema through PostgreSQL's unix socket (reachable from every namespace)."""
    parts = urlsplit(tcp_url)
    sock = Path(PG_SOCKET_DIR) / f".s.PGSQL.{parts.port or 5432}"
    if not sock.exists():
        why = f"no PostgreSQL unix socket at {sock} (set POOLMGR_TEST_POSTGRES_SOCKET_DIR)"
        if os.environ.get("POOLMGR_TEST_POSTGRES", "") == "required":
            pytest.fail(f"PostgreSQL is required (POOLMGR_TEST_POSTGRES=required) but: {why}")
        pytest.skip(why)
    query = f"host={PG_SOCKET_DIR}" + (f"&{parts.query}" if parts.query else "")
    return f"postgresql+psycopg://{parts.username or 'postgres'}@{parts.path}?{query}"


@contextlib.contextmanager
def running_fleet(engine: tuple[Path, Path]) -> Iterator[Fleet]:
    """A migrated schema, the network, three started nodes; everything torn down afterwards, failure or not."""
    root = Path(tempfile.mkdtemp(prefix="poolmgr-fleet-"))
    root.chmod(0o755)
    try:
        with contextlib.contextmanager(pg_schema_url)() as view_url:
            migrate(view_url)
            cfg = FleetConfig(root, engine[0], engine[1], socket_url(view_url), view_url, SETTINGS)
            with Network(ROLES) as net:
                fleet = Fleet(net, cfg)
                fleet.start(*fleet.nodes)
                yield fleet
            assert net.leftovers() == [], f"namespaces or links left behind: {net.leftovers()}"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def all_routable_rows(fleet: Fleet, rows: dict[str, dict[str, object]]) -> bool:
    return all(n.pool_id in rows and rows[n.pool_id]["state"] == "ready" for n in fleet.nodes.values())


@pytest.fixture(scope="module")
def fleet(fleet_engine: tuple[Path, Path]) -> Iterator[Fleet]:
    """Three nodes whose pools are all ready (shared by a module's tests, in order)."""
    with running_fleet(fleet_engine) as f:
        f.wait_view(lambda rows: all_routable_rows(f, rows), 60, "every node's pool ready")
        yield f
