"""Each serving engine's own /metrics (llamacpp:*), re-labelled with the pool's id and fetched in the background.

`EngineMetrics` fetches every ready or draining engine on its own cadence (every `interval_s`, the engines spread
over it, at most `concurrency` at once) and keeps the last answer of each, already written in the text format;
a /metrics scrape only serves that cache, with `pool_engine_metrics_up` saying whether the last fetch worked. A
stuck engine (stopped, wedged, trickling bytes) costs one background worker its deadline and shows as down;
it never stalls /metrics. Only `llamacpp:` families are passed on, so an engine cannot shadow poolmgr's names.
"""

from __future__ import annotations

import functools
import heapq
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from poolmgr.engines import socket_client
from poolmgr.poolsfile import PoolSpec

log = logging.getLogger("poolmgr.metrics")

ENGINE_PREFIX = "llamacpp:"
DEFAULT_TIMEOUT_S = 1.0
DEFAULT_INTERVAL_S = 15.0  # Prometheus' usual scrape interval: an engine's numbers are at most this old
_MIN_SYNC_GAP_S = 0.5  # refreshes closer together than this read the targets once (200 pools starting)
_RESYNC_S = 300.0  # the targets are read when told (`refresh`: a pool began or stopped serving), and this often
_FIRST_FETCH_SPREAD_S = 2.0  # engines that began serving are first fetched within this (then every interval)
_PARKED_PASSES = 3  # idle (parked) engines are looked at this many times an interval, all in one pass
# OpenMetrics counters end in _total; llama.cpp types a few gauges as counters (llamacpp:n_tokens_max). The
# parser would rename those samples to `<name>_total`: we keep the engine's name and call the type unknown.
_COUNTER_TYPE_RE = re.compile(r"^# TYPE (\S+) counter\s*$", re.MULTILINE)


@dataclass(frozen=True)
class EngineTarget:
    """`base_url`: the pool's registry endpoint (names its engine); `socket_path`: where the engine answers."""

    pool_id: str
    base_url: str
    socket_path: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    pid: int | None = None  # the engine process: a restarted engine is a new target (its counters start over)


def engine_api_keys(spec: PoolSpec) -> list[str]:
    """The API keys a pool's engine was started with (`--api-key K[,K2]` or `--api-key-file F`)."""
    keys: list[str] = []
    args = list(spec.extra_args)
    for i, arg in enumerate(args):
        flag, eq, inline = arg.partition("=")
        if flag not in ("--api-key", "--api-key-file"):
            continue
        value = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
        if flag == "--api-key":
            keys += [k.strip() for k in value.split(",") if k.strip()]
        else:
            keys += _keys_from_file(value)
    return keys


def _keys_from_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, ValueError):
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def target_for(
    pool_id: str, base_url: str, spec: PoolSpec, *, socket_path: str, pid: int | None = None
) -> EngineTarget:
    keys = engine_api_keys(spec)
    auth = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    return EngineTarget(pool_id, base_url.rstrip("/"), socket_path, auth, pid)


def relabel(text: str, pool_id: str) -> list[Metric]:
    """The engine's `llamacpp:*` families with a pool_id label on every sample."""
    text = _COUNTER_TYPE_RE.sub(lambda m: m.group(0) if m.group(1).endswith("_total") else _untyped(m.group(1)), text)
    out: list[Metric] = []
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(ENGINE_PREFIX):
            continue
        metric = Metric(family.name, family.documentation, family.type, family.unit)
        for s in family.samples:
            metric.add_sample(s.name, {**s.labels, "pool_id": pool_id}, s.value, s.timestamp, s.exemplar)
        out.append(metric)
    return out


def _untyped(name: str) -> str:
    return f"# TYPE {name} untyped"


def merge(per_pool: Iterable[list[Metric]]) -> list[Metric]:
    """One family per name across pools (an exposition may name a family once)."""
    merged: dict[str, Metric] = {}
    for families in per_pool:
        for fam in families:
            into = merged.get(fam.name)
            if into is None:
                merged[fam.name] = into = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            elif into.type != fam.type:
                continue  # two engine builds disagree on a type: keep the first, never emit a mixed family
            into.samples.extend(fam.samples)
    return list(merged.values())


