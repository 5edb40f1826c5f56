"""The one write path of a pool row: lock the row, let the machine decide, compare-and-swap, insert the audit
row — one transaction, on SQLite and PostgreSQL alike.

`apply_effect` holds that logic once. It talks to the database through a `WriteTx`, which only executes four
statements: `CoreTx` on a SQLAlchemy connection (PostgreSQL: `SELECT … FOR UPDATE`), `SqliteTx` on the DB-API
cursor inside `BEGIN IMMEDIATE` (SQLAlchemy Core's execution machinery costs several times the SQL itself on
SQLite: bench/store.py), with SQLAlchemy's own per-column bind and result processors so every value is stored and
read exactly as the Core path and the ORM do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Table, bindparam, delete, func, insert, select
from sqlalchemy.engine import Connection, Dialect, Engine

from poolmgr.errors import IllegalTransition, NotFoundError
from poolmgr.inflight import operation_from_json
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import DesiredState, PoolState
from poolmgr.store._effect import Effect, EventData, StateMachine
from poolmgr.store._models import Lease, Pool, PoolEvent
from poolmgr.store._views import PoolView

POOLS: Table = Pool.metadata.tables["pools"]
EVENTS: Table = PoolEvent.metadata.tables["pool_events"]
LEASES: Table = Lease.metadata.tables["leases"]
NODES: Table = Pool.metadata.tables["nodes"]
LEASE_COUNT = (
    select(func.count(LEASES.c.id)).where(LEASES.c.pool_id == POOLS.c.id).scalar_subquery().label("active_leases")
)
# The node's heartbeat: a serving pool's heartbeat_at is derived from it (one write per node, not per pool).
NODE_HEARTBEAT = (
    select(NODES.c.heartbeat_at).where(NODES.c.id == POOLS.c.node_id).scalar_subquery().label("node_heartbeat_at")
)
_SERVING = frozenset({PoolState.READY, PoolState.DRAINING})
EventValues = Callable[[str, int, EventData, dict[str, Any]], dict[str, Any]]


class WriteTx(Protocol):
    """The statements of one write transaction."""

    def read_pool(self, pool_id: str) -> dict[str, Any] | None: ...  # locked; with its active_leases count
    def delete_leases(self, pool_id: str) -> None: ...
    def update_pool(self, pool_id: str, version: int, values: Mapping[str, Any]) -> bool: ...  # False: lost CAS
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
    if expect is not None and before.state not in expect:
        raise IllegalTransition(pool_id, trigger.value if trigger else "update", before.state.value)
    to_state = before.state
    if trigger is not None:
        if machine is None:
            raise ValueError(f"{type(effect).__name__} fires {trigger.value}: a state machine must decide it")
        to_state = machine.target(pool_id, before.state, trigger)
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
        if not tx.update_pool(pool_id, before.version, values):
            return None
    if event is not None:
        audit = {"from_state": before.state.value, "to_state": to_state.value, "trigger": trigger and trigger.value}
        tx.insert_event(event_values(pool_id, int(values.get("restart_count", before.restart_count)), event, audit))
    return _applied(before, values) if values else before


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
    """`view` with the values just written: the row as it now is, without reading it back."""
    changes = dict(values)
    changes["state"] = PoolState(changes["state"])
    if "desired_state" in changes:
        changes["desired_state"] = DesiredState(changes["desired_state"])
    if "spec" in changes:
        changes["spec"] = PoolSpec.from_json(changes["spec"])
    if "pending_op" in changes:
        changes["pending_op"] = operation_from_json(changes["pending_op"])
    return replace(view, **changes)


class CoreTx:
    """WriteTx on a SQLAlchemy connection (PostgreSQL; SQLite too when asked)."""

    _LOCK = (
        select(POOLS, LEASE_COUNT, NODE_HEARTBEAT).where(POOLS.c.id == bindparam("pool_id")).with_for_update(of=POOLS)
    )
    _CAS = POOLS.update().where(POOLS.c.id == bindparam("_id"), POOLS.c.version == bindparam("_version"))

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def read_pool(self, pool_id: str) -> dict[str, Any] | None:
        row = self.conn.execute(self._LOCK, {"pool_id": pool_id}).one_or_none()
        return dict(row._mapping) if row is not None else None

    def delete_leases(self, pool_id: str) -> None:
        self.conn.execute(delete(LEASES).where(LEASES.c.pool_id == pool_id))

    def update_pool(self, pool_id: str, version: int, values: Mapping[str, Any]) -> bool:
        return bool(self.conn.execute(self._CAS, {**values, "_id": pool_id, "_version": version}).rowcount == 1)

    def insert_event(self, values: Mapping[str, Any]) -> None:
        self.conn.execute(insert(EVENTS), dict(values))


class SqliteStatements:
    """Column processors and SQL text for the pools and pool_events tables, prepared once per engine."""

    def __init__(self, engine: Engine) -> None:
        dialect: Dialect = engine.dialect
        self.pool_columns = [c.name for c in POOLS.columns]
        self._pool_bind = {c.name: c.type._cached_bind_processor(dialect) for c in POOLS.columns}
        self._pool_result = [c.type._cached_result_processor(dialect, None) for c in POOLS.columns]
        self._event_bind = {c.name: c.type._cached_bind_processor(dialect) for c in EVENTS.columns}
        self._node_hb = NODES.c.heartbeat_at.type._cached_result_processor(dialect, None)
        self.select_pool = (
            f"SELECT {', '.join(self.pool_columns)}, (SELECT COUNT(*) FROM leases WHERE leases.pool_id = pools.id), "
            "(SELECT heartbeat_at FROM nodes WHERE nodes.id = pools.node_id) FROM pools WHERE id = ?"
        )
        self._updates: dict[tuple[str, ...], str] = {}

    def row_to_dict(self, row: tuple[Any, ...]) -> dict[str, Any]:
        data = {
            name: (proc(value) if proc is not None else value)
            for name, proc, value in zip(self.pool_columns, self._pool_result, row[:-2], strict=True)
        }
        data["active_leases"] = row[-2]
        data["node_heartbeat_at"] = _bound(self._node_hb, row[-1])
        return data

    def update_sql(self, keys: tuple[str, ...]) -> str:
        sql = self._updates.get(keys)
        if sql is None:
            sets = ", ".join(f"{k} = ?" for k in keys)
            sql = self._updates[keys] = f"UPDATE pools SET {sets} WHERE id = ? AND version = ?"
        return sql

    def pool_params(self, values: Mapping[str, Any]) -> list[Any]:
        return [_bound(self._pool_bind[k], v) for k, v in values.items()]

    def event_params(self, values: Mapping[str, Any]) -> list[Any]:
        return [_bound(self._event_bind[k], v) for k, v in values.items()]


def _bound(proc: Callable[[Any], Any] | None, value: Any) -> Any:
    return proc(value) if proc is not None else value


class SqliteTx:
    """WriteTx on the DB-API cursor of a SQLite connection inside BEGIN IMMEDIATE."""

    def __init__(self, st: SqliteStatements, cur: Any) -> None:
        self.st = st
        self.cur = cur

    def read_pool(self, pool_id: str) -> dict[str, Any] | None:
        row = self.cur.execute(self.st.select_pool, (pool_id,)).fetchone()
        return self.st.row_to_dict(row) if row is not None else None

    def delete_leases(self, pool_id: str) -> None:
        self.cur.execute("DELETE FROM leases WHERE pool_id = ?", (pool_id,))

    def update_pool(self, pool_id: str, version: int, values: Mapping[str, Any]) -> bool:
        sql = self.st.update_sql(tuple(values))
        return bool(self.cur.execute(sql, [*self.st.pool_params(values), pool_id, version]).rowcount == 1)

    def insert_event(self, values: Mapping[str, Any]) -> None:
        keys = list(values)
        sql = f"INSERT INTO pool_events ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})"
        self.cur.execute(sql, self.st.event_params(values))


__all__ = [
    "LEASE_COUNT",
    "NODE_HEARTBEAT",
    "POOLS",
    "CoreTx",
    "SqliteStatements",
    "SqliteTx",
    "WriteTx",
    "apply_effect",
]
