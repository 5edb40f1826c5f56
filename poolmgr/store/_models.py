"""SQLAlchemy models of the registry. The Alembic migrations in migrations/ are the schema's source of truth;
these models must match them (a test compares them)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from poolmgr.states import ALL_STATES, DesiredState

STATE_CHECK = "state IN (" + ", ".join(f"'{s.value}'" for s in ALL_STATES) + ")"
DESIRED_CHECK = "desired_state IN (" + ", ".join(f"'{d.value}'" for d in DesiredState) + ")"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive text otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime stored: poolmgr stores UTC-aware datetimes only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    version: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # 0005: the database's clock + the node's grace at its last heartbeat (pool_registry.node_alive reads it)
    alive_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    grace_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    desired_generation: Mapped[int] = mapped_column(Integer, server_default="0", default=0)


class Pool(Base):
    """One pool. What can be derived is not stored: ready / draining / live follow `state`, active_leases and
    slots_free are counted from `leases` (the pool_registry view and PoolView compute them)."""

    __tablename__ = "pools"
    __table_args__ = (
        CheckConstraint(STATE_CHECK, name="ck_pools_state"),
        CheckConstraint(DESIRED_CHECK, name="ck_pools_desired_state"),
    )

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(255), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    engine: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(Text)
    device_mask: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(32))
    desired_state: Mapped[str] = mapped_column(String(16), default=DesiredState.RUNNING.value)
    last_error: Mapped[str | None] = mapped_column(Text)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    engine_version: Mapped[str | None] = mapped_column(String(128))
    slots_total: Mapped[int] = mapped_column(Integer, default=0)
    restart_count: Mapped[int] = mapped_column(Integer, default=0)
    endpoint_url: Mapped[str | None] = mapped_column(Text)
    pid: Mapped[int | None] = mapped_column(Integer)
    pid_start_time: Mapped[int | None] = mapped_column(BigInteger)
    spawn_intent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ready_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    backoff_step: Mapped[int] = mapped_column(Integer, default=0)
    next_restart_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    breaker_timeout_s: Mapped[float] = mapped_column(Float, default=0.0)
    breaker_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    breaker_trial: Mapped[bool] = mapped_column(Boolean, default=False)
    vram_total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    vram_free_bytes: Mapped[int | None] = mapped_column(BigInteger)
    compute_capability: Mapped[str | None] = mapped_column(String(16))
    split_plan: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    pending_op: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    drain_deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    version: Mapped[int] = mapped_column(Integer, default=1)
    # 0005: bumped when an operator changes the pool's spec or desired state (apply, PUT, DELETE, pool rm)
    generation: Mapped[int] = mapped_column(Integer, server_default="1", default=1)
    source: Mapped[str] = mapped_column(String(16), server_default="file", default="file")  # "file" | "api"
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)  # drains, stops, then goes
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PoolEvent(Base):
    """Append-only audit of every state change and notable event. No FK: events outlive a deregistered pool."""

    __tablename__ = "pool_events"
    __table_args__ = (
        Index("ix_pool_events_pool_at", "pool_id", "at"),
        Index("ix_pool_events_node_id", "node_id", "id"),  # /metrics after a cursor; retention, oldest first
        Index("ix_pool_events_pool_trigger_at", "pool_id", "trigger", "at"),
        Index("ix_pool_events_kind_at", "kind", "at"),
        Index("ix_pool_events_correlation_id", "correlation_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pool_id: Mapped[str] = mapped_column(String(255))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(64))
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str | None] = mapped_column(String(32))
    trigger: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    restart_count: Mapped[int] = mapped_column(Integer, default=0)
    backoff_ms: Mapped[int | None] = mapped_column(Integer)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    signal: Mapped[int | None] = mapped_column(Integer)
    correlation_id: Mapped[str | None] = mapped_column(String(128))
    node_id: Mapped[str | None] = mapped_column(String(255))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class AuditRollup(Base):
    """Per node, the metric totals folded from audit rows that retention deleted (store/_tally.py): one row per
    counter series (`value`), per histogram (`value` its sum, `data` its bucket counts) and per piece of a
    pool's context (`data`). `labels` is the JSON list of the series' labels after pool_id."""

    __tablename__ = "audit_rollup"

    node_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    pool_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    labels: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    data: Mapped[Any] = mapped_column(JSON, nullable=True)


class Lease(Base):
    __tablename__ = "leases"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    pool_id: Mapped[str] = mapped_column(ForeignKey("pools.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Device(Base):
    __tablename__ = "devices"

    node_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    uuid: Mapped[str] = mapped_column(String(128), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(255))
    pci_bus_id: Mapped[str] = mapped_column(String(64))
    compute_capability: Mapped[str] = mapped_column(String(16))
    vram_total_bytes: Mapped[int] = mapped_column(BigInteger)
    vram_free_bytes: Mapped[int] = mapped_column(BigInteger)
    is_mig: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


__all__ = ["AuditRollup", "Base", "Device", "Lease", "Node", "Pool", "PoolEvent"]
