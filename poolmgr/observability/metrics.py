"""Prometheus metrics (B-METRICS-001..010, OC-POOL-3030), served on GET /metrics of the API port.

One custom collector on its own CollectorRegistry (never the process-global one) computes everything at
scrape time, so nothing is counted in memory that the database does not also know:
- counters and histograms from the audit table `pool_events` (see _audit.py): they equal what the rows say,
  and a restarted poolmgr reports the same totals;
- gauges from this node's `pools` rows and from the device inventory;
- every serving llama.cpp engine's own `llamacpp:*` metrics, re-labelled with pool_id (see _engines.py).
docs/metrics.md lists every name, label and how it is derived.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from sqlalchemy.exc import SQLAlchemyError

from poolmgr.devices import Inventory
from poolmgr.lifecycle.policy import breaker_state
from poolmgr.observability import _audit as A
from poolmgr.observability._engines import DEFAULT_TIMEOUT_S, EngineScraper, EngineTarget, target_for
from poolmgr.states import ALL_STATES, DesiredState, PoolState
from poolmgr.store import PoolView, Registry

if TYPE_CHECKING:
    from poolmgr.lifecycle.reconciler import Reconciler

log = logging.getLogger("poolmgr.metrics")

POOL = ("pool_id",)
# What generate_latest() writes: the classic text format, which every Prometheus (2.x included) reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class _Family:
    name: str
    help: str
    labels: tuple[str, ...]


COUNTERS: tuple[_Family, ...] = (
    _Family(A.PRELOAD_SUCCESS, "Engine preloads that reached ready", ("pool_id", "engine")),
    _Family(A.PRELOAD_FAILURE, "Engine preloads that failed, by reason", ("pool_id", "engine", "reason")),
    _Family(A.RESTART, "Engine restarts (after backoff, half-open trials, manual breaker resets)", (*POOL, "reason")),
    _Family(A.DRAIN, "Drains (plain and for a reload) by outcome: drained, forced, aborted", (*POOL, "outcome")),
    _Family(A.RELOAD, "Reloads by outcome: success, rolled_back", (*POOL, "outcome")),
    _Family(A.CRASH, "Engine processes that died or stopped answering, by reason", (*POOL, "reason")),
    _Family(A.BREAKER_OPEN, "Times the circuit breaker opened", POOL),
    _Family(A.STORM, "Restart storms (more restarts in the window than the limit)", POOL),
    _Family(A.DRIVER_RESET, "Engine failures caused by a GPU driver error or a lost GPU", POOL),
)
# Counters with only per-pool labels start at 0 for every known pool, so rate() works from the first event.
_ZERO_FILLED = frozenset({A.PRELOAD_SUCCESS, A.BREAKER_OPEN, A.STORM, A.DRIVER_RESET})
_ENGINE_LABELLED = frozenset({A.PRELOAD_SUCCESS, A.PRELOAD_FAILURE})
HISTOGRAMS: tuple[_Family, ...] = (
    _Family(A.DRAIN_DURATION, "Drain duration in milliseconds (request to engine stopped)", POOL),
    _Family(A.RELOAD_DURATION, "Reload duration in milliseconds (request to new or rolled-back engine ready)", POOL),
    _Family(A.BACKOFF_DELAY, "Backoff delay before a restart, in milliseconds", POOL),
    _Family(A.RESTART_RATE, "Restarts per minute in the storm window, observed at each restart", POOL),
)
_SERVING = frozenset({PoolState.READY, PoolState.DRAINING})


class PoolMetricsCollector:
    """A prometheus_client collector: registered on a CollectorRegistry, asked on every scrape."""

    def __init__(
        self,
        registry: Registry,
        *,
        node_id: str | None,
        inventory: Callable[[], Inventory],
        window_s: float = 60.0,
        lag_s: float = 60.0,
        scraper: EngineScraper | None = None,
    ) -> None:
        self._registry = registry
        self._node_id = node_id
        self._inventory = inventory
        self._audit = A.AuditTally(registry, node_id=node_id, window_s=window_s, lag_s=lag_s)
        self._last = A.Tally(window_s=window_s)
        self._engines: dict[str, str] = {}  # pool_id → engine of the last rows read
        self.scraper = scraper or EngineScraper()

    def describe(self) -> list[Metric]:
        return []  # the families depend on the database: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        db_up = 1.0
        try:
            pools = self._registry.pools(node_id=self._node_id)
            self._last = tally = self._audit.snapshot()
            self._engines = {p.id: p.engine for p in pools}
        except SQLAlchemyError as exc:
            # Counters keep their last totals (and labels); gauges are left out rather than shown stale.
            log.warning("metrics: the database is unavailable: %s", str(exc).strip().splitlines()[0])
            pools, tally, db_up = [], self._last, 0.0
        yield _gauge(
            "poolmgr_metrics_db_up", "1 when the last scrape could read the registry database", (), [((), db_up)]
        )
        yield from _pool_gauges(pools)
        yield from _device_gauges(self._inventory())
        known = sorted(set(self._engines) | _pools_in(tally))
        yield from _counters(tally, self._engines, known)
        yield from _histograms(tally, known)
        targets = [target_for(p.id, p.endpoint_url or "", p.spec) for p in pools if _scrapable(p)]
        yield from self._engine_metrics(targets)

    def _engine_metrics(self, targets: list[EngineTarget]) -> Iterator[Metric]:
        families, up = self.scraper.scrape(targets)
        yield _gauge(
            "pool_engine_metrics_up",
            "1 when the pool's engine answered /metrics within the scrape deadline",
            POOL,
            [((pool_id,), 1.0 if ok else 0.0) for pool_id, ok in sorted(up.items())],
        )
        yield from families


def _scrapable(p: PoolView) -> bool:
    return p.state in _SERVING and bool(p.endpoint_url) and p.engine == "llamacpp"


def _gauge(name: str, doc: str, labels: tuple[str, ...], values: Iterable[tuple[tuple[str, ...], float]]) -> Metric:
    fam = GaugeMetricFamily(name, doc, labels=list(labels))
    for label_values, value in values:
        fam.add_metric(list(label_values), value)
    return fam


def _pool_gauges(pools: list[PoolView]) -> Iterator[Metric]:
    def per_pool(fn: Callable[[PoolView], float]) -> list[tuple[tuple[str, ...], float]]:
        return [((p.id,), float(fn(p))) for p in pools]

    yield _gauge("pool_slots_total", "Slots of the pool's engine", POOL, per_pool(lambda p: p.slots_total))
    yield _gauge("pool_slots_free", "Slots free for a new lease", POOL, per_pool(lambda p: p.slots_free))
    yield _gauge("pool_active_leases", "Leases held on the pool", POOL, per_pool(lambda p: p.active_leases))
    yield _gauge(
        "circuit_breaker_state", "Circuit breaker: 0 closed, 1 open, 2 half-open", POOL, per_pool(breaker_state)
    )
    yield _gauge("pool_ready", "1 when the pool is ready to serve", POOL, per_pool(lambda p: p.ready))
    yield _gauge(
        "pool_desired_running",
        "1 when the pool should run (0 after a drain or a stop)",
        POOL,
        per_pool(lambda p: p.desired_state is DesiredState.RUNNING),
    )
    yield _gauge(
        "pool_state",
        "1 for the state the pool's FSM is in",
        ("pool_id", "state"),
        [((p.id, s.value), float(p.state is s)) for p in pools for s in ALL_STATES],
    )
    yield _gauge(
        "pool_info",
        "Always 1: the pool's engine, engine version and device mask as labels",
        ("pool_id", "engine", "engine_version", "device_mask"),
        [((p.id, p.engine, p.engine_version or "", p.device_mask), 1.0) for p in pools],
    )


def _device_gauges(inventory: Inventory) -> Iterator[Metric]:
    devices = inventory.devices  # GPUs and MIG instances alike: device_id (the uuid) tells them apart
    yield _gauge(
        "device_vram_total_bytes",
        "VRAM of the device (GPU or MIG instance) in bytes",
        ("device_id",),
        [((d.device_id,), float(d.vram_total_bytes)) for d in devices],
    )
    yield _gauge(
        "device_vram_free_bytes",
        "Free VRAM of the device in bytes (NVML, refreshed every POOL_MANAGERD_VRAM_REFRESH_SECS)",
        ("device_id",),
        [((d.device_id,), float(d.vram_free_bytes)) for d in devices],
    )


def _pools_in(tally: A.Tally) -> set[str]:
    found = {labels[0] for series in tally.counters.values() for labels in series}
    return found | {pool_id for per_pool in tally.histograms.values() for pool_id in per_pool}


def _counters(tally: A.Tally, engines: dict[str, str], known: list[str]) -> Iterator[Metric]:
    for fam in COUNTERS:
        out = CounterMetricFamily(fam.name, fam.help, labels=list(fam.labels))
        series = dict(tally.counter(fam.name))
        if fam.name in _ZERO_FILLED:
            for pool_id in known:
                series.setdefault((pool_id,), 0.0)
        for labels, value in sorted(series.items()):
            if fam.name in _ENGINE_LABELLED:
                labels = (labels[0], engines.get(labels[0], "unknown"), *labels[1:])
            out.add_metric(list(labels), value)
        yield out


def _histograms(tally: A.Tally, known: list[str]) -> Iterator[Metric]:
    for fam in HISTOGRAMS:
        out = HistogramMetricFamily(fam.name, fam.help, labels=list(fam.labels))
        observed = tally.histogram(fam.name)
        for pool_id in known:
            hist = observed.get(pool_id) or A.Histogram(A.BUCKETS[fam.name])
            out.add_metric([pool_id], hist.buckets(), sum_value=hist.total)
        yield out


class MetricsEndpoint:
    """What the API's /metrics route calls: `() -> (exposition body, content type)`."""

    def __init__(self, collector: PoolMetricsCollector) -> None:
        self.collector = collector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)

    def __call__(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE

    def close(self) -> None:
        self.collector.scraper.close()


def build_metrics(
    reconciler: Reconciler, *, engine_timeout_s: float = DEFAULT_TIMEOUT_S, lag_s: float = 60.0
) -> MetricsEndpoint:
    """The /metrics callable of a running daemon (see poolmgr.daemon)."""
    collector = PoolMetricsCollector(
        reconciler.registry,
        node_id=reconciler.cfg.node_id,
        inventory=lambda: reconciler.inventory,
        window_s=float(reconciler.cfg.restart_window_secs),
        lag_s=lag_s,
        scraper=EngineScraper(timeout_s=engine_timeout_s),
    )
    return MetricsEndpoint(collector)


__all__ = ["CONTENT_TYPE", "COUNTERS", "HISTOGRAMS", "MetricsEndpoint", "PoolMetricsCollector", "build_metrics"]
