"""Counters and histograms derived from the audit table (`pool_events`), read incrementally.

The audit table is the truth: every number here is a function of its rows, so a restarted poolmgr reports
the same totals as the one before it (its first scrape reads the relevant history once). Later scrapes read
only the rows after a cursor, by primary key. Rows younger than `lag_s` are not folded into the running
totals but re-read on every scrape: on PostgreSQL ids come from a sequence at insert time, so a row can
commit after a row with a higher id, and a cursor already past it would skip it forever.

How rows become metrics (docs/metrics.md has the table):
  preload_ok        pool_preload_success_total; with detail.reload_outcome also pool_reload_total{outcome}
                    and pool_reload_duration_ms (since the pool's reload_requested row)
  preload_failed    pool_preload_failure_total{reason}; with a process-death reason (CRASH_REASONS) also
                    engine_crash_total
  crashed           engine_crash_total{reason}; from `draining` also pool_drain_total{outcome="aborted"}
  driver errors     driver_reset_total (a crash or failed preload with reason driver_error / gpu_lost)
  back_off          backoff_delay_ms (its backoff_ms)
  retry, trial_start, reset_breaker
                    pool_restart_total{reason}: the reason of the failure before it ("operator_reset" for a
                    manual breaker reset), and restart_rate (restarts per minute in the storm window)
  open_breaker      circuit_breaker_open_total;  restart_storm: restart_storm_total
  drained           pool_drain_total{outcome=drained|forced} and pool_drain_duration_ms (detail.duration_ms)
  stop              from `draining`: pool_drain_total{outcome="aborted"}
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from poolmgr.store import EventView, Registry

PRELOAD_SUCCESS = "pool_preload_success_total"
PRELOAD_FAILURE = "pool_preload_failure_total"
RESTART = "pool_restart_total"
DRAIN = "pool_drain_total"
RELOAD = "pool_reload_total"
CRASH = "engine_crash_total"
BREAKER_OPEN = "circuit_breaker_open_total"
STORM = "restart_storm_total"
DRIVER_RESET = "driver_reset_total"

DRAIN_DURATION = "pool_drain_duration_ms"
RELOAD_DURATION = "pool_reload_duration_ms"
BACKOFF_DELAY = "backoff_delay_ms"
RESTART_RATE = "restart_rate"

# Bucket upper bounds fitted to each range: drains wait up to their deadline (default 30 s); a reload is a
# drain plus a preload (timeout 120 s); backoff doubles from 1 s to 60 s (±10 %); the storm limit is 10/min.
BUCKETS: dict[str, tuple[float, ...]] = {
    DRAIN_DURATION: (10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 300_000, 1_800_000),
    RELOAD_DURATION: (100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 120_000, 300_000, 900_000),
    BACKOFF_DELAY: (10, 50, 100, 250, 500, 1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 120_000),
    RESTART_RATE: (0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120),
}

# A failed preload is also a crash when the engine process died while loading (not for a refusal, a bad model,
# or a slow or unanswered health check); every `crashed` row is one, whatever its reason.
CRASH_REASONS = frozenset({"exit", "signal", "vram_oom", "host_oom", "driver_error", "gpu_lost"})
DRIVER_REASONS = frozenset({"driver_error", "gpu_lost"})
OPERATOR_RESET = "operator_reset"
KINDS = frozenset(
    {
        "preload_ok", "preload_failed", "crashed", "back_off", "retry", "trial_start", "reset_breaker",
        "open_breaker", "restart_storm", "drained", "reload_requested", "stop", "deregistered",
    }
)  # fmt: skip

Labels = tuple[str, ...]


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative), the last one is +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))
        self.counts[index] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, +Inf last, as HistogramMetricFamily takes them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((_le(bound), float(running)))
        return out


@dataclass
class Tally:
    """Running totals over audit rows folded in id order, plus the per-pool context some rows need."""

    window_s: float = 60.0
    counters: dict[str, dict[Labels, float]] = field(default_factory=dict)
    histograms: dict[str, dict[str, Histogram]] = field(default_factory=dict)
    last_failure: dict[str, str] = field(default_factory=dict)
    recent_restarts: dict[str, list[datetime]] = field(default_factory=dict)
    reload_started: dict[str, datetime] = field(default_factory=dict)
    cursor: int = 0  # the id of the last row folded

    def copy(self) -> Tally:
        return copy.deepcopy(self)

    def inc(self, name: str, *labels: str) -> None:
        series = self.counters.setdefault(name, {})
        series[labels] = series.get(labels, 0.0) + 1.0

    def counter(self, name: str) -> dict[Labels, float]:
        return self.counters.get(name, {})

    def observe(self, name: str, pool_id: str, value: float) -> None:
        per_pool = self.histograms.setdefault(name, {})
        hist = per_pool.get(pool_id)
        if hist is None:
            hist = per_pool[pool_id] = Histogram(BUCKETS[name])
        hist.observe(value)

    def histogram(self, name: str) -> dict[str, Histogram]:
        return self.histograms.get(name, {})

    def add(self, ev: EventView) -> None:
        handler = _HANDLERS.get(ev.kind)
        if handler is not None:
            handler(self, ev)

    # -- one method per kind of row -------------------------------------------------------------------
    def _preload_ok(self, ev: EventView) -> None:
        self.inc(PRELOAD_SUCCESS, ev.pool_id)
        outcome = (ev.detail or {}).get("reload_outcome")
        if outcome:
            self.inc(RELOAD, ev.pool_id, str(outcome))
            started = self.reload_started.pop(ev.pool_id, None)
            if started is not None:
                self.observe(RELOAD_DURATION, ev.pool_id, _ms(ev.at - started))

    def _preload_failed(self, ev: EventView) -> None:
        reason = ev.reason or "unknown"
        self.inc(PRELOAD_FAILURE, ev.pool_id, reason)
        self.last_failure[ev.pool_id] = reason
        if reason in CRASH_REASONS:
            self._crash(ev.pool_id, reason)

    def _crashed(self, ev: EventView) -> None:
        reason = ev.reason or "unknown"
        self.last_failure[ev.pool_id] = reason
        self._crash(ev.pool_id, reason)
        if ev.from_state == "draining":
            self.inc(DRAIN, ev.pool_id, "aborted")

    def _crash(self, pool_id: str, reason: str) -> None:
        self.inc(CRASH, pool_id, reason)
        if reason in DRIVER_REASONS:
            self.inc(DRIVER_RESET, pool_id)

    def _back_off(self, ev: EventView) -> None:
        if ev.backoff_ms is not None:
            self.observe(BACKOFF_DELAY, ev.pool_id, float(ev.backoff_ms))

    def _restart(self, ev: EventView) -> None:
        reason = OPERATOR_RESET if ev.kind == "reset_breaker" else self.last_failure.get(ev.pool_id, "unknown")
        self.inc(RESTART, ev.pool_id, reason)
        since = ev.at - timedelta(seconds=self.window_s)
        recent = [t for t in self.recent_restarts.get(ev.pool_id, []) if t > since] + [ev.at]
        self.recent_restarts[ev.pool_id] = recent
        self.observe(RESTART_RATE, ev.pool_id, len(recent) * 60.0 / self.window_s)

    def _drained(self, ev: EventView) -> None:
        detail = ev.detail or {}
        outcome = detail.get("outcome") or ("forced" if detail.get("force_stopped") else "drained")
        self.inc(DRAIN, ev.pool_id, str(outcome))
        if isinstance(detail.get("duration_ms"), int | float):
            self.observe(DRAIN_DURATION, ev.pool_id, float(detail["duration_ms"]))

    def _reload_requested(self, ev: EventView) -> None:
        self.reload_started[ev.pool_id] = ev.at

    def _stop(self, ev: EventView) -> None:
        if ev.from_state == "draining":
            self.inc(DRAIN, ev.pool_id, "aborted")
        self.reload_started.pop(ev.pool_id, None)

    def _deregistered(self, ev: EventView) -> None:
        for context in (self.last_failure, self.recent_restarts, self.reload_started):
            context.pop(ev.pool_id, None)


_HANDLERS: dict[str, Callable[[Tally, EventView], None]] = {
    "preload_ok": Tally._preload_ok,
    "preload_failed": Tally._preload_failed,
    "crashed": Tally._crashed,
    "back_off": Tally._back_off,
    "retry": Tally._restart,
    "trial_start": Tally._restart,
    "reset_breaker": Tally._restart,
    "open_breaker": lambda t, ev: t.inc(BREAKER_OPEN, ev.pool_id),
    "restart_storm": lambda t, ev: t.inc(STORM, ev.pool_id),
    "drained": Tally._drained,
    "reload_requested": Tally._reload_requested,
    "stop": Tally._stop,
    "deregistered": Tally._deregistered,
}
if set(_HANDLERS) != KINDS:  # pragma: no cover - a guard for whoever edits one list and not the other
    raise RuntimeError("audit KINDS and their handlers disagree")


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it: 100.0, 0.5, +Inf."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _ms(delta: timedelta) -> float:
    return max(0.0, delta.total_seconds() * 1000.0)


class AuditTally:
    """Reads new audit rows on each `snapshot()` and returns the totals over every row so far."""

    def __init__(
        self,
        registry: Registry,
        *,
        node_id: str | None,
        window_s: float = 60.0,
        lag_s: float = 60.0,
        batch: int = 5000,
    ) -> None:
        self._registry = registry
        self._node_id = node_id
        self._lag = timedelta(seconds=lag_s)
        self._batch = batch
        self._base = Tally(window_s=window_s)
        self._lock = threading.Lock()

    def snapshot(self) -> Tally:
        with self._lock:
            horizon = self._registry.clock.now() - self._lag
            young: list[EventView] = []
            after = self._base.cursor
            while True:
                rows = self._registry.event_rows(kinds=KINDS, after_id=after, node_id=self._node_id, limit=self._batch)
                for row in rows:
                    # Fold in id order only up to the first young row: everything after it is re-read next time.
                    if not young and row.at <= horizon:
                        self._base.add(row)
                        self._base.cursor = row.id
                    else:
                        young.append(row)
                if len(rows) < self._batch:
                    break
                after = rows[-1].id
            tally = self._base.copy()
            for row in young:
                tally.add(row)
            return tally


__all__ = ["BUCKETS", "CRASH_REASONS", "KINDS", "AuditTally", "Histogram", "Tally"]
