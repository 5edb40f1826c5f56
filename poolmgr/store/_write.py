"""The one write path of a pool row: lock the row, let the machine decide, compare-and-swap, insert the audit
row — one transaction, on SQLite and PostgreSQL alike.

`apply_effect` holds that logic once. It talks to the database through a `WriteTx`, which only executes four
statements: `RawTx`, on the DB-API cursor (SQLite: inside `BEGIN IMMEDIATE`; PostgreSQL: `SELECT … FOR UPDATE`),
since SQLAlchemy Core's execution machinery costs several times the SQL itself (bench/store.py), with
SQLAlchemy's own per-column bind and result processors so every value is stored and read exactly as the Core
path and the ORM do.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from sqlalchemy import Table
from sqlalchemy.engine import Dialect, Engine

from poolmgr.errors import IllegalTransition, NotFoundError
from poolmgr.inflight import operation_from_json
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import DesiredState, PoolState
from poolmgr.store._effect import Effect, EventData, StateMachine
from poolmgr.store._models import Pool, PoolEvent
from poolmgr.store._views import PoolView

POOLS: Table = Pool.metadata.tables["pools"]
EVENTS: Table = PoolEvent.metadata.tables["pool_events"]
NODES: Table = Pool.metadata.tables["nodes"]
_SERVING = frozenset({PoolState.READY, PoolState.DRAINING})
_SPEC_CACHE = 4096  # distinct stored specs parsed and kept (a node's pools, each spec a few hundred bytes)
EventValues = Callable[[str, int, EventData, dict[str, Any]], dict[str, Any]]


class Beat(NamedTuple):
    """What a node's heartbeat transaction read for it."""

    expired_leases: bool
    desired_generation: int


class WriteTx(Protocol):
    """The statements of one write transaction."""

    def read_pool(self, pool_id: str) -> dict[str, Any] | None: ...  # locked; with its active_leases count
    def delete_leases(self, pool_id: str) -> None: ...
    def update_pool(
        self, pool_id: str, version: int, values: Mapping[str, Any], event: Mapping[str, Any] | None
    ) -> bool: ...  # compare-and-swap, with its audit row; False: lost (the caller rolls back)
    def insert_event(self, values: Mapping[str, Any]) -> None: ...


def apply_effect(
    tx: WriteTx,
    pool_id: str,
    effect: Effect,
    *,
    machine: StateMachine | None,
    expect: frozenset[PoolState] | None,
    now: datetime,
    event_values: EventValues,
    before: PoolView | None = None,
) -> PoolView | None:
    """Apply `effect` to the locked row; the row as it now is, or None when the compare-and-swap was lost.
    `before`: the row as this transaction just wrote it (a chained step), so it is not read again."""
    before = before if before is not None else _read_locked(tx, pool_id)
    trigger = effect.trigger
    to_state = _decide(pool_id, before.state, effect, machine, expect)
    if effect.clears_leases:
        tx.delete_leases(pool_id)
        before = replace(before, active_leases=0)
    values: dict[str, Any] = dict(effect.columns(before, now))
    if before.state in _SERVING and to_state not in _SERVING:
        # It stops serving: keep the heartbeat it had (its node's, derived while it served) in its own column.
        values.setdefault("heartbeat_at", before.heartbeat_at)
    event = effect.audit(before) or (EventData() if trigger is not None else None)
    if values or trigger is not None:
        values.update(_projected(values), state=to_state.value, version=before.version + 1, updated_at=now)
    row: dict[str, Any] | None = None
    if event is not None:
        audit = {"from_state": before.state.value, "to_state": to_state.value, "trigger": trigger and trigger.value}
        row = event_values(pool_id, int(values.get("restart_count", before.restart_count)), event, audit)
    if not values:
        if row is not None:
            tx.insert_event(row)
        return before
    if not tx.update_pool(pool_id, before.version, values, row):
        return None  # nothing kept: the caller rolls the transaction back (its audit row with it) and retries
    return _applied(before, values)


def _decide(
    pool_id: str, state: PoolState, effect: Effect, machine: StateMachine | None, expect: frozenset[PoolState] | None
) -> PoolState:
    """The state `effect` leads to from `state`; IllegalTransition when `expect` or the machine refuses it."""
    trigger = effect.trigger
    if expect is not None and state not in expect:
        raise IllegalTransition(pool_id, trigger.value if trigger else "update", state.value)
    if trigger is None:
        return state
    if machine is None:
        raise ValueError(f"{type(effect).__name__} fires {trigger.value}: a state machine must decide it")
    return machine.target(pool_id, state, trigger)


def _read_locked(tx: WriteTx, pool_id: str) -> PoolView:
    row = tx.read_pool(pool_id)
    if row is None:
        raise NotFoundError(f"pool {pool_id!r} not found")
    return PoolView.of(row)


