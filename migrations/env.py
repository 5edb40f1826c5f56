"""Alembic environment: runs migrations on the URL poolmgr passes (or POOL_MANAGERD_DATABASE_URL)."""

from __future__ import annotations

import os

from alembic import context

from poolmgr.store._db import make_engine, normalize_url
from poolmgr.store._models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from poolmgr.settings import PoolManagerConfig

    return normalize_url(os.environ.get("POOL_MANAGERD_DATABASE_URL") or PoolManagerConfig().effective_database_url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url())
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            # A batch migration rebuilds a table (copy, drop, rename): with foreign keys on, dropping `pools`
            # would cascade its leases away. The pragma only takes effect outside a transaction: on the driver.
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