class EngineScraper:
    def __init__(self, *, timeout_s: float = DEFAULT_TIMEOUT_S, max_workers: int = 8) -> None:
        self.timeout_s = timeout_s
        self._clients: dict[str, httpx.Client] = {}  # by engine socket
        self._clients_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="engine-metrics")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._clients_lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    def scrape(self, targets: Sequence[EngineTarget]) -> tuple[list[Metric], dict[str, bool]]:
        """(re-labelled families, pool_id → whether its engine answered in time)."""
        if not targets:
            return [], {}
        futures: dict[Future[list[Metric]], EngineTarget] = {self._executor.submit(self.fetch, t): t for t in targets}
        done, pending = wait(futures, timeout=self.timeout_s)
        for fut in pending:
            fut.cancel()
        up = {t.pool_id: False for t in targets}
        results: dict[str, list[Metric]] = {}
        for fut in done:
            if fut.exception() is None:
                results[futures[fut].pool_id] = fut.result()
                up[futures[fut].pool_id] = True
        return merge(results[pool_id] for pool_id in sorted(results)), up

    def submit(self, fn: Callable[[], None]) -> None:
        self._executor.submit(fn)

    def _client(self, socket_path: str) -> httpx.Client:
        """A client over one engine's unix socket, keeping no idle connection (it would hold an engine thread)."""
        with self._clients_lock:
            client = self._clients.get(socket_path)
            if client is None:
                client = self._clients[socket_path] = socket_client(socket_path, timeout_s=self.timeout_s)
            return client

    def fetch(self, target: EngineTarget) -> list[Metric]:
        resp = self._client(target.socket_path).get("http://engine/metrics", headers=target.headers)
        resp.raise_for_status()
        return relabel(resp.text, target.pool_id)


@dataclass(frozen=True)
class _Block:
    """One family of one engine, written: its # HELP / # TYPE lines and its samples."""

    header: str
    kind: str
    samples: str


def written(families: list[Metric]) -> dict[str, _Block]:
    """An engine's families in the text format, per exposed name (as generate_latest writes them)."""

    class _Fixed:
        def collect(self) -> Iterator[Metric]:
            yield from families

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Fixed())  # type: ignore[arg-type]
    blocks: dict[str, list[str]] = {}
    for line in generate_latest(reg).decode().splitlines(keepends=True):
        if line.startswith("# HELP "):
            blocks[line.split(" ", 3)[2]] = [line]
        elif blocks:
            blocks[next(reversed(blocks))].append(line)
    return {
        name: _Block("".join(lines[:2]), lines[1].split()[-1], "".join(lines[2:])) for name, lines in blocks.items()
    }


@dataclass
class _Fetched:
    up: bool
    blocks: dict[str, _Block]


Activity = Callable[[str], tuple[int, int]]  # pool_id -> (requests answered, requests in flight)


