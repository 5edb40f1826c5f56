"""Engines, sessions and migrations for SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("poolmgr.store")

# The migrations ship inside the package (poolmgr/migrations: in a checkout a link to the top-level migrations/,
# in a wheel the files themselves), so `poolmgr migrate` and `serve` work from an installed wheel.
MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
ALEMBIC_INI = Path(__file__).resolve().parents[2] / "alembic.ini"  # a checkout's; not needed by poolmgr itself


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (the only Postgres driver poolmgr installs)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN; take the write lock at BEGIN instead so a
        # read-then-write transaction never fails with "database is locked" halfway.
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    # Most recently used connection first (LIFO): a node's steady work (its heartbeat) keeps reusing one hot
    # connection, and only a connection idle for longer than _PING_AFTER_IDLE_S is checked before use.
    engine = create_engine(url, pool_size=5, max_overflow=5, pool_use_lifo=True)
    event.listen(engine.pool, "checkin", _idle_since)
    event.listen(engine.pool, "checkout", _ping_if_idle)
    return engine


# SQLAlchemy's pool_pre_ping checks every connection at every checkout: on PostgreSQL an empty statement that
# counts as one more committed transaction per transaction (a fleet of 100 idle nodes: 200 commits/s instead of
# 100). A connection used within the last few seconds is taken as is: if the server went away meanwhile, its
# first statement fails as a disconnect, SQLAlchemy invalidates the pool, and poolmgr's retry (or the client, for
# an API call's 503) gets a new one.
_PING_AFTER_IDLE_S = 10.0


def _idle_since(_dbapi_conn: Any, record: Any) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
    since = record.info.get("idle_since")
    if since is not None and time.monotonic() - since < _PING_AFTER_IDLE_S:
        return
    try:
        with dbapi_conn.cursor() as cur:
            cur.execute("SELECT 1")
        dbapi_conn.rollback()  # a rollback, not a commit: the check leaves no transaction behind
    except Exception as exc:  # the server closed it: the pool drops this one and checks out another
        raise DisconnectionError(f"a pooled connection was dead: {exc}") from exc


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see make_engine)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # an audit row must survive a power cut
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def migration_module(name: str) -> Any:
    """One migration file (e.g. "0002_derived_facts") as a module, loaded by its path: a downgrade that needs an
    earlier migration's text (a view) reads it this way, since the directory is no importable package once
    installed."""
    from importlib import util

    spec = util.spec_from_file_location(f"_poolmgr_migration_{name}", MIGRATIONS_DIR / "versions" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config(str(ALEMBIC_INI) if ALEMBIC_INI.is_file() else None)
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Upgrade the database at `url` to `revision` (idempotent)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


__all__ = [
    "MIGRATIONS_DIR",
    "alembic_config",
    "current_revision",
    "make_engine",
    "make_sessionmaker",
    "migrate",
]
