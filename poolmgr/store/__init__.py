"""The registry store: SQLAlchemy models, migrations and registry operations (layer 4)."""

from poolmgr.store._db import current_revision, make_engine, migrate, normalize_url
from poolmgr.store._effect import Effect, EventData, PoolColumns, StateMachine
from poolmgr.store._registry import Registry
from poolmgr.store._views import EventView, LeaseView, PoolView

__all__ = [
    "Effect",
    "EventData",
    "EventView",
    "LeaseView",
    "PoolColumns",
    "PoolView",
    "Registry",
    "StateMachine",
    "current_revision",
    "make_engine",
    "migrate",
    "normalize_url",
]
