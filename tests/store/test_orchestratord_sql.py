"""The SQL docs/registry.md gives orchestratord ("The fleet: many nodes, one view") runs unchanged on SQLite and
PostgreSQL and answers what it says: read from the document itself, so the two cannot drift apart."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

from poolmgr.clock import FakeClock
from poolmgr.lifecycle.effects import BreakerOpened, BreakerReset, TrialStarted
from poolmgr.lifecycle.fsm import fire
from poolmgr.poolsfile import PoolSpec
from poolmgr.store import Registry
from tests.observability.test_audit_metrics import READY, _crash, _crashed, _failed, _ready
from tests.store.test_registry import _ready_pool

DOC = Path(__file__).resolve().parents[2] / "docs" / "registry.md"


def _fleet_queries() -> list[str]:
    section = DOC.read_text().split("### The fleet: many nodes, one view", 1)[1].split("\n### ", 1)[0]
    (block,) = re.findall(r"```sql\n(.*?)```", section, re.S)
    return [q.strip() for q in block.split(";") if q.strip()]


def _run(registry: Registry, sql: str, **params: Any) -> list[dict[str, Any]]:
    with registry.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(sql), params)]


def _history(registry: Registry, clock: FakeClock) -> None:
    """Two restarts after a backoff (signal, then exit), a half-open trial and an operator's reset."""
    _ready(registry, "svc")
    _crash(registry, clock, "svc", "signal", 100)
    _crash(registry, clock, "svc", "exit", 200)
    fire(registry, "svc", _crashed("health_failure"))
    fire(registry, "svc", BreakerOpened(clock.now() + timedelta(seconds=30), 30.0, "5 consecutive failed starts"))
    fire(registry, "svc", TrialStarted())
    fire(registry, "svc", _failed("vram_oom"))
    fire(registry, "svc", BreakerOpened(clock.now() + timedelta(seconds=60), 60.0, "trial failed"))
    fire(registry, "svc", BreakerReset("req-7"))
    fire(registry, "svc", READY)


def test_the_documented_fleet_queries_answer_on_both_databases(registry: Registry, clock: FakeClock) -> None:
    per_model, restarts, node_row, node_history = _fleet_queries()
    since = clock.now() - timedelta(seconds=1)
    registry.register(PoolSpec(id="idle", model="/m/a.gguf"))  # not ready: not routable
    _ready_pool(registry, "a1", slots=2)
    _ready_pool(registry, "a2", slots=3)
    registry.heartbeat_node("host", grace_ms=60_000)
    _history(registry, clock)
    rows = _run(registry, per_model)
    assert [(r["model"], r["pools"], r["free_slots"]) for r in rows] == [("/m.gguf", 3, 7)]  # a1, a2, svc (2)
    got = [(r["how"], r["why"]) for r in _run(registry, restarts, since=since)]
    assert got == [
        ("retry", "signal"), ("retry", "exit"), ("trial_start", "health_failure"), ("reset_breaker", "operator_reset"),
    ]  # fmt: skip
    assert _run(registry, node_row, node="node-a")[0]["hostname"] == "host"
    history = _run(registry, node_history, node="node-a")
    assert history[0]["pool_id"] == "svc" and history[0]["kind"] == "preload_ok"  # newest first
    assert len(history) == min(100, len(registry.events(limit=10_000)))
    assert _run(registry, restarts, since=clock.now() + timedelta(hours=1)) == []
