"""The fields every log line about a pool carries (B-LOG-001..004). Imports nothing from poolmgr (layer 1).

Any layer logs a pool line with `extra={"pool_id": ...}`; the pool's worker keeps `remember_pool` up to date
from the registry row it reads, and `PoolFieldsFilter` (installed on the log handler) fills in `engine`,
`engine_version` and `device_mask` wherever a line names a pool but not them: one place, so an isolation or
spawn line deep in a lower layer carries the same fields as the worker's own.
"""

from __future__ import annotations

import logging
from typing import Any

BASE_FIELDS = ("pool_id", "engine", "engine_version", "device_mask")
_POOLS: dict[str, dict[str, Any]] = {}


def remember_pool(pool_id: str, *, engine: str, engine_version: str | None, device_mask: str) -> None:
    _POOLS[pool_id] = {"engine": engine, "engine_version": engine_version, "device_mask": device_mask}


def pool_fields(pool_id: str) -> dict[str, Any]:
    """pool_id, engine, engine_version (None before the first ready) and device_mask of a pool."""
    known = _POOLS.get(pool_id, {"engine": None, "engine_version": None, "device_mask": None})
    return {"pool_id": pool_id, **known}


class PoolFieldsFilter(logging.Filter):
    """Completes a record that names a pool with the pool's base fields (never overwrites given ones)."""

    def filter(self, record: logging.LogRecord) -> bool:
        pool_id = getattr(record, "pool_id", None)
        if isinstance(pool_id, str):
            for key, value in pool_fields(pool_id).items():
                if not hasattr(record, key):
                    setattr(record, key, value)
        return True


__all__ = ["BASE_FIELDS", "PoolFieldsFilter", "pool_fields", "remember_pool"]
