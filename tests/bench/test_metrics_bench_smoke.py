"""bench/metrics.py runs end to end in its quick mode (a smoke test: it never asserts on speed)."""

from __future__ import annotations

from .test_bench_smoke import PG_REQUIRED, assert_positive, run_bench


def test_metrics_bench_reports_scrape_times_with_a_small_and_a_big_audit_and_a_lossless_prune() -> None:
    result, out = run_bench("metrics", "--quick")
    assert result["bench"] == "metrics"
    keys = [f"sqlite_{n}_{what}" for n in (20, 50) for what in ("empty_ms", "full_ms", "first_ms", "bytes")]
    assert_positive(result, *keys)
    assert result["sqlite_20_totals_equal"] is True and result["sqlite_50_totals_equal"] is True
    assert isinstance(result["goal_met"], bool) and "goal /metrics" in out
    if result["postgres"] or PG_REQUIRED:
        assert_positive(result, "postgres_50_empty_ms", "postgres_50_full_ms")
        assert result["postgres_50_totals_equal"] is True
