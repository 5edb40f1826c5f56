"""Prometheus metrics (B-METRICS-001..010, OC-POOL-3030), served on GET /metrics of the API port.

A scrape costs O(pools), whatever the size of the audit table and however many engines serve:
- counters and histograms are running totals of the audit (see _audit.py): the rollup of pruned rows plus
  the rows of `pool_events`, read once at start and then only after a cursor;
- gauges come from a few columns of this node's `pools` rows and from the device inventory;
- every serving llama.cpp engine's own `llamacpp:*` metrics are fetched in the background on their own
  cadence (see _engines.py): the scrape serves the last answers;
- requests proxied by the data plane come from the node's traffic board (lifecycle/traffic.py): running totals in
  memory, since this poolmgr started;
- the text is written directly (_exposition.py); a histogram appears for a pool once it has an observation.
docs/metrics.md lists every name, label and how it is derived.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from sqlalchemy.exc import SQLAlchemyError

from poolmgr.devices import Inventory
from poolmgr.lifecycle.traffic import BUCKETS as REQUEST_BUCKETS
from poolmgr.lifecycle.traffic import Histogram as RequestHistogram
from poolmgr.lifecycle.traffic import TrafficBoard
from poolmgr.observability import _audit as A
from poolmgr.observability._engines import (
    DEFAULT_INTERVAL_S,
    DEFAULT_TIMEOUT_S,
    EngineMetrics,
    EngineTarget,
    target_for,
)
from poolmgr.observability._exposition import esc, family, fmt, parse, pool_label
from poolmgr.states import ALL_STATES, DesiredState
from poolmgr.store import PoolGauge, Registry

if TYPE_CHECKING:
    from poolmgr.lifecycle.reconciler import Reconciler

log = logging.getLogger("poolmgr.metrics")

POOL = ("pool_id",)
# The classic text format, which every Prometheus (2.x included) reads.
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
REQUESTS = _Family(
    "pool_requests_total",
    "Requests proxied to the pool's engine, by HTTP status (499: the client "
    "left; 502: engine unreachable; 503: refused, queued too long or cut by a drain)",
    ("pool_id", "code"),
)
REQUEST_GAUGES = (
    _Family("pool_requests_in_flight", "Requests admitted to the pool and not finished", POOL),
    _Family("pool_requests_queued", "Requests waiting for the pool to open (starting, reloading, backing off)", POOL),
)
REQUEST_HISTOGRAMS = (
    _Family("pool_request_duration_seconds", "Proxied request duration, arrival to the answer's end", POOL),
    _Family("pool_request_ttfb_seconds", "Arrival to the first byte of the answer's body (a stream: its first token)",
            POOL),
)  # fmt: skip
_LE = {name: [repr(float(b)) for b in bounds] + ["+Inf"] for name, bounds in A.BUCKETS.items()}
_REQUEST_LE = [repr(float(b)) for b in REQUEST_BUCKETS]
_SERVING = frozenset({"ready", "draining"})
_STATES = tuple(s.value for s in ALL_STATES)


class PoolMetricsCollector:
    """Writes the exposition (`render`); also a prometheus_client collector (`collect`) for any registry."""

    def __init__(
        self,
        registry: Registry,
        *,
        node_id: str | None,
        inventory: Callable[[], Inventory],
        window_s: float = 60.0,
        lag_s: float = 60.0,
        engines: EngineMetrics | None = None,
        traffic: TrafficBoard | None = None,
    ) -> None:
        self._registry = registry
        self._traffic = traffic
        self._node_id = node_id
        self._inventory = inventory
        self._audit = A.AuditTally(registry, node_id=node_id, window_s=window_s, lag_s=lag_s)
        self._last = A.Tally(window_s=window_s)
        self._engines: dict[str, str] = {}  # pool_id → engine of the last rows read
        self._lock = threading.Lock()
        self._blocks = {name: _Block() for name in ("pools", "audit", "requests", "engines")}
        self._served: object = None  # what the engine fetcher was last told serves (pools, its version)
        self.engines = engines

    def describe(self) -> list[Metric]:
        return []  # the families depend on the database: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        yield from parse(self.render())

    def prime(self) -> None:
        """Read the audit history now (at start), so that the first scrape does not."""
        try:
            with self._lock:
                self._audit.read()
        except SQLAlchemyError as exc:
            log.warning("metrics: the audit history could not be read yet: %s", str(exc).strip().splitlines()[0])

    def render(self) -> str:
        """The exposition, in the Prometheus text format. Each part is written again only when what it is written
        from changed (the pools' rows, the audit totals, the request counts, the engines' answers); within a part,
        only the lines whose inputs changed."""
        with self._lock:
            pools, tally, db_up = self._read()
            out: list[str] = []
            family(out, "poolmgr_metrics_db_up", "gauge", "1 when the last scrape could read the registry database",
                   [f"poolmgr_metrics_db_up {fmt(db_up)}\n"])  # fmt: skip
            out.append(self._blocks["pools"].get(pools, lambda o, w: _pool_gauges(o, pools, w)))
            _device_gauges(out, self._inventory())
            engines = self._engines
            out.append(
                self._blocks["audit"].get((tally.version, engines), lambda o, w: _audit_families(o, tally, engines, w))
            )
            if self._traffic is not None:
                board = self._traffic
                key = [(p, id(t), t.stats.version, t.in_flight, t.queued) for p, t in sorted(dict(board.pools).items())]
                out.append(self._blocks["requests"].get(key, lambda o, w: _request_metrics(o, board, w)))
            self._engine_metrics(out, pools if db_up else None)
            return "".join(out)

    def _read(self) -> tuple[list[PoolGauge], A.Tally, float]:
        try:
            pools = self._registry.audit.pool_gauges(self._node_id)
            self._last = tally = self._audit.read()
        except SQLAlchemyError as exc:
            # Counters keep their last totals (and labels); gauges are left out rather than shown stale.
            log.warning("metrics: the database is unavailable: %s", str(exc).strip().splitlines()[0])
            return [], self._last, 0.0
        self._engines = {p.id: p.engine for p in pools}
        return pools, tally, 1.0

    def _engine_metrics(self, out: list[str], pools: list[PoolGauge] | None) -> None:
        engines = self.engines
        if engines is None:
            out.append(self._blocks["engines"].get(None, lambda o, w: _engine_up(o, {})))
            return
        if pools is not None and (pools, engines.version) != self._served:  # a scrape that could not read the
            engines.serving({p.id: p.endpoint_url or "" for p in pools if _scrapable(p)})  # pools forgets none
            self._served = (pools, engines.version)
        out.append(self._blocks["engines"].get(engines.version, lambda o, w: _engine_up(o, engines.up())))
        out.append(engines.text())


def _engine_up(out: list[str], up: dict[str, bool]) -> None:
    doc = "1 when the pool's engine answered its last /metrics fetch"
    _gauge(out, "pool_engine_metrics_up", doc, ((pool_label(p), float(ok)) for p, ok in sorted(up.items())))


def _audit_families(out: list[str], tally: A.Tally, engines: dict[str, str], written: _Written) -> None:
    known = sorted(set(engines) | _pools_in(tally))
    _counters(out, tally, engines, known, written)
    _histograms(out, tally, written)


def _scrapable(p: PoolGauge) -> bool:
    return p.state in _SERVING and bool(p.endpoint_url) and p.engine == "llamacpp"


def _breaker_state(p: PoolGauge) -> float:
    """0 closed, 1 open, 2 half-open (the one trial start is running)."""
    return 1.0 if p.state == "breaker-open" else 2.0 if p.breaker_trial else 0.0


def _pool_gauges(out: list[str], pools: list[PoolGauge], written: _Written) -> None:
    labels = [pool_label(p.id) for p in pools]

    def per_pool(name: str, doc: str, values: Iterable[float]) -> None:
        family(out, name, "gauge", doc, [f"{name}{{{lab}}} {fmt(v)}\n" for lab, v in zip(labels, values, strict=True)])

    running = DesiredState.RUNNING.value
    per_pool("pool_slots_total", "Slots of the pool's engine", [p.slots_total for p in pools])
    per_pool("pool_slots_free", "Slots free for a new lease", [p.slots_free for p in pools])
    per_pool("pool_active_leases", "Leases held on the pool", [p.active_leases for p in pools])
    per_pool("circuit_breaker_state", "Circuit breaker: 0 closed, 1 open, 2 half-open", map(_breaker_state, pools))
    per_pool("pool_ready", "1 when the pool is ready to serve", [p.state == "ready" for p in pools])
    per_pool("pool_desired_running", "1 when the pool should run (0 after a drain or a stop)",
             [p.desired_state == running for p in pools])  # fmt: skip
    family(out, "pool_state", "gauge", "1 for the state the pool's FSM is in", [
        written.get(("pool_state", p.id), p.state, _state_lines, lab, p.state)
        for lab, p in zip(labels, pools, strict=True)
    ])  # fmt: skip
    family(out, "pool_info", "gauge", "Always 1: the pool's engine, engine version and device mask as labels", [
        written.get(("pool_info", p.id), (p.engine, p.engine_version, p.device_mask), _info_line, lab, p)
        for lab, p in zip(labels, pools, strict=True)
    ])  # fmt: skip


def _state_lines(label: str, state: str) -> str:
    return "".join(f'pool_state{{{label},state="{s}"}} {"1.0" if s == state else "0.0"}\n' for s in _STATES)


def _info_line(label: str, p: PoolGauge) -> str:
    return (
        f'pool_info{{device_mask="{esc(p.device_mask)}",engine="{esc(p.engine)}",'
        f'engine_version="{esc(p.engine_version or "")}",{label}}} 1.0\n'
    )


def _device_gauges(out: list[str], inventory: Inventory) -> None:
    devices = inventory.devices  # GPUs and MIG instances alike: device_id (the uuid) tells them apart
    labels = [f'device_id="{esc(d.device_id)}"' for d in devices]
    _gauge(out, "device_vram_total_bytes", "VRAM of the device (GPU or MIG instance) in bytes",
           zip(labels, (float(d.vram_total_bytes) for d in devices), strict=True))  # fmt: skip
    _gauge(out, "device_vram_free_bytes",
           "Free VRAM of the device in bytes (NVML, refreshed every POOL_MANAGERD_VRAM_REFRESH_SECS)",
           zip(labels, (float(d.vram_free_bytes) for d in devices), strict=True))  # fmt: skip


def _gauge(out: list[str], name: str, doc: str, series: Iterable[tuple[str, float]]) -> None:
    """A gauge family; `series`: (labels as written, value) pairs."""
    family(out, name, "gauge", doc, (f"{name}{{{labels}}} {fmt(value)}\n" for labels, value in series))


def _pools_in(tally: A.Tally) -> set[str]:
    found = {labels[0] for series in tally.counters.values() for labels in series}
    return found | {pool_id for per_pool in tally.histograms.values() for pool_id in per_pool}


def _counters(out: list[str], tally: A.Tally, engines: dict[str, str], known: list[str], written: _Written) -> None:
    """Each sample's line is written again only when its value (or its pool's engine) changed."""
    for fam in COUNTERS:
        series = tally.counter(fam.name)
        if fam.name in _ZERO_FILLED:
            series = {**dict.fromkeys([(p,) for p in known], 0.0), **series}
        with_engine = fam.name in _ENGINE_LABELLED
        lines = [
            written.get((fam.name, labels), (value, engine), _counter_line, fam, labels, engine, value)
            for labels, value in sorted(series.items())
            for engine in (engines.get(labels[0], "unknown") if with_engine else "",)
        ]
        family(out, fam.name, "counter", fam.help, lines)


def _counter_line(fam: _Family, labels: tuple[str, ...], engine: str, value: float) -> str:
    """A counter's sample, its labels sorted by name (as generate_latest writes them); the engine label of the
    families that have one comes from the pool's row."""
    values = (labels[0], engine, *labels[1:]) if fam.name in _ENGINE_LABELLED else labels
    text = ",".join(f'{n}="{esc(v)}"' for n, v in sorted(zip(fam.labels, values, strict=True)))
    return f"{fam.name}{{{text}}} {fmt(value)}\n"


