"""The SQLite hot path of `Registry.transition`, on the DB-API connection directly.

An audited transition is three statements and a COMMIT; SQLAlchemy Core's execution machinery costs several
times the SQL itself on SQLite (bench/store.py). This module runs the same statements through sqlite3 with
SQLAlchemy's own per-column bind and result processors, so every value is stored and read exactly as the Core
path and the ORM do (UTC datetimes, JSON, booleans). PostgreSQL keeps the Core path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Dialect, Engine

Processor = Callable[[Any], Any] | None


class SqliteStatements:
    """Column processors and SQL text for the pools and pool_events tables, prepared once per engine."""

    def __init__(self, engine: Engine, pools: Table, events: Table) -> None:
        dialect: Dialect = engine.dialect
        self.engine = engine
        self.pool_columns = [c.name for c in pools.columns]
        self._pool_bind = {c.name: c.type._cached_bind_processor(dialect) for c in pools.columns}
        self._pool_result = [c.type._cached_result_processor(dialect, None) for c in pools.columns]
        self._event_bind = {c.name: c.type._cached_bind_processor(dialect) for c in events.columns}
        self.select_pool = f"SELECT {', '.join(self.pool_columns)} FROM pools WHERE id = ?"
        self._updates: dict[tuple[str, ...], str] = {}

    def row_to_dict(self, row: tuple[Any, ...]) -> dict[str, Any]:
        return {
            name: (proc(value) if proc is not None else value)
            for name, proc, value in zip(self.pool_columns, self._pool_result, row, strict=True)
        }

    def _bind(self, procs: Mapping[str, Processor], name: str, value: Any) -> Any:
        proc = procs[name]
        return proc(value) if proc is not None else value

    def update_pool(self, values: Mapping[str, Any]) -> tuple[str, list[Any]]:
        keys = tuple(values)
        sql = self._updates.get(keys)
        if sql is None:
            sets = ", ".join(f"{k} = ?" for k in keys)
            sql = self._updates[keys] = f"UPDATE pools SET {sets} WHERE id = ? AND version = ?"
        return sql, [self._bind(self._pool_bind, k, v) for k, v in values.items()]

    def insert_event(self, values: Mapping[str, Any]) -> tuple[str, list[Any]]:
        keys = list(values)
        sql = f"INSERT INTO pool_events ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})"
        return sql, [self._bind(self._event_bind, k, v) for k, v in values.items()]


__all__ = ["SqliteStatements"]
