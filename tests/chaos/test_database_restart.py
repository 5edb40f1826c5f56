"""PostgreSQL goes away under a running `serve` (stopped, then started again): poolmgr waits and says so,
engines keep serving, the API answers 503 meanwhile, and afterwards every transition is in the audit trail.

This restarts the machine's PostgreSQL cluster: other PostgreSQL tests running at the same moment see it too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from poolmgr.store import Registry
from tests.chaos._rig import Rig, engines, marked_processes, model_file
from tests.chaos.audit import restart_count_matches, transition_chain_gaps
from tests.conftest import PG_REQUIRED, pg_schema_url

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
OUTAGE_S = 4.0


def _pg_ctl(action: str) -> None:
    versions = sorted(p.name for p in Path("/etc/postgresql").iterdir())
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", action], check=True, timeout=60)


def _pg_ready() -> bool:
    return subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"], check=False).returncode == 0


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not Path("/etc/postgresql").is_dir() or shutil.which("pg_ctlcluster") is None or os.geteuid() != 0:
        why = "no local PostgreSQL cluster this user can restart (pg_ctlcluster as root)"
        if PG_REQUIRED:
            pytest.fail(f"PostgreSQL tests are required (POOLMGR_TEST_POSTGRES=required) but: {why}")
        pytest.skip(why)
    yield from pg_schema_url()


def test_serve_waits_out_a_postgresql_restart_and_records_every_transition(
    pg_url: str, rig_factory: Callable[..., Rig]
) -> None:
    rig = rig_factory(pg_url, POOL_MANAGERD_RESTART_RATE_LIMIT="50")
    steady, crashy = rig.pool_id("steady"), rig.pool_id("crashy")
    rig.write_pools(
        {steady: model_file(rig.dir / "ok.gguf", "ok"), crashy: model_file(rig.dir / "c.gguf", "crash_after")}
    )
    serve = rig.start_and_wait()
    rig.wait_until(lambda: rig.status(steady)["state"] == "ready", 20, "steady ready")
    rig.wait_until(lambda: rig.status(crashy)["restart_count"] >= 1, 20, "crashy restarted once")
    before = rig.status(steady)
    assert before["endpoint_url"] == rig.endpoint_url(steady)
    try:
        _pg_ctl("stop")
        # While the database is away: the engine still serves, the API says 503, poolmgr keeps running.
        with rig.engine(steady) as engine:
            completion = engine.post("/completion", json={"prompt": "hi", "n_predict": 4})
        assert completion.status_code == 200
        resp = rig.client.get(f"/pools/{steady}/status")
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "unavailable"
        time.sleep(OUTAGE_S)  # the crashing pool's engine dies meanwhile: its crash waits to be written
        assert rig.wait_exit(serve, 0) is None, "serve died while the database was away"
    finally:
        if not _pg_ready():
            _pg_ctl("start")
    rig.wait_until(_pg_ready, 30, "PostgreSQL back")
    rig.wait_until(lambda: "the database answers again" in rig.log_tail(200_000), 30, "poolmgr reconnected")
    restarts = rig.status(crashy)["restart_count"]
    rig.wait_until(lambda: rig.status(crashy)["restart_count"] >= restarts + 2, 30, "the crashing pool cycling again")

    log = rig.log_tail(500_000)
    assert "waiting for the database to answer" in log
    assert "Traceback" not in log
    after = rig.status(steady)
    assert (after["state"], after["pid"]) == ("ready", before["pid"])  # the outage restarted nothing
    assert after["heartbeat_at"] != before["heartbeat_at"]  # health checks recorded again
    assert rig.term(serve) == 0
    registry = Registry(pg_url, node_id="reader")
    try:
        for pool_id in (steady, crashy):
            view, events = registry.get(pool_id), registry.events(pool_id=pool_id)
            assert transition_chain_gaps(view, events) == [], pool_id
            assert restart_count_matches(view, events)
            assert engines(pool_id) == [] and marked_processes(pool_id) == []
        crashes = [e for e in registry.events(pool_id=crashy) if e.trigger == "crash"]
        assert len(crashes) >= 2
    finally:
        registry.close()