def _histograms(out: list[str], tally: A.Tally, written: _Written) -> None:
    """Only pools with at least one observation: a pool's 16 zero series per histogram say nothing. A pool's
    histogram changes only when it observes something: its lines are written again only then."""
    for fam in HISTOGRAMS:
        lines = []
        for pool_id, hist in sorted(tally.histogram(fam.name).items()):
            key = (hist.total, *hist.counts)
            lines.append(written.get((fam.name, pool_id), key, _histogram_lines, fam.name, pool_id, hist))
        family(out, fam.name, "histogram", fam.help, lines)


def _histogram_lines(name: str, pool_id: str, hist: A.Histogram) -> str:
    lab, running, lines = pool_label(pool_id), 0, []
    for le, n in zip(_LE[name], hist.counts, strict=True):
        running += n
        lines.append(f'{name}_bucket{{le="{le}",{lab}}} {fmt(running)}\n')
    lines.append(f"{name}_count{{{lab}}} {fmt(running)}\n")
    lines.append(f"{name}_sum{{{lab}}} {fmt(hist.total)}\n")
    return "".join(lines)


def _request_metrics(out: list[str], board: TrafficBoard, written: _Written) -> None:
    """The data plane's counts. The board changes on the event loop while this runs in a worker thread: each
    dict and list is copied (one C call, atomic under the GIL) before it is walked."""
    pools = sorted(dict(board.pools).items())
    lines = []
    for pool_id, traffic in pools:
        for code, n in sorted(dict(traffic.stats.by_code).items()):
            lines.append(f'{REQUESTS.name}{{code="{code}",{pool_label(pool_id)}}} {fmt(float(n))}\n')
    family(out, REQUESTS.name, "counter", REQUESTS.help, lines)
    in_flight, queued = REQUEST_GAUGES
    _gauge(out, in_flight.name, in_flight.help, ((pool_label(p), float(t.in_flight)) for p, t in pools))
    _gauge(out, queued.name, queued.help, ((pool_label(p), float(t.queued)) for p, t in pools))
    for fam, attr in zip(REQUEST_HISTOGRAMS, ("duration", "first_byte"), strict=True):
        hists = [(p, getattr(t.stats, attr)) for p, t in pools]
        family(out, fam.name, "histogram", fam.help, [
            written.get((fam.name, p), (h.count, h.total), _request_histogram_lines, fam.name, p, h)
            for p, h in hists if h.count
        ])  # fmt: skip