def _projected(values: Mapping[str, Any]) -> dict[str, Any]:
    """model, engine and device_mask are columns for SQL readers only: always projected from the spec."""
    if "spec" not in values:
        return {}
    spec = values["spec"]
    return {"model": spec["model"], "engine": spec["engine"], "device_mask": spec["device_mask"]}


def _applied(view: PoolView, values: Mapping[str, Any]) -> PoolView:
    """`view` with the values just written: the row as it now is, without reading it back (PoolView.built: not
    dataclasses.replace, which re-runs __init__ over every field, a third of the write path's own CPU)."""
    changes = dict(values)
    changes["state"] = PoolState(changes["state"])
    if "desired_state" in changes:
        changes["desired_state"] = DesiredState(changes["desired_state"])
    if "spec" in changes:
        changes["spec"] = PoolSpec.from_json(changes["spec"])
    if "pending_op" in changes:
        changes["pending_op"] = operation_from_json(changes["pending_op"])
    return PoolView.built({**view.__dict__, **changes})


class RawStatements:
    """Column processors and SQL text for the pools and pool_events tables, prepared once per engine: the
    statements of the write path in the driver's own placeholder style, the values bound and read through
    SQLAlchemy's per-column processors (stored byte for byte as the Core and ORM paths store them)."""

    def __init__(self, engine: Engine) -> None:
        dialect: Dialect = engine.dialect
        self.sqlite = dialect.name == "sqlite"
        self.mark = "?" if self.sqlite else "%s"
        self.pool_columns = [c.name for c in POOLS.columns]
        self._pool_bind = {c.name: c.type._cached_bind_processor(dialect) for c in POOLS.columns}
        self._dialect = dialect
        self._pool_result: list[tuple[str, Callable[[Any], Any]]] | None = None  # from the first result's types
        self._event_bind = {c.name: c.type._cached_bind_processor(dialect) for c in EVENTS.columns}
        self._node_hb: Callable[[Any], Any] | None = None
        self._stamp_bind = NODES.c.heartbeat_at.type._cached_bind_processor(dialect)  # = leases.expires_at's
        # The spec as its stored text (PostgreSQL would parse the JSON): the same text gives the same PoolSpec,
        # parsed and checked once (`_spec`), not on every transition.
        selected = ", ".join("CAST(spec AS TEXT)" if c == "spec" else c for c in self.pool_columns)
        self._specs: dict[str, PoolSpec] = {}
        self.select_pool = (
            f"SELECT {selected}, (SELECT COUNT(*) FROM leases WHERE leases.pool_id = pools.id), "
            f"(SELECT heartbeat_at FROM nodes WHERE nodes.id = pools.node_id) FROM pools WHERE id = {self.mark}"
            + ("" if self.sqlite else " FOR UPDATE OF pools")  # SQLite: BEGIN IMMEDIATE holds the write lock
        )
        self.delete_leases = f"DELETE FROM leases WHERE pool_id = {self.mark}"
        every = self.select_pool.split(" FROM pools WHERE ", 1)[0] + " FROM pools"
        self.select_pools = every + " ORDER BY id"  # the same columns, every pool, unlocked
        self.select_node_pools = every + f" WHERE node_id = {self.mark} ORDER BY id"
        self.select_one_pool = every + f" WHERE id = {self.mark}"
        self._updates: dict[tuple[str, ...], str] = {}
        self._inserts: dict[tuple[str, ...], str] = {}

    def beat(self, cur: Any, node_id: str, now: datetime, values: Mapping[str, Any], alive_sql: str) -> Beat | None:
        """The node's heartbeat on `cur`: its row's heartbeat_at = `now`, `values`, alive_until = `alive_sql`;
        then its desired generation and whether a lease of its pools expired, in one SELECT (no RETURNING: SQLite
        before 3.35 has none). None: the node has no row yet (nothing written)."""
        m = self.mark
        sets = ", ".join(f"{k} = {m}" for k in values)
        update_sql = f"UPDATE nodes SET heartbeat_at = {m}, {sets}, alive_until = {alive_sql} WHERE id = {m}"
        read_sql = (
            "SELECT desired_generation, EXISTS (SELECT 1 FROM leases JOIN pools ON pools.id = leases.pool_id "
            f"WHERE pools.node_id = nodes.id AND leases.expires_at <= {m}) FROM nodes WHERE id = {m}"
        )
        stamp = _bound(self._stamp_bind, now)
        cur.execute(update_sql, [stamp, *values.values(), node_id])
        if cur.rowcount != 1:
            return None
        cur.execute(read_sql, [stamp, node_id])
        generation, expired = cur.fetchone()
        return Beat(bool(expired), int(generation or 0))

    def _result_processors(self, cur: Any) -> list[tuple[str, Callable[[Any], Any]]]:
        """(column, processor) for the columns that have one, as SQLAlchemy builds them: from the driver's type
        code of each result column (psycopg needs it: a float column's processor depends on it; SQLite gives
        None). Built from the first result only: psycopg builds `description` anew on every access (~40 µs)."""
        if self._pool_result is None:
            codes = [d[1] for d in cur.description]
            procs = [
                (c.name, c.type._cached_result_processor(self._dialect, code))
                for c, code in zip(POOLS.columns, codes, strict=False)
                if c.name != "spec"  # parsed once per distinct text: `_spec`
            ]
            self._node_hb = NODES.c.heartbeat_at.type._cached_result_processor(self._dialect, codes[-1])
            self._pool_result = [(name, proc) for name, proc in procs if proc is not None]  # published last
        return self._pool_result

    def row_to_dict(self, row: Sequence[Any], cur: Any) -> dict[str, Any]:
        procs = self._result_processors(cur)
        data = dict(zip(self.pool_columns, row[:-2], strict=True))
        for name, proc in procs:
            data[name] = proc(data[name])
        data["spec"] = self._spec(data["spec"])
        data["active_leases"] = row[-2]
        data["node_heartbeat_at"] = _bound(self._node_hb, row[-1])
        return data

    def _spec(self, text: str) -> PoolSpec:
        spec = self._specs.get(text)
        if spec is None:
            if len(self._specs) >= _SPEC_CACHE:
                self._specs.clear()
            spec = self._specs[text] = PoolSpec.from_json(json.loads(text))
        return spec

    def update_sql(self, keys: tuple[str, ...], event_keys: tuple[str, ...] = ()) -> str:
        """The compare-and-swap UPDATE; with `event_keys` (PostgreSQL), the audit INSERT as a data-modifying
        CTE of the same statement (a lost swap rolls the whole transaction back, the audit row with it)."""
        sql = self._updates.get((*keys, "|", *event_keys))
        if sql is None:
            sets = ", ".join(f"{k} = {self.mark}" for k in keys)
            sql = f"UPDATE pools SET {sets} WHERE id = {self.mark} AND version = {self.mark}"
            if event_keys:
                sql = f"WITH audit AS ({self.insert_sql(event_keys)}) {sql}"
            self._updates[(*keys, "|", *event_keys)] = sql
        return sql

    def insert_sql(self, keys: tuple[str, ...]) -> str:
        sql = self._inserts.get(keys)
        if sql is None:
            marks = ", ".join([self.mark] * len(keys))
            sql = self._inserts[keys] = f"INSERT INTO pool_events ({', '.join(keys)}) VALUES ({marks})"
        return sql

    def pool_params(self, values: Mapping[str, Any]) -> list[Any]:
        return [_bound(self._pool_bind[k], v) for k, v in values.items()]

    def event_params(self, values: Mapping[str, Any]) -> list[Any]:
        return [_bound(self._event_bind[k], v) for k, v in values.items()]


