"""Shared fixtures: a migrated database on SQLite and on PostgreSQL, a fake clock, a registry."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from poolmgr.clock import FakeClock
from poolmgr.store import Registry, migrate

PG_URL = os.environ.get("POOLMGR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
# In CI the Postgres suite must run: an unreachable server is a failure there, not a skip.
PG_REQUIRED = os.environ.get("POOLMGR_TEST_POSTGRES", "") == "required"


def _pg_reachable() -> str | None:
    import psycopg

    try:
        with psycopg.connect(PG_URL.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=3):
            return None
    except Exception as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


_PG_STATE: dict[str, str | None] = {}


def pg_schema_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    import psycopg

    if "why" not in _PG_STATE:
        _PG_STATE["why"] = _pg_reachable()
    why = _PG_STATE["why"]
    if why is not None:
        if PG_REQUIRED:
            pytest.fail(f"PostgreSQL at {PG_URL} is required (POOLMGR_TEST_POSTGRES=required) but: {why}")
        pytest.skip(f"no PostgreSQL reachable at {PG_URL}: {why}")
    schema = "t_" + uuid.uuid4().hex[:12]
    base = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "poolmgr.db"
    migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def _pg_migrated() -> Iterator[str]:
    gen = pg_schema_url()
    url = next(gen)
    migrate(url)
    yield url
    gen.close()


def _truncate_pg(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE pool_events, audit_rollup, leases, pools, nodes, devices RESTART IDENTITY CASCADE")


@pytest.fixture
def sqlite_url(tmp_path: Path, _sqlite_template: Path) -> str:
    """A migrated, empty SQLite file (copied from a template migrated once per session)."""
    path = tmp_path / "poolmgr.db"
    shutil.copyfile(_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database: a SQLite file, or a PostgreSQL schema emptied before the test."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_url")
        return
    url: str = request.getfixturevalue("_pg_migrated")
    _truncate_pg(url)
    yield url


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(db_url: str, clock: FakeClock) -> Iterator[Registry]:
    reg = Registry(db_url, node_id="node-a", clock=clock)
    yield reg
    reg.close()
