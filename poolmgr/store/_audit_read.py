"""What /metrics reads from the database, each in one cheap query: the audit history folded once at start
(the rollup of pruned rows and the remaining rows, in one snapshot), the audit rows after a cursor (an index
range: ix_pool_events_node_id), and the few columns of this node's pools that the gauges show.

On SQLite these run on the DB-API connection as plain reads: SQLAlchemy's transactions there begin with
BEGIN IMMEDIATE (store/_db.py), which would take the write lock for the length of a read.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import Table, bindparam, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.sql import Select

from poolmgr.store._models import AuditRollup, Lease, Pool, PoolEvent
from poolmgr.store._tally import AuditRow

EVENTS: Table = PoolEvent.metadata.tables["pool_events"]
POOLS: Table = Pool.metadata.tables["pools"]
LEASES: Table = Lease.metadata.tables["leases"]
ROLLUP: Table = AuditRollup.metadata.tables["audit_rollup"]
ROW_COLUMNS = (
    EVENTS.c.id, EVENTS.c.pool_id, EVENTS.c.at, EVENTS.c.kind, EVENTS.c.from_state, EVENTS.c.reason,
    EVENTS.c.backoff_ms, EVENTS.c.detail,
)  # fmt: skip
ROLLUP_COLUMNS = (ROLLUP.c.pool_id, ROLLUP.c.name, ROLLUP.c.labels, ROLLUP.c.value, ROLLUP.c.data)
RollupRow = tuple[str, str, str, float, Any]
History = tuple[list[RollupRow], Iterator[AuditRow]]  # the rollup rows, the audit rows (oldest first)


class PoolGauge(NamedTuple):
    """The columns of a pool that /metrics shows (PoolView has them all, at several times the cost)."""

    id: str
    engine: str
    engine_version: str | None
    device_mask: str
    state: str
    desired_state: str
    slots_total: int
    breaker_trial: bool  # 0 / 1 as SQLite stores it: read it as a truth value
    endpoint_url: str | None
    active_leases: int

    @property
    def slots_free(self) -> int:
        return max(0, self.slots_total - self.active_leases) if self.state == "ready" else 0


def _gauges_query(by_node: bool) -> Select[Any]:
    names = ("id", "engine", "engine_version", "device_mask", "state", "desired_state", "slots_total",
             "breaker_trial", "endpoint_url")  # fmt: skip
    leases = select(func.count(LEASES.c.id)).where(LEASES.c.pool_id == POOLS.c.id).scalar_subquery()
    q = select(*(POOLS.c[n] for n in names), leases).order_by(POOLS.c.id)
    return q.where(POOLS.c.node_id == bindparam("node", None)) if by_node else q


def _rows_query(by_node: bool, *, kinds: Collection[str] | None = None, limited: bool = False) -> Select[Any]:
    q = select(*ROW_COLUMNS).where(EVENTS.c.id > bindparam("after", 0)).order_by(EVENTS.c.id)
    if by_node:
        q = q.where(EVENTS.c.node_id == bindparam("node", None))
    if kinds is not None:
        q = q.where(EVENTS.c.kind.in_(sorted(kinds)))
    return q.limit(bindparam("limit", 5000)) if limited else q


def _rollup_query(by_node: bool) -> Select[Any]:
    q = select(*ROLLUP_COLUMNS)
    return q.where(ROLLUP.c.node_id == bindparam("node", None)) if by_node else q


def _ids_query(by_node: bool) -> Select[Any]:
    q = select(EVENTS.c.id).where(EVENTS.c.id > bindparam("after", 0)).order_by(EVENTS.c.id)
    return q.where(EVENTS.c.node_id == bindparam("node", None)) if by_node else q


def _rows_in_query(by_node: bool) -> Select[Any]:
    q = select(*ROW_COLUMNS).where(EVENTS.c.id.in_(bindparam("ids", expanding=True))).order_by(EVENTS.c.id)
    return q.where(EVENTS.c.node_id == bindparam("node", None)) if by_node else q


# The statements of every scrape, built once (SQLite: compiled once per engine, see AuditReader._run).
_GAUGES = {by_node: _gauges_query(by_node) for by_node in (True, False)}
_AFTER = {by_node: _rows_query(by_node, limited=True) for by_node in (True, False)}
_IDS = {by_node: _ids_query(by_node) for by_node in (True, False)}
_IN = {by_node: _rows_in_query(by_node) for by_node in (True, False)}
_EXPANDING = frozenset(id(q) for q in _IN.values())
_EVERY_SCRAPE = frozenset(id(q) for q in (*_GAUGES.values(), *_AFTER.values(), *_IDS.values()))


class AuditReader:
    """The reads of /metrics on one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        dialect = engine.dialect
        self._at = EVENTS.c.at.type._cached_result_processor(dialect, None)
        self._json = EVENTS.c.detail.type._cached_result_processor(dialect, None)
        self._compiled: dict[int, tuple[str, tuple[str, ...], dict[str, Any]]] = {}

    def pool_gauges(self, node_id: str | None) -> list[PoolGauge]:
        """This node's pools (all pools for None), sorted by id."""
        make = PoolGauge._make
        return [make(r) for r in self._select(_GAUGES[node_id is not None], {"node": node_id})]

    def rows_after(self, node_id: str | None, after_id: int, limit: int) -> list[AuditRow]:
        """Audit rows of every kind after an id, oldest first (an index range: node_id, id)."""
        params = {"node": node_id, "after": after_id, "limit": limit}
        return [self._row(r) for r in self._select(_AFTER[node_id is not None], params)]

    def ids_after(self, node_id: str | None, after_id: int) -> list[int]:
        """The ids of the audit rows after an id (an index-only range: node_id, id)."""
        return [r[0] for r in self._select(_IDS[node_id is not None], {"node": node_id, "after": after_id})]

    def rows_in(self, node_id: str | None, ids: Collection[int]) -> list[AuditRow]:
        """The audit rows of these ids, oldest first."""
        if not ids:
            return []
        return [self._row(r) for r in self._select(_IN[node_id is not None], {"node": node_id, "ids": list(ids)})]

    @contextmanager
    def history(self, node_id: str | None, kinds: Collection[str]) -> Iterator[History]:
        """The rollup of pruned rows and the audit rows of `kinds` (oldest first), read in one snapshot: a
        prune committing meanwhile is either wholly seen (rows gone, rollup grown) or not at all."""
        by_node, params = node_id is not None, {"node": node_id, "after": 0}
        rows_q = _rows_query(by_node, kinds=kinds)
        if self.sqlite:
            with self._sqlite_snapshot() as run:
                rollup = [self._rollup_row(r) for r in run(_rollup_query(by_node), params)]
                yield rollup, (self._row(r) for r in run(rows_q, params))
            return
        with self.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
            rollup = [tuple(r) for r in conn.execute(_rollup_query(by_node), params)]
            streamed = conn.execution_options(stream_results=True, yield_per=5000)
            yield rollup, (AuditRow(*r) for r in streamed.execute(rows_q, params))  # type: ignore[misc]

    # -- plumbing ------------------------------------------------------------------------------------
    def _row(self, r: Any) -> AuditRow:
        if not self.sqlite:
            return AuditRow(*r)
        detail = self._json(r[7]) if r[7] is not None and self._json is not None else r[7]
        at = cast(datetime, self._at(r[2]) if self._at is not None else r[2])
        return AuditRow(r[0], r[1], at, r[3], r[4], r[5], r[6], detail)

    def _rollup_row(self, r: Any) -> RollupRow:
        data = self._json(r[4]) if r[4] is not None and self._json is not None else r[4]
        return (r[0], r[1], r[2], float(r[3]), data)

    def _select(self, q: Select[Any], params: dict[str, Any]) -> list[Any]:
        if not self.sqlite:
            with self.engine.connect() as conn:
                return list(conn.execute(q, params).all())
        with self._sqlite_snapshot() as run:
            return list(run(q, params).fetchall())

    def _sql(self, q: Select[Any]) -> tuple[str, tuple[str, ...], dict[str, Any]]:
        """SQLite: the SQL of a statement, the order of its parameters and the values bound in it (an IN
        list's); the statements of every scrape are compiled once."""
        found = self._compiled.get(id(q))
        if found is None:
            compiled = q.compile(dialect=self.engine.dialect, compile_kwargs={"render_postcompile": True})
            found = (str(compiled), tuple(compiled.positiontup or ()), dict(compiled.construct_params()))
            if id(q) in _EVERY_SCRAPE:
                self._compiled[id(q)] = found
        return found

    @contextmanager
    def _sqlite_snapshot(self) -> Iterator[Any]:
        """A deferred (read) transaction on the DB-API connection; `run(select, params)` executes in it."""
        raw = self.engine.raw_connection()
        cur = raw.cursor()

        def run(q: Select[Any], params: dict[str, Any]) -> Any:
            if id(q) in _EXPANDING:  # an IN list: its `?`s depend on the values
                state = q.compile(dialect=self.engine.dialect).construct_expanded_state(params)
                return cur.execute(state.statement, state.positional_parameters)
            sql, names, bound = self._sql(q)
            return cur.execute(sql, [params[n] if n in params else bound[n] for n in names])

        try:
            cur.execute("BEGIN")
            yield run
        except sqlite3.Error as exc:  # what the callers (and the retry wrappers) expect of a database error
            raise OperationalError("audit read", None, exc) from exc
        finally:
            if cur.connection.in_transaction:
                cur.execute("COMMIT")
            raw.close()


__all__ = ["AuditReader", "PoolGauge", "RollupRow"]
