"""The registry store: SQLAlchemy models, migrations and registry operations (layer 4)."""

from poolmgr.store._audit_read import PoolGauge, RollupRow
from poolmgr.store._db import current_revision, make_engine, migrate, normalize_url
from poolmgr.store._effect import Effect, EventData, PoolColumns, StateMachine
from poolmgr.store._registry import Registry
from poolmgr.store._tally import (
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
    Tally,
    add_rollup,
)
from poolmgr.store._views import EventView, LeaseView, PoolView
from poolmgr.store._write import Beat

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
    "AuditRow",
    "Beat",
    "Effect",
    "EventData",
    "EventView",
    "Histogram",
    "LeaseView",
    "PoolColumns",
    "PoolGauge",
    "PoolView",
    "Registry",
    "RollupRow",
    "StateMachine",
    "Tally",
    "add_rollup",
    "current_revision",
    "make_engine",
    "migrate",
    "normalize_url",
]
