"""Audit retention: rows older than the retention are deleted in small batches, each folded into
`audit_rollup` in the same transaction as its delete (store/_tally.py), so a metric total (rollup + remaining
rows) is the same before and after, and a prune that dies halfway loses nothing: every committed batch is both
rolled up and deleted, the others neither.

Only this node's rows are pruned, oldest first (by id: the order the metrics fold in). A batch stops at the
first row that is not old enough, so one row written with an earlier clock after a later one waits for the
next prune rather than being folded out of order.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, tuple_, update
from sqlalchemy.engine import Connection, Engine

from poolmgr.store._audit_read import EVENTS, ROLLUP, ROLLUP_COLUMNS, ROW_COLUMNS
from poolmgr.store._tally import KINDS, AuditRow, RollupKey, RollupValue, Tally, add_rollup, rollup_rows

DEFAULT_BATCH = 1000


def prune_audit(
    engine: Engine,
    node_id: str,
    older_than: datetime,
    *,
    batch: int = DEFAULT_BATCH,
    max_rows: int | None = None,
    window_s: float = 60.0,
) -> int:
    """Delete this node's audit rows older than `older_than`, `batch` rows per transaction, at most `max_rows`
    in this call (None: all). `window_s` is the storm window the metrics fold restart rates with. Returns the
    number of rows deleted."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    pruned, after = 0, 0
    while max_rows is None or pruned < max_rows:
        limit = batch if max_rows is None else min(batch, max_rows - pruned)
        with engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE (store/_db.py)
            deleted, after, more = _prune_batch(conn, node_id, older_than, after, limit, window_s)
        pruned += deleted
        if not more:
            break
    return pruned


def _prune_batch(
    conn: Connection, node_id: str, older_than: datetime, after: int, limit: int, window_s: float
) -> tuple[int, int, bool]:
    """One transaction: (rows deleted, the last id deleted, whether more may be old enough)."""
    q = select(*ROW_COLUMNS).where(EVENTS.c.node_id == node_id, EVENTS.c.id > after).order_by(EVENTS.c.id)
    rows = [AuditRow(*r) for r in conn.execute(q.limit(limit))]
    old = rows
    for i, row in enumerate(rows):
        if row.at >= older_than:
            old = rows[:i]
            break
    if not old:
        return 0, after, False
    _fold_into_rollup(conn, node_id, [r for r in old if r.kind in KINDS], window_s)
    conn.execute(delete(EVENTS).where(EVENTS.c.id.in_([r.id for r in old])))
    return len(old), old[-1].id, len(old) == len(rows) == limit


def _fold_into_rollup(conn: Connection, node_id: str, rows: list[AuditRow], window_s: float) -> None:
    pools = sorted({r.pool_id for r in rows})
    if not pools:
        return
    found = select(*ROLLUP_COLUMNS).where(ROLLUP.c.node_id == node_id, ROLLUP.c.pool_id.in_(pools))
    if conn.dialect.name != "sqlite":
        found = found.with_for_update()  # one pruner at a time per node's rows (SQLite: the write lock)
    tally = Tally(window_s=window_s)
    add_rollup(tally, (tuple(r) for r in conn.execute(found)))  # type: ignore[misc]
    before = rollup_rows(tally)
    for row in rows:
        tally.add(row)
    _write_changes(conn, node_id, before, rollup_rows(tally))


def _write_changes(
    conn: Connection, node_id: str, before: dict[RollupKey, RollupValue], after: dict[RollupKey, RollupValue]
) -> None:
    def values(key: RollupKey, value: RollupValue) -> dict[str, Any]:
        return {"node_id": node_id, "pool_id": key[0], "name": key[1], "labels": key[2], "value": value[0],
                "data": value[1]}  # fmt: skip

    added = [values(k, v) for k, v in after.items() if k not in before]
    changed = [values(k, v) for k, v in after.items() if k in before and before[k] != v]
    gone = [k for k in before if k not in after]
    if added:
        conn.execute(insert(ROLLUP), added)
    if changed:
        conn.execute(_UPDATE, [{f"k_{k}": v for k, v in row.items()} for row in changed])
    if gone:
        keys = tuple_(ROLLUP.c.pool_id, ROLLUP.c.name, ROLLUP.c.labels)
        conn.execute(delete(ROLLUP).where(ROLLUP.c.node_id == node_id, keys.in_(gone)))


_UPDATE = (
    update(ROLLUP)
    .where(*(ROLLUP.c[k] == bindparam(f"k_{k}") for k in ("node_id", "pool_id", "name", "labels")))
    .values(value=bindparam("k_value"), data=bindparam("k_data"))
)


__all__ = ["DEFAULT_BATCH", "prune_audit"]
