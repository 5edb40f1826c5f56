"""How audit rows become metric totals: the fold behind /metrics (observability/_audit.py) and behind the
retention prune (store/_retention.py), which folds the rows it deletes into `audit_rollup`. Both fold with this
one code, so a total is the same whether its rows are still in `pool_events` or already rolled up.

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

A fold is sequential: some rows need the pool's context of the rows before them (the last failure, the
restarts in the storm window, when a reload was requested). That context is part of the rollup too, so the
rows after a pruned batch fold exactly as they would have with the batch still there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol

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
# A row of audit_rollup without its node: (pool_id, name, labels after pool_id as a JSON list) -> (value, data)
RollupKey = tuple[str, str, str]
RollupValue = tuple[float, Any]
_LAST_FAILURE, _RELOAD_STARTED, _RECENT_RESTARTS = "ctx:last_failure", "ctx:reload_started", "ctx:recent_restarts"


class FoldRow(Protocol):
    """What the fold reads of an audit row (EventView and AuditRow both have it)."""

    @property
    def pool_id(self) -> str: ...
    @property
    def at(self) -> datetime: ...
    @property
    def kind(self) -> str: ...
    @property
    def from_state(self) -> str | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def backoff_ms(self) -> int | None: ...
    @property
    def detail(self) -> dict[str, Any] | None: ...


class AuditRow(NamedTuple):
    """The columns of a pool_events row that the fold needs, read without the ORM."""

    id: int
    pool_id: str
    at: datetime
    kind: str
    from_state: str | None
    reason: str | None
    backoff_ms: int | None
    detail: dict[str, Any] | None


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

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total)


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
    version: int = 0  # moves with every row or rollup added: what /metrics compares to reuse its text

    def copy(self) -> Tally:
        """An independent copy (cheaper than copy.deepcopy: only histograms and restart lists are objects)."""
        return Tally(
            window_s=self.window_s,
            counters={name: dict(series) for name, series in self.counters.items()},
            histograms={name: {p: h.copy() for p, h in per.items()} for name, per in self.histograms.items()},
            last_failure=dict(self.last_failure),
            recent_restarts={p: list(times) for p, times in self.recent_restarts.items()},
            reload_started=dict(self.reload_started),
            cursor=self.cursor,
            version=self.version,
        )

    def inc(self, name: str, *labels: str, by: float = 1.0) -> None:
        series = self.counters.setdefault(name, {})
        series[labels] = series.get(labels, 0.0) + by

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

    def add(self, ev: FoldRow) -> None:
        handler = _HANDLERS.get(ev.kind)
        if handler is not None:
            handler(self, ev)
            self.version += 1

    # -- one method per kind of row -------------------------------------------------------------------
    def _preload_ok(self, ev: FoldRow) -> None:
        self.inc(PRELOAD_SUCCESS, ev.pool_id)
        outcome = (ev.detail or {}).get("reload_outcome")
        if outcome:
            self.inc(RELOAD, ev.pool_id, str(outcome))
            started = self.reload_started.pop(ev.pool_id, None)
            if started is not None:
                self.observe(RELOAD_DURATION, ev.pool_id, _ms(ev.at - started))

    def _preload_failed(self, ev: FoldRow) -> None:
        reason = ev.reason or "unknown"
        self.inc(PRELOAD_FAILURE, ev.pool_id, reason)
        self.last_failure[ev.pool_id] = reason
        if reason in CRASH_REASONS:
            self._crash(ev.pool_id, reason)

    def _crashed(self, ev: FoldRow) -> None:
        reason = ev.reason or "unknown"
        self.last_failure[ev.pool_id] = reason
        self._crash(ev.pool_id, reason)
        if ev.from_state == "draining":
            self.inc(DRAIN, ev.pool_id, "aborted")

    def _crash(self, pool_id: str, reason: str) -> None:
        self.inc(CRASH, pool_id, reason)
        if reason in DRIVER_REASONS:
            self.inc(DRIVER_RESET, pool_id)

    def _back_off(self, ev: FoldRow) -> None:
        if ev.backoff_ms is not None:
            self.observe(BACKOFF_DELAY, ev.pool_id, float(ev.backoff_ms))

    def _restart(self, ev: FoldRow) -> None:
        reason = OPERATOR_RESET if ev.kind == "reset_breaker" else self.last_failure.get(ev.pool_id, "unknown")
        self.inc(RESTART, ev.pool_id, reason)
        since = ev.at - timedelta(seconds=self.window_s)
        recent = [t for t in self.recent_restarts.get(ev.pool_id, []) if t > since] + [ev.at]
        self.recent_restarts[ev.pool_id] = recent
        self.observe(RESTART_RATE, ev.pool_id, len(recent) * 60.0 / self.window_s)

    def _drained(self, ev: FoldRow) -> None:
        detail = ev.detail or {}
        outcome = detail.get("outcome") or ("forced" if detail.get("force_stopped") else "drained")
        self.inc(DRAIN, ev.pool_id, str(outcome))
        if isinstance(detail.get("duration_ms"), int | float):
            self.observe(DRAIN_DURATION, ev.pool_id, float(detail["duration_ms"]))

    def _reload_requested(self, ev: FoldRow) -> None:
        self.reload_started[ev.pool_id] = ev.at

    def _stop(self, ev: FoldRow) -> None:
        if ev.from_state == "draining":
            self.inc(DRAIN, ev.pool_id, "aborted")
        self.reload_started.pop(ev.pool_id, None)

    def _deregistered(self, ev: FoldRow) -> None:
        for context in (self.last_failure, self.recent_restarts, self.reload_started):
            context.pop(ev.pool_id, None)


_HANDLERS: dict[str, Callable[[Tally, FoldRow], None]] = {
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


# -- the rollup: a Tally as rows of audit_rollup, and back ---------------------------------------------------
def rollup_rows(tally: Tally) -> dict[RollupKey, RollupValue]:
    """Every total and every piece of context of `tally`, keyed as audit_rollup keys its rows."""
    rows: dict[RollupKey, RollupValue] = {}
    for name, series in tally.counters.items():
        for labels, value in series.items():
            rows[(labels[0], name, json.dumps(list(labels[1:])))] = (value, None)
    for name, per_pool in tally.histograms.items():
        for pool_id, hist in per_pool.items():
            rows[(pool_id, name, "[]")] = (hist.total, list(hist.counts))
    for pool_id, reason in tally.last_failure.items():
        rows[(pool_id, _LAST_FAILURE, "[]")] = (0.0, reason)
    for pool_id, at in tally.reload_started.items():
        rows[(pool_id, _RELOAD_STARTED, "[]")] = (0.0, at.isoformat())
    for pool_id, times in tally.recent_restarts.items():
        rows[(pool_id, _RECENT_RESTARTS, "[]")] = (0.0, [t.isoformat() for t in times])
    return rows


def add_rollup(tally: Tally, rows: Iterable[tuple[str, str, str, float, Any]]) -> None:
    """Add rows of audit_rollup (pool_id, name, labels, value, data) to `tally`: totals are summed (the rollups
    of several nodes add up), context is taken as found."""
    for pool_id, name, labels, value, data in rows:
        if name in BUCKETS:
            hist = tally.histograms.setdefault(name, {}).setdefault(pool_id, Histogram(BUCKETS[name]))
            hist.counts = [a + int(b) for a, b in zip(hist.counts, data, strict=True)]
            hist.total += float(value)
        elif name == _LAST_FAILURE:
            tally.last_failure[pool_id] = str(data)
        elif name == _RELOAD_STARTED:
            tally.reload_started[pool_id] = datetime.fromisoformat(data)
        elif name == _RECENT_RESTARTS:
            tally.recent_restarts[pool_id] = [datetime.fromisoformat(t) for t in data]
        else:
            tally.inc(name, pool_id, *json.loads(labels), by=float(value))
        tally.version += 1


__all__ = [
    "BUCKETS",
    "CRASH_REASONS",
    "KINDS",
    "AuditRow",
    "FoldRow",
    "Histogram",
    "RollupKey",
    "RollupValue",
    "Tally",
    "add_rollup",
    "rollup_rows",
]