class EngineMetrics:
    """The engines' own metrics, fetched in a background thread; `text()` and `up()` serve the last answers.

    With `activity` (the data plane's request counts), a due fetch is skipped while the engine has answered no
    request since its last good fetch and has none in flight: an idle engine's numbers cannot have moved (the
    data plane is the only way to its socket), so a thousand idle pools cost no fetch at all. Such a pool is
    parked (no due time): the thread does not wake for it, but looks at every parked pool in one pass each
    `interval_s / _PARKED_PASSES` and whenever it reads the targets. A parked engine that answered a request is
    fetched within that plus `_FIRST_FETCH_SPREAD_S` (those found in one pass are spread over it), so its
    numbers are fresh within about one interval of the request, as an engine that is not parked. An idle node's
    thread wakes `_PARKED_PASSES` times an interval however many pools it has (the passes, one with the targets'
    reading), and a due fetch is found in a heap: a wake-up costs O(due), not O(pools). The targets (a read of
    the pools) are read when told (`refresh`: the traffic board calls it when a pool's gate changes; a scrape,
    when it shows a serving pool the fetcher does not know) and every `_RESYNC_S` besides."""

    def __init__(
        self,
        targets: Callable[[], list[EngineTarget]],
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        interval_s: float = DEFAULT_INTERVAL_S,
        concurrency: int = 8,
        activity: Activity | None = None,
    ) -> None:
        self.interval_s = interval_s
        self._read_targets = targets
        self._activity = activity
        self._seen: dict[str, tuple[int, int]] = {}  # pool_id -> its activity when its last good fetch began
        self._scraper = EngineScraper(timeout_s=timeout_s, max_workers=concurrency)
        self._lock = threading.Lock()
        self._targets: dict[str, EngineTarget] = {}
        self._due: dict[str, float] = {}  # pool_id -> when its next fetch starts (time.monotonic)
        self._heap: list[tuple[float, str]] = []  # (due, pool_id); an entry that is not `_due`'s is stale
        self._parked: set[str] = set()  # idle since their last good fetch: no due time, looked at in a pass
        self._inflight: set[str] = set()
        self._deferred: set[str] = set()  # came due while their fetch ran: due again when it ends
        self._fetched: dict[str, _Fetched] = {}
        self._text: str | None = ""  # the merged families; None: to be merged again
        self.version = 0  # moves whenever the fetched answers change (what a scrape compares to reuse its text)
        self._wake = threading.Event()
        self._refresh = True
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="engine-metrics", daemon=True)

    # -- what a scrape asks --------------------------------------------------------------------------
    def serving(self, endpoints: Mapping[str, str]) -> None:
        """The pools serving now and their engines' URLs, as the scrape read them: the others are forgotten at
        once; a new one (or one whose engine moved) is fetched without waiting for the next round."""
        with self._lock:
            for pool_id in [p for p in self._fetched if p not in endpoints]:
                del self._fetched[pool_id]
                self._text = None
                self.version += 1
            unknown = any(
                pool_id not in self._targets or self._targets[pool_id].base_url != url.rstrip("/")
                for pool_id, url in endpoints.items()
            )
        if unknown:
            self.refresh()

    def refresh(self) -> None:
        """Read the targets again soon (a pool began or stopped serving); calls close together read once."""
        self._refresh = True
        self._wake.set()

    def up(self) -> dict[str, bool]:
        with self._lock:
            return {pool_id: f.up for pool_id, f in self._fetched.items()}

    def text(self) -> str:
        """The `llamacpp:*` families of every engine at its last fetch, one family per name."""
        with self._lock:
            if self._text is None:
                self._text = _merge_written(self._fetched)
            return self._text

    # -- the background thread -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._scraper.close()

    def fetch_now(self) -> None:
        """Read the targets and fetch every engine once, waiting for the answers (tests; a first fill)."""
        self._sync(time.monotonic())
        with self._lock:
            targets = list(self._targets.values())
        for target in targets:
            self._fetch(target)

    def _run(self) -> None:
        next_sync = last_sync = next_pass = 0.0
        while not self._stopped:
            now = time.monotonic()
            if self._refresh:
                next_sync = min(next_sync, last_sync + _MIN_SYNC_GAP_S)
            if now >= next_sync:
                self._refresh = False
                read = self._sync(now)  # not read (the database away): again after an interval, not _RESYNC_S
                last_sync, next_sync = now, now + (max(self.interval_s, _RESYNC_S) if read else self.interval_s)
                next_pass = now
            if now >= next_pass:
                next_pass = now + self.interval_s / _PARKED_PASSES
                self._unpark(now)
            until = min(self._dispatch(now), next_sync, next_pass)
            self._wake.wait(max(0.0, until - time.monotonic()))
            self._wake.clear()

    def _sync(self, now: float) -> bool:
        """Take the current targets: forget pools that stopped serving, spread new ones over the interval. False:
        they could not be read."""
        try:
            targets = {t.pool_id: t for t in self._read_targets()}
        except Exception as exc:  # the database away: keep fetching what was known
            log.debug("engine metrics: could not read the pools: %s", exc)
            return False
        with self._lock:
            new = [pool_id for pool_id in targets if pool_id not in self._targets]
            for pool_id in [p for p, t in self._targets.items() if targets.get(p) != t]:  # gone, moved, restarted
                self._seen.pop(pool_id, None)
                self._parked.discard(pool_id)
                if self._fetched.pop(pool_id, None) is not None:
                    self._text = None
                    self.version += 1
                if pool_id in targets:
                    self._schedule(pool_id, now)
                else:
                    self._due.pop(pool_id, None)
                    self._deferred.discard(pool_id)
            self._spread(new, now)
            self._targets = targets
        return True

    def _schedule(self, pool_id: str, at: float) -> None:
        """The pool's next fetch starts at `at` (under the lock); an earlier entry in the heap goes stale."""
        self._due[pool_id] = at
        heapq.heappush(self._heap, (at, pool_id))

    def _spread(self, pool_ids: list[str], now: float) -> None:
        """Fetch these pools soon, spread over `_FIRST_FETCH_SPREAD_S` (under the lock)."""
        spread = min(self.interval_s, _FIRST_FETCH_SPREAD_S)
        for i, pool_id in enumerate(pool_ids):
            self._schedule(pool_id, now + spread * i / len(pool_ids))

    def _unpark(self, now: float) -> None:
        """One pass over the parked pools: those whose engine answered a request since are fetched soon."""
        with self._lock:
            moved = [p for p in self._parked if not self._idle_since_fetched(p)]
            self._parked.difference_update(moved)
            self._spread(moved, now)

    def _dispatch(self, now: float) -> float:
        """Start the fetches that are due, park the idle ones; when the next fetch is due. O(due), not O(pools)."""
        targets: list[EngineTarget] = []
        with self._lock:
            heap = self._heap
            while heap and heap[0][0] <= now:
                at, pool_id = heapq.heappop(heap)
                if self._due.get(pool_id) != at:
                    continue  # rescheduled, parked or forgotten since
                if pool_id in self._inflight:
                    self._deferred.add(pool_id)  # its fetch ending makes it due again
                elif self._idle_since_fetched(pool_id):
                    del self._due[pool_id]
                    self._parked.add(pool_id)
                else:
                    self._inflight.add(pool_id)
                    self._schedule(pool_id, max(at + self.interval_s, now))
                    targets.append(self._targets[pool_id])
            while heap and self._due.get(heap[0][1]) != heap[0][0]:
                heapq.heappop(heap)
            next_due = heap[0][0] if heap else now + self.interval_s  # a fetch that ends wakes the loop
        for target in targets:
            self._scraper.submit(functools.partial(self._fetch, target))
        return next_due

    def _idle_since_fetched(self, pool_id: str) -> bool:
        """Whether the pool's engine answered nothing since its last good fetch (under the lock)."""
        if self._activity is None or pool_id not in self._seen:
            return False
        now = self._activity(pool_id)
        return now[1] == 0 and now == self._seen[pool_id]

    def _fetch(self, target: EngineTarget) -> None:
        before = self._activity(target.pool_id) if self._activity is not None else (0, 0)
        try:
            fetched = _Fetched(True, written(self._scraper.fetch(target)))
        except Exception:  # refused, timed out, not the text format: down until the next fetch
            fetched = _Fetched(False, {})
        with self._lock:
            self._inflight.discard(target.pool_id)
            if target.pool_id in self._deferred:
                self._deferred.discard(target.pool_id)
                if target.pool_id in self._due:
                    heapq.heappush(self._heap, (self._due[target.pool_id], target.pool_id))
            if self._targets.get(target.pool_id) == target:
                self._fetched[target.pool_id] = fetched
                self._text = None
                self.version += 1
                if fetched.up:
                    self._seen[target.pool_id] = before
                else:
                    self._seen.pop(target.pool_id, None)
        self._wake.set()


def _merge_written(fetched: dict[str, _Fetched]) -> str:
    """One family per name across pools (an exposition may name a family once); two engine builds that
    disagree on a family's type: the first pool's type is kept, the other's samples left out."""
    merged: dict[str, tuple[_Block, list[str]]] = {}
    for pool_id in sorted(fetched):
        for name, block in fetched[pool_id].blocks.items():
            into = merged.get(name)
            if into is None:
                merged[name] = (block, [block.samples])
            elif into[0].kind == block.kind:
                into[1].append(block.samples)
    return "".join(block.header + "".join(samples) for block, samples in merged.values())


__all__ = [
    "DEFAULT_INTERVAL_S",
    "DEFAULT_TIMEOUT_S",
    "ENGINE_PREFIX",
    "EngineMetrics",
    "EngineScraper",
    "EngineTarget",
    "engine_api_keys",
    "merge",
    "relabel",
    "target_for",
    "written",
]
