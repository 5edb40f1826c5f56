"""Restart policy on a fake clock: backoff, breaker (one trial, doubling) and storm decisions."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import timedelta

import pytest

from poolmgr.clock import FakeClock
from poolmgr.lifecycle.policy import RestartPolicy, breaker_state
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig
from poolmgr.states import PoolState, Trigger
from poolmgr.store import PoolView, Registry
from tests.pool_steps import step


def _policy(**kw: int) -> RestartPolicy:
    return RestartPolicy(PoolManagerConfig(**kw), rng=random.Random(7))  # type: ignore[arg-type]


def _crashed_pool(sqlite_url: str, clock: FakeClock) -> PoolView:
    reg = Registry(sqlite_url, node_id="n", clock=clock)
    reg.register(PoolSpec(id="p", model="/m.gguf"))
    view = step(reg, "p", Trigger.PLACE, Trigger.START_PRELOAD, Trigger.PRELOAD_FAILED)
    reg.close()
    return view


def test_backoff_starts_at_initial_doubles_and_caps_within_ten_percent_jitter() -> None:
    policy = _policy(backoff_initial_ms=1000, backoff_max_ms=60_000)
    for n, base in enumerate([1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000]):
        for _ in range(20):
            delay = policy.backoff_delay_ms(n)
            assert base * 0.9 - 1 <= delay <= min(base * 1.1 + 1, 60_000), (step, delay)


def test_backoff_jitter_spreads_delays() -> None:
    policy = _policy(backoff_initial_ms=1000, backoff_max_ms=60_000)
    assert len({policy.backoff_delay_ms(2) for _ in range(50)}) > 10


def test_zero_initial_backoff_restarts_at_once() -> None:
    assert _policy(backoff_initial_ms=0, backoff_max_ms=10).backoff_delay_ms(5) == 0


def test_crashed_pool_backs_off_with_the_stored_step(sqlite_url: str, clock: FakeClock) -> None:
    view = replace(_crashed_pool(sqlite_url, clock), backoff_step=3, consecutive_failures=1)
    decision = _policy(backoff_initial_ms=100, backoff_max_ms=100_000).on_crash(view, clock.now(), restarts_in_window=0)
    assert decision.action == "back_off"
    assert 720 <= decision.delay_ms <= 880
    assert decision.next_restart_at == clock.now() + timedelta(milliseconds=decision.delay_ms)


def test_breaker_opens_after_threshold_consecutive_failed_starts(sqlite_url: str, clock: FakeClock) -> None:
    policy = _policy(circuit_breaker_threshold=3, circuit_breaker_timeout_secs=300)
    view = _crashed_pool(sqlite_url, clock)
    assert (
        policy.on_crash(replace(view, consecutive_failures=2), clock.now(), restarts_in_window=0).action == "back_off"
    )
    opened = policy.on_crash(replace(view, consecutive_failures=3), clock.now(), restarts_in_window=0)
    assert opened.action == "open_breaker"
    assert opened.breaker_until == clock.now() + timedelta(seconds=300)


def test_failed_half_open_trial_reopens_with_doubled_timeout(sqlite_url: str, clock: FakeClock) -> None:
    policy = _policy(circuit_breaker_timeout_secs=300)
    view = replace(_crashed_pool(sqlite_url, clock), breaker_trial=True, breaker_timeout_s=300.0)
    first = policy.on_crash(view, clock.now(), restarts_in_window=0)
    assert (first.action, first.breaker_timeout_s) == ("open_breaker", 600.0)
    second = policy.on_crash(replace(view, breaker_timeout_s=600.0), clock.now(), restarts_in_window=0)
    assert second.breaker_timeout_s == 1200.0


def test_more_restarts_than_the_limit_in_the_window_is_a_storm(sqlite_url: str, clock: FakeClock) -> None:
    policy = _policy(restart_rate_limit=10, restart_window_secs=60)
    view = _crashed_pool(sqlite_url, clock)
    assert policy.on_crash(view, clock.now(), restarts_in_window=9).action == "back_off"
    storm = policy.on_crash(view, clock.now(), restarts_in_window=10)
    assert storm.action == "open_breaker" and storm.storm
    assert "restart storm" in storm.reason


def test_storm_window_counts_retry_audit_rows_sliding(sqlite_url: str, clock: FakeClock) -> None:
    reg = Registry(sqlite_url, node_id="n", clock=clock)
    reg.register(PoolSpec(id="p", model="/m.gguf"))
    step(reg, "p", Trigger.PLACE, Trigger.START_PRELOAD, Trigger.PRELOAD_FAILED)
    policy = _policy(restart_window_secs=60)
    for _ in range(4):
        step(reg, "p", Trigger.BACK_OFF, Trigger.RETRY, Trigger.PRELOAD_FAILED)
        clock.advance(20)
    # restarts at t=0, 20, 40, 60 → at t=80 the window [20, 80] holds three of them
    assert reg.count_events("p", trigger="retry", since=policy.storm_window_start(clock.now())) == 3
    reg.close()


def test_backoff_step_resets_only_after_the_stable_period(sqlite_url: str, clock: FakeClock) -> None:
    policy = _policy(backoff_stable_secs=300)
    view = replace(_crashed_pool(sqlite_url, clock), ready_since=clock.now(), backoff_step=4)
    assert not policy.stable(view, clock.now() + timedelta(seconds=299))
    assert policy.stable(view, clock.now() + timedelta(seconds=300))


@pytest.mark.parametrize(
    ("state", "trial", "expected"),
    [(PoolState.READY, False, 0), (PoolState.BREAKER_OPEN, False, 1), (PoolState.PRELOADING, True, 2)],
)
def test_breaker_state_gauge_values(
    sqlite_url: str, clock: FakeClock, state: PoolState, trial: bool, expected: int
) -> None:
    view = replace(_crashed_pool(sqlite_url, clock), state=state, breaker_trial=trial)
    assert breaker_state(view) == expected
