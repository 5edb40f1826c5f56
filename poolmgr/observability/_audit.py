"""Counters and histograms derived from the audit table (`pool_events`) and its rollup, read incrementally.

A metric total is the rollup of pruned rows (`audit_rollup`, store/_retention.py) plus the fold of the rows
still in `pool_events` (the fold itself: store/_tally.py, shared with the prune). The first snapshot reads both
once, in one snapshot of the database (one query for the rows), so a restarted poolmgr reports the same totals
as the one before it, before and after a prune. Later snapshots read only the rows after a cursor: an index
range (node_id, id), so a scrape costs the rows written since the last one, never the size of the table.

Rows younger than `lag_s` are not folded into the running totals but re-read on every snapshot: on PostgreSQL
ids come from a sequence at insert time, so a row can commit after a row with a higher id, and a cursor already
past it would skip it forever. SQLite has one writer at a time and gives a row the next id inside its write
transaction, so ids commit in order there: no lag (a node that just started 1,000 pools would otherwise re-read
their 4,000 rows on every scrape for a minute).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime, timedelta

from poolmgr.store import (
    BACKOFF_DELAY,
    BREAKER_OPEN,
    BUCKETS,
    CRASH,
    CRASH_REASONS,
    DRAIN,
    DRAIN_DURATION,
    DRIVER_RESET,
    KINDS,
    PRELOAD_FAILURE,
    PRELOAD_SUCCESS,
    RELOAD,
    RELOAD_DURATION,
    RESTART,
    RESTART_RATE,
    STORM,
    AuditRow,
    Histogram,
    Registry,
    Tally,
    add_rollup,
)


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
        self._window_s = window_s
        in_order = registry.engine.dialect.name == "sqlite"  # ids commit in id order: nothing to wait for
        self._lag = timedelta(seconds=0 if in_order else lag_s)
        self._batch = batch
        self._base: Tally | None = None  # None until the history is read (the first snapshot)
        self._lock = threading.Lock()

    def snapshot(self) -> Tally:
        """The totals now: an independent copy, with the rows younger than the lag folded in."""
        with self._lock:
            base, young = self._advance()
            return self._with(base.copy(), young)

    def read(self) -> Tally:
        """The totals now, for one reader that is done with them before it reads again (the collector, under its
        lock): the running totals themselves when no row is young, else a copy with the young rows added (only
        the histograms of their pools copied)."""
        with self._lock:
            base, young = self._advance()
            return self._with(base.copy({r.pool_id for r in young}), young) if young else base

    def _advance(self) -> tuple[Tally, list[AuditRow]]:
        horizon = self._registry.clock.now() - self._lag
        if self._base is None:
            self._base, young = self._load(horizon)
        else:
            young = self._read_new(self._base, horizon)
        return self._base, young

    @staticmethod
    def _with(tally: Tally, young: list[AuditRow]) -> Tally:
        for row in young:
            tally.add(row)
        return tally

    def _load(self, horizon: datetime) -> tuple[Tally, list[AuditRow]]:
        """The rollup and every row of a metric kind, in one snapshot and one query."""
        base, young = Tally(window_s=self._window_s), list[AuditRow]()
        with self._registry.audit.history(self._node_id, KINDS) as (rollup, rows):
            add_rollup(base, rollup)
            _fold_old(base, rows, horizon, young, held=False)
        return base, young

    def _read_new(self, base: Tally, horizon: datetime) -> list[AuditRow]:
        """The rows after the cursor, of every kind (so the cursor also moves past rows no metric reads)."""
        young: list[AuditRow] = []
        held, after = False, base.cursor
        while True:
            rows = self._registry.audit.rows_after(self._node_id, after, self._batch)
            held = _fold_old(base, rows, horizon, young, held=held)
            if len(rows) < self._batch:
                return young
            after = rows[-1].id


def _fold_old(base: Tally, rows: Iterable[AuditRow], horizon: datetime, young: list[AuditRow], *, held: bool) -> bool:
    """Fold rows in id order up to the first young one (`held` from then on: every row after it is re-read next
    time); the young rows of metric kinds go to `young`, to be added to a copy only. Returns `held`."""
    for row in rows:
        if not held and row.at <= horizon:
            base.add(row)
            base.cursor = row.id
        else:
            held = True
            if row.kind in KINDS:
                young.append(row)
    return held


__all__ = [
    "BACKOFF_DELAY",
    "BREAKER_OPEN",
    "BUCKETS",
    "CRASH",
    "CRASH_REASONS",
    "DRAIN",
    "DRAIN_DURATION",
    "DRIVER_RESET",
    "KINDS",
    "PRELOAD_FAILURE",
    "PRELOAD_SUCCESS",
    "RELOAD",
    "RELOAD_DURATION",
    "RESTART",
    "RESTART_RATE",
    "STORM",
    "AuditTally",
    "Histogram",
    "Tally",
]
