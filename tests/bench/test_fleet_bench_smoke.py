"""bench/fleet.py runs end to end in its quick mode against PostgreSQL (a smoke test: it never asserts on speed)."""

from __future__ import annotations

import pytest

from tests.conftest import PG_REQUIRED, PG_URL, _pg_reachable

from .test_bench_smoke import assert_positive, run_bench

pytestmark = pytest.mark.postgres


def test_fleet_bench_reports_commits_view_times_and_sees_the_dead_node() -> None:
    why = _pg_reachable()
    if why is not None:
        if PG_REQUIRED:
            pytest.fail(f"PostgreSQL at {PG_URL} is required (POOLMGR_TEST_POSTGRES=required) but: {why}")
        pytest.skip(f"no PostgreSQL reachable at {PG_URL}: {why}")
    pg_url = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    result, out = run_bench("fleet", "--quick", "--pg-url", pg_url, timeout=120)
    assert result["bench"] == "fleet"
    assert (result["nodes"], result["pools_per_node"], result["pools"]) == (5, 2, 10)
    assert_positive(
        result,
        "commits_per_s", "heartbeats", "heartbeats_per_s", "commits_per_heartbeat", "heartbeat_ms_median",
        "heartbeat_ms_p95", "view_routable_ms_median", "view_routable_ms_p95", "view_per_model_ms_median",
        "view_per_model_ms_p95", "dead_shown_s", "dead_from_stop_s",
    )  # fmt: skip
    assert result["view_routable_rows"] > 0 and result["view_per_model_rows"] > 0
    # the dead node: its pools were routable, then none was, and it was seen within a bound the bench computed
    assert result["dead_seen"] is True, out
    assert result["dead_node_pools"] == result["dead_routable_before"] == 2
    assert result["dead_shown_s"] >= result["grace_ms"] / 1000 * 0.9, "a node shown dead before its grace ran out"
    assert isinstance(result["others_unroutable_max"], int)
    assert [g[0] for g in result["goals"]][:1] == ["steady commits/s (write transactions, exact)"]
    assert result["write_tx"] > 0 and result["commits"] > 0
    assert isinstance(result["goal_met"], bool)
    for line in ("steady commits/s", "fleet view p95 ms", "dead node shown s", "all goals:"):
        assert line in out
