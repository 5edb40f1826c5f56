"""The registry store: SQLAlchemy models, migrations and registry operations (layer 4)."""

from poolmgr.store._db import current_revision, make_engine, migrate, normalize_url
from poolmgr.store._registry import Decision, EventData, Registry
from poolmgr.store._views import EventView, LeaseView, PoolView

__all__ = [
    "Decision",
    "EventData",
    "EventView",
    "LeaseView",
    "PoolView",
    "Registry",
    "current_revision",
    "make_engine",
    "migrate",
    "normalize_url",
]
