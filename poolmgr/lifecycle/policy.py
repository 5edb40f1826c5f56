"""Restart policy: backoff (tenacity's wait strategies), circuit breaker and restart-storm rules.

Pure decisions over a pool's stored counters and an injected clock: no I/O here, so every rule is tested on
a fake clock. The counters themselves live in the database (invariant 4).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from tenacity import wait_exponential

from poolmgr.settings import PoolManagerConfig
from poolmgr.store import PoolView

JITTER = 0.10


@dataclass
class _Attempt:
    """The slice of tenacity's RetryCallState that its wait strategies read."""

    attempt_number: int


@dataclass(frozen=True)
class CrashDecision:
    action: str  # "back_off" | "open_breaker"
    reason: str  # why, for the audit row
    delay_ms: int = 0
    next_restart_at: datetime | None = None
    breaker_timeout_s: float = 0.0
    breaker_until: datetime | None = None
    storm: bool = False


class RestartPolicy:
    def __init__(self, cfg: PoolManagerConfig, *, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self._rng = rng or random.Random()
        self._wait = wait_exponential(
            multiplier=cfg.backoff_initial_ms / 1000.0, exp_base=2, max=cfg.backoff_max_ms / 1000.0
        )

    def restarts_at_once(self) -> bool:
        """Every backoff is 0 ms: a crash is followed by its restart without a wait."""
        return self.cfg.backoff_initial_ms == 0

    def backoff_delay_ms(self, step: int) -> int:
        """Delay before restart number `step + 1`: initial, doubling, capped, ±10 % jitter (never above the cap)."""
        if self.restarts_at_once():
            return 0
        base_s = float(self._wait(_Attempt(attempt_number=step + 1)))  # type: ignore[arg-type]
        jittered = base_s * (1.0 + self._rng.uniform(-JITTER, JITTER))
        return max(0, min(self.cfg.backoff_max_ms, round(jittered * 1000)))

    def storm_window_start(self, now: datetime) -> datetime:
        return now - timedelta(seconds=self.cfg.restart_window_secs)

    def is_storm(self, restarts_in_window: int) -> bool:
        """Another restart now would make more than RESTART_RATE_LIMIT in the window."""
        return restarts_in_window >= self.cfg.restart_rate_limit

    def on_crash(self, pool: PoolView, now: datetime, *, restarts_in_window: int) -> CrashDecision:
        """What a crashed pool does next: back off, or open its breaker (threshold, failed trial, storm)."""
        failures = pool.consecutive_failures
        if pool.breaker_trial:
            timeout = max(pool.breaker_timeout_s, float(self.cfg.circuit_breaker_timeout_secs)) * 2
            return self._open(now, timeout, "half-open trial failed")
        if self.is_storm(restarts_in_window):
            return self._open(
                now,
                float(self.cfg.circuit_breaker_timeout_secs),
                f"restart storm: {restarts_in_window} restarts in {self.cfg.restart_window_secs}s",
                storm=True,
            )
        if failures >= self.cfg.circuit_breaker_threshold:
            return self._open(
                now, float(self.cfg.circuit_breaker_timeout_secs), f"{failures} consecutive failed starts"
            )
        delay = self.backoff_delay_ms(pool.backoff_step)
        return CrashDecision(
            action="back_off",
            reason=f"backoff step {pool.backoff_step + 1}",
            delay_ms=delay,
            next_restart_at=now + timedelta(milliseconds=delay),
        )

    def _open(self, now: datetime, timeout_s: float, reason: str, *, storm: bool = False) -> CrashDecision:
        return CrashDecision(
            action="open_breaker",
            reason=reason,
            breaker_timeout_s=timeout_s,
            breaker_until=now + timedelta(seconds=timeout_s),
            storm=storm,
        )

    def stable(self, pool: PoolView, now: datetime) -> bool:
        """The engine stayed ready for the stable period: the backoff step may reset."""
        return pool.ready_since is not None and now - pool.ready_since >= timedelta(
            seconds=self.cfg.backoff_stable_secs
        )


def breaker_state(pool: PoolView) -> int:
    """0 closed, 1 open, 2 half-open (the circuit_breaker_state gauge)."""
    if pool.state.value == "breaker-open":
        return 1
    if pool.breaker_trial:
        return 2
    return 0


__all__ = ["CrashDecision", "RestartPolicy", "breaker_state"]