def _request_histogram_lines(name: str, pool_id: str, hist: RequestHistogram) -> str:
    """Observations above the last bound are in no bucket of `hist`: they are counted by +Inf (= the count).
    The buckets are read before the count, which `observe` raises first: +Inf is never below a bucket."""
    lab, running, lines = pool_label(pool_id), 0, []
    counts = list(hist.counts)
    count, total = hist.count, hist.total
    for le, n in zip(_REQUEST_LE, counts, strict=True):
        running += n
        lines.append(f'{name}_bucket{{le="{le}",{lab}}} {fmt(float(running))}\n')
    lines.append(f'{name}_bucket{{le="+Inf",{lab}}} {fmt(float(count))}\n')
    lines.append(f"{name}_count{{{lab}}} {fmt(float(count))}\n")
    lines.append(f"{name}_sum{{{lab}}} {fmt(total)}\n")
    return "".join(lines)


class _Written:
    """Text written at an earlier scrape, kept while what it was written from is unchanged (one scrape's worth:
    entries not asked for again are dropped at the next `turn`)."""

    def __init__(self) -> None:
        self._kept: dict[Hashable, tuple[object, str]] = {}
        self._used: dict[Hashable, tuple[object, str]] = {}

    def get(self, where: Hashable, key: object, write: Callable[..., str], *args: Any) -> str:
        """The text at `where`, written by `write(*args)` unless it was written from the same `key` before."""
        found = self._kept.get(where)
        if found is None or found[0] != key:
            found = (key, write(*args))
        self._used[where] = found
        return found[1]

    def turn(self) -> None:
        self._kept, self._used = self._used, {}


