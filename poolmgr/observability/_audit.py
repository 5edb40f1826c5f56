"""Counters and histograms derived from the audit table (`pool_events`) and its rollup, read incrementally.

A metric total is the rollup of pruned rows (`audit_rollup`, store/_retention.py) plus the fold of the rows
still in `pool_events` (the fold itself: store/_tally.py, shared with the prune). The first snapshot reads both
once, in one snapshot of the database (one query for the rows), so a restarted poolmgr reports the same totals
as the one before it, before and after a prune. Later snapshots read only the rows after a cursor: an index
range (node_id, id), so a scrape costs the rows written since the last one, never the size of the table.

Every row is folded once, when it is first read. On PostgreSQL ids come from a sequence at insert time, so a
row can commit after a row with a higher id, and a cursor already past it would skip it: so the cursor only moves
past rows older than `lag_s`, and the ids folded above it (the young ones, kept in memory) are told apart from
late ones by one index-only read of the ids after the cursor; only rows not yet folded are read in full. A
scrape costs the rows written since the last one (plus the young ids), whatever the audit's size. SQLite has
one writer at a time and gives a row the next id inside its write transaction, so ids commit in order there: no
lag. Folding out of id order is safe: the fold's order only matters within one pool (a crash before the restart
it explains), and one pool's rows are written under its row lock, their ids taken inside it, so they commit in
id order.
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
        self._young: dict[int, datetime] = {}  # id -> at: rows folded above the cursor, younger than the lag
        self._lock = threading.Lock()

    def snapshot(self) -> Tally:
        """The totals now: an independent copy."""
        with self._lock:
            return self._advance().copy()

    def read(self) -> Tally:
        """The totals now, for one reader that is done with them before it reads again (the collector, under its
        lock): the running totals themselves."""
        with self._lock:
            return self._advance()

    def _advance(self) -> Tally:
        horizon = self._registry.clock.now() - self._lag
        if self._base is None:
            self._base = self._load(horizon)
        else:
            self._read_new(self._base, horizon)
        return self._base

    def _load(self, horizon: datetime) -> Tally:
        """The rollup and every row of a metric kind, in one snapshot and one query."""
        base = Tally(window_s=self._window_s)
        with self._registry.audit.history(self._node_id, KINDS) as (rollup, rows):
            add_rollup(base, rollup)
            self._fold(base, rows, horizon)
        return base

    def _read_new(self, base: Tally, horizon: datetime) -> None:
        """The rows after the cursor, of every kind (so the cursor also moves past rows no metric reads); with
        young rows held, only the ids are read first, then the rows not folded yet."""
        audit = self._registry.audit
        if self._young:
            ids = audit.ids_after(self._node_id, base.cursor)
            new = [i for i in ids if i not in self._young]
            for start in range(0, len(new), self._batch):
                self._fold(base, audit.rows_in(self._node_id, new[start : start + self._batch]), horizon)
            self._settle(base, horizon)
            return
        after = base.cursor
        while True:
            rows = audit.rows_after(self._node_id, after, self._batch)
            self._fold(base, rows, horizon)
            if len(rows) < self._batch:
                return
            after = rows[-1].id

    def _fold(self, base: Tally, rows: Iterable[AuditRow], horizon: datetime) -> None:
        """Fold every row; then move the cursor past the rows, in id order, that are older than the lag (a row
        younger than it keeps the cursor before it: its id is held, and a late lower id can still appear)."""
        young, in_order = self._young, not self._lag
        for row in rows:
            base.add(row)
            if in_order or (not young and row.at <= horizon):  # (rows come in id order: SQLite; the steady case)
                base.cursor = max(base.cursor, row.id)
            else:
                young[row.id] = row.at
        self._settle(base, horizon)

    def _settle(self, base: Tally, horizon: datetime) -> None:
        """Move the cursor past the held ids, in id order, that are older than the lag now."""
        young = self._young
        for row_id in sorted(young) if young else ():
            if young[row_id] > horizon:
                break
            base.cursor = max(base.cursor, row_id)
            del young[row_id]


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
