"""Each benchmark runs end to end in its quick mode and ends with a JSON line of positive numbers.

These are smoke tests: they prove the benchmarks still work against the current code. They never assert on
speed (a benchmark prints numbers; docs/benchmarks.md records them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LLAMA_SERVER = Path(
    os.environ.get("POOL_MANAGERD_LLAMA_SERVER") or "/var/cache/poolmgr/llamacpp/b11434/bin/llama-server"
)
E2E_REQUIRED = os.environ.get("POOLMGR_TEST_E2E", "") == "required"
PG_REQUIRED = os.environ.get("POOLMGR_TEST_POSTGRES", "") == "required"


def run_bench(name: str, *args: str, timeout: float = 240) -> tuple[dict[str, Any], str]:
    """Run bench/<name>.py; (its last line as JSON, everything it printed). It must exit 0."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / f"{name}.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, (
        f"bench/{name}.py exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, "the benchmark printed nothing"
    return json.loads(lines[-1]), proc.stdout


def assert_positive(result: dict[str, Any], *keys: str) -> None:
    for key in keys:
        assert key in result, f"missing {key!r} in {sorted(result)}"
        value = result[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), f"{key}={value!r} is not a number"
        assert value > 0, f"{key}={value!r} is not positive"


def needs_llama_server() -> None:
    if not os.access(LLAMA_SERVER, os.X_OK):
        if E2E_REQUIRED:
            pytest.fail(f"end-to-end benchmarks are required but there is no llama-server at {LLAMA_SERVER}")
        pytest.skip(f"no llama-server at {LLAMA_SERVER}")


def test_store_bench_reports_transitions_per_second_next_to_the_sqlite_floor() -> None:
    result, out = run_bench("store", "--quick")
    assert result["bench"] == "store"
    assert_positive(
        result, "sqlite_per_s", "sqlite_floor_per_s", "sqlite_ratio", "sqlite_cpu_only_per_s", "poolmgr_cpu_ms"
    )
    assert (result["sqlite_journal_mode"], result["sqlite_synchronous"]) == ("wal", "FULL")
    assert isinstance(result["sqlite_goal_met"], bool) and isinstance(result["sqlite_ratio_goal_met"], bool)
    assert "goal SQLite" in out and "sqlite3 floor" in out
    if result["postgres_per_s"] is not None or PG_REQUIRED:
        assert_positive(result, "postgres_per_s", "postgres_floor_per_s")
        assert isinstance(result["postgres_goal_met"], bool)


@pytest.mark.e2e
def test_preload_bench_reports_the_floor_poolmgrs_preload_and_the_lag() -> None:
    needs_llama_server()
    result, out = run_bench("preload", "--quick")
    assert result["bench"] == "preload"
    assert_positive(
        result, "floor_ms", "floor_wrapped_ms", "preload_ms", "start_preload_to_ready_ms", "spawn_to_engine_ready_ms"
    )
    assert isinstance(result["lag_ms"], float) and isinstance(result["goal_met"], bool)
    assert result["lag_ms"] == pytest.approx(result["preload_ms"] - result["floor_ms"], abs=0.05)
    assert "goal lag" in out and "dominant" in out
    assert result["engine_transport"] == "unix socket" and "serve on a unix socket" in out


@pytest.mark.e2e
def test_restart_bench_reports_sigkill_to_serving_again_next_to_the_cold_start_floor() -> None:
    needs_llama_server()
    result, out = run_bench("restart", "--quick")
    assert result["bench"] == "restart"
    assert_positive(result, "floor_ms", "floor_wrapped_ms", "restart_ms", "restart_to_health_ms", "ratio")
    assert result["restart_to_health_ms"] < result["restart_ms"] + 50  # the engine answers before poolmgr records it
    assert result["restart_count"] >= 1
    assert result["ratio"] == pytest.approx(result["restart_ms"] / result["floor_ms"], rel=0.01)
    assert isinstance(result["goal_met"], bool) and "goal restart" in out
    assert result["engine_transport"] == "unix socket" and "serve on a unix socket" in out
    if result["container_skipped"] is None:  # the container pool's row beside the process pool's, same run
        assert result["runtimes"] == ["process", "podman"] and "container pool restart" in out
        assert_positive(result, "container_restart_ms", "container_restart_to_health_ms", "container_ratio")
        assert result["container_vs_process"] == pytest.approx(
            result["container_restart_ms"] / result["restart_ms"], rel=0.01
        )
    else:
        assert result["runtimes"] == ["process"] and "container pool (runtime = podman): skipped:" in out


def test_hang_bench_reports_sigstop_to_the_crash_row_next_to_its_bound() -> None:
    needs_llama_server()
    result, out = run_bench("hang", "--quick")
    assert result["bench"] == "hang" and result["runs"] == 1
    assert_positive(result, "detect_median_s", "bound_s", "interval_ms", "timeout_ms", "threshold")
    assert result["reasons"] == ["health_failure"]  # found by the probes, not by an exit
    assert result["detect_min_s"] <= result["detect_median_s"] <= result["detect_max_s"]
    assert isinstance(result["within_bound"], bool) and "SIGSTOP -> crash row" in out


def test_restart_bench_leaves_the_container_row_out_when_asked() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from restart import parse_args
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert parse_args(["--quick", "--runtime", "process"]).runtimes == ["process"]
    assert parse_args([]).runtimes == ["process", "podman"]
    with pytest.raises(SystemExit):
        parse_args(["--runtime", "podman"])


def test_spawn_bench_reports_each_spawner_next_to_the_bare_floor() -> None:
    result, out = run_bench("spawn", "--quick", "--no-engine")
    assert result["bench"] == "spawn"
    assert_positive(result, "true_bare_ms", "true_python_ms", "true_forkserver_ms")
    if result["poolmgr_spawner"] == "c":
        assert_positive(result, "true_c_ms")
    assert "health_bare_ms" not in result and "llama-server: spawn -> first /health 200: skipped" in out
    if result["root"]:  # a real plan: every spawner must keep every layer, or it is not kept
        assert result["layers_missing"] == {k: [] for k in result["layers_missing"]}
        assert result["kept"] in result["layers_missing"]
    assert "kept: " in out and "over bare" in out


@pytest.mark.e2e
def test_spawn_bench_times_llama_server_to_its_first_health_through_each_spawner() -> None:
    needs_llama_server()
    result, out = run_bench("spawn", "--quick")
    assert_positive(result, "health_bare_ms", "health_python_ms", "health_forkserver_ms")
    assert "serves on a unix socket" in out


def scale_rows(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith('{"bench": "scale"')]


def assert_scale_row(row: dict[str, Any]) -> None:
    assert "error" not in row and "skipped" not in row, row
    assert_positive(row, "cold_start_s", "metrics_ms_median", "metrics_ms_p95", "metrics_bytes", "pools_ms_median",
                    "pools_ms_p95", "api_after_kill_s", "readopt_from_kill_s", "serve_rss_mib")  # fmt: skip
    assert row["idle_cpu_pct"] >= 0 and row["idle_commits_per_s"] >= 0  # NaN (no counter) fails here too
    assert row["restarted"] == 0, "an engine was restarted instead of re-adopted after kill -9 of serve"
    assert row["readopt_from_kill_s"] > row["readopt_after_api_s"]
    assert isinstance(row["goal_met"], bool)
    assert row["engine_transport"] == "unix socket"  # this tree's engines: no TCP


@pytest.mark.e2e
def test_scale_bench_reports_idle_cost_requests_cold_start_and_readoption_of_real_pools() -> None:
    needs_llama_server()
    _, out = run_bench("scale", "--quick", "--json")
    rows = scale_rows(out)
    assert {r["db"] for r in rows} >= ({"sqlite", "postgresql"} if PG_REQUIRED else {"sqlite"}), out
    for row in rows:
        assert (row["engine"], row["pools"]) == ("real", 2)
        assert_scale_row(row)
    assert "kill -9 -> all re-adopted" in out and "goal (200 real pools)" in out


def test_scale_bench_runs_fake_engine_pools_after_its_memory_check() -> None:
    _, out = run_bench("scale", "--quick", "--json", "--pools", "", "--fake-pools", "2", "--db", "sqlite")
    (row,) = scale_rows(out)
    assert (row["db"], row["engine"], row["pools"]) == ("sqlite", "fake", 2)
    assert_scale_row(row)
    assert "MiB Pss each" in out and "goal (1,000 fake pools)" in out
