"""Scraping each serving engine's own /metrics (llamacpp:*) and re-labelling it with the pool's id.

Engines are asked concurrently, with one short deadline for all of them: a stuck engine (stopped, wedged,
trickling bytes) costs the scrape at most that deadline and shows as `pool_engine_metrics_up 0`, never a
stalled /metrics. Only `llamacpp:` families are passed on, so an engine cannot shadow poolmgr's own names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from poolmgr.poolsfile import PoolSpec

ENGINE_PREFIX = "llamacpp:"
DEFAULT_TIMEOUT_S = 1.0
# OpenMetrics counters end in _total; llama.cpp types a few gauges as counters (llamacpp:n_tokens_max). The
# parser would rename those samples to `<name>_total`: we keep the engine's name and call the type unknown.
_COUNTER_TYPE_RE = re.compile(r"^# TYPE (\S+) counter\s*$", re.MULTILINE)


@dataclass(frozen=True)
class EngineTarget:
    pool_id: str
    base_url: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)


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


def target_for(pool_id: str, base_url: str, spec: PoolSpec) -> EngineTarget:
    keys = engine_api_keys(spec)
    return EngineTarget(pool_id, base_url.rstrip("/"), {"Authorization": f"Bearer {keys[0]}"} if keys else {})


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
        self._client = httpx.Client(trust_env=False, timeout=httpx.Timeout(timeout_s), follow_redirects=False)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="engine-metrics")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def scrape(self, targets: Sequence[EngineTarget]) -> tuple[list[Metric], dict[str, bool]]:
        """(re-labelled families, pool_id → whether its engine answered in time)."""
        if not targets:
            return [], {}
        futures: dict[Future[list[Metric]], EngineTarget] = {self._executor.submit(self._fetch, t): t for t in targets}
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

    def _fetch(self, target: EngineTarget) -> list[Metric]:
        resp = self._client.get(f"{target.base_url}/metrics", headers=target.headers)
        resp.raise_for_status()
        return relabel(resp.text, target.pool_id)


__all__ = ["ENGINE_PREFIX", "EngineScraper", "EngineTarget", "engine_api_keys", "merge", "relabel", "target_for"]