def _bound(proc: Callable[[Any], Any] | None, value: Any) -> Any:
    return proc(value) if proc is not None else value


class RawTx:
    """WriteTx on the DB-API cursor of one transaction (SQLite: inside BEGIN IMMEDIATE; PostgreSQL: the
    driver's own transaction, the row locked by SELECT … FOR UPDATE). SQLAlchemy Core's execution machinery
    cost several times the SQL itself (bench/store.py)."""

    def __init__(self, st: RawStatements, cur: Any) -> None:
        self.st = st
        self.cur = cur

    def read_pool(self, pool_id: str) -> dict[str, Any] | None:
        self.cur.execute(self.st.select_pool, (pool_id,))
        row = self.cur.fetchone()
        return self.st.row_to_dict(row, self.cur) if row is not None else None

    def delete_leases(self, pool_id: str) -> None:
        self.cur.execute(self.st.delete_leases, (pool_id,))

    def update_pool(
        self, pool_id: str, version: int, values: Mapping[str, Any], event: Mapping[str, Any] | None
    ) -> bool:
        cas = [*self.st.pool_params(values), pool_id, version]
        if event is not None and not self.st.sqlite:  # one statement, one round trip: the audit row rides along
            self.cur.execute(self.st.update_sql(tuple(values), tuple(event)), [*self.st.event_params(event), *cas])
            return bool(self.cur.rowcount == 1)
        self.cur.execute(self.st.update_sql(tuple(values)), cas)
        if self.cur.rowcount != 1:
            return False
        if event is not None:
            self.insert_event(event)
        return True

    def insert_event(self, values: Mapping[str, Any]) -> None:
        self.cur.execute(self.st.insert_sql(tuple(values)), self.st.event_params(values))


__all__ = [
    "POOLS",
    "Beat",
    "RawStatements",
    "RawTx",
    "WriteTx",
    "apply_effect",
]