class _Block:
    """A part of the exposition, kept while the `key` it was written from compares equal; its own `_Written` keeps
    the lines of the last time it was written."""

    def __init__(self) -> None:
        self._key: object = _Block  # (no key is the class itself: the first `get` writes)
        self._text = ""
        self._written = _Written()

    def get(self, key: object, write: Callable[[list[str], _Written], None]) -> str:
        if self._key is _Block or key != self._key:
            out: list[str] = []
            write(out, self._written)
            self._written.turn()
            self._key, self._text = key, "".join(out)
        return self._text


class MetricsEndpoint:
    """What the API's /metrics route calls: `() -> (exposition body, content type)`."""

    def __init__(self, collector: PoolMetricsCollector) -> None:
        self.collector = collector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)

    def __call__(self) -> tuple[bytes, str]:
        return self.collector.render().encode(), CONTENT_TYPE

    def close(self) -> None:
        if self.collector.engines is not None:
            self.collector.engines.close()


def build_metrics(
    reconciler: Reconciler,
    *,
    engine_timeout_s: float = DEFAULT_TIMEOUT_S,
    lag_s: float = 60.0,
    engine_interval_s: float = DEFAULT_INTERVAL_S,
    traffic: TrafficBoard | None = None,
) -> MetricsEndpoint:
    """The /metrics callable of a running daemon (see poolmgr.daemon): starts the engine fetcher and reads the
    audit history in the background; `close()` stops them. `traffic`: the data plane's board (by default the
    reconciler's, `runtime.traffic`)."""
    registry, node_id = reconciler.registry, reconciler.cfg.node_id
    board = traffic if traffic is not None else reconciler.runtime.traffic

    def targets() -> list[EngineTarget]:
        return [
            target_for(
                p.id, p.endpoint_url or "", p.spec, socket_path=str(reconciler.runtime.socket_path(p.id)), pid=p.pid
            )
            for p in registry.pools(node_id=node_id)
            if p.state in _SERVING and p.endpoint_url and p.engine == "llamacpp"
        ]

    def activity(pool_id: str) -> tuple[int, int]:
        pool = board.pools.get(pool_id)  # read from another thread: two ints, a stale read only delays a fetch
        return (0, 0) if pool is None else (pool.stats.answered, pool.in_flight)

    engines = EngineMetrics(targets, timeout_s=engine_timeout_s, interval_s=engine_interval_s, activity=activity)
    board.on_change(engines.refresh)  # a pool began or stopped serving: its engine is (un)listed at once
    collector = PoolMetricsCollector(
        registry,
        node_id=node_id,
        inventory=lambda: reconciler.inventory,
        window_s=float(reconciler.cfg.restart_window_secs),
        lag_s=lag_s,
        engines=engines,
        traffic=board,
    )
    engines.start()
    threading.Thread(target=collector.prime, name="metrics-history", daemon=True).start()
    return MetricsEndpoint(collector)


__all__ = [
    "CONTENT_TYPE",
    "COUNTERS",
    "HISTOGRAMS",
    "REQUESTS",
    "REQUEST_GAUGES",
    "REQUEST_HISTOGRAMS",
    "MetricsEndpoint",
    "PoolMetricsCollector",
    "build_metrics",
]
