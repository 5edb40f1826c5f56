"""Plain snapshots of registry rows: what the rest of poolmgr reads (never live ORM objects)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from poolmgr.inflight import Operation, operation_from_json, public_json
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import ENGINE_STATES, DesiredState, PoolState
from poolmgr.store._models import Lease, PoolEvent

_PARSED = frozenset({"spec", "state", "desired_state", "pending_op"})
_SERVING = frozenset({PoolState.READY, PoolState.DRAINING})


@dataclass(frozen=True)
class PoolView:
    id: str
    node_id: str
    spec: PoolSpec
    state: PoolState
    desired_state: DesiredState
    last_error: str | None
    heartbeat_at: datetime | None
    engine: str
    engine_version: str | None
    model: str
    device_mask: str
    slots_total: int
    active_leases: int  # counted from the leases table at read time
    restart_count: int
    endpoint_url: str | None
    pid: int | None
    pid_start_time: int | None
    spawn_intent_at: datetime | None
    ready_since: datetime | None
    backoff_step: int
    next_restart_at: datetime | None
    consecutive_failures: int
    breaker_timeout_s: float
    breaker_until: datetime | None
    breaker_trial: bool
    vram_total_bytes: int | None
    vram_free_bytes: int | None
    compute_capability: str | None
    split_plan: dict[str, Any] | None
    pending_op: Operation | None
    drain_deadline_at: datetime | None
    version: int
    created_at: datetime
    updated_at: datetime
    generation: int = 1  # bumped by an operator's change of the spec or the desired state
    source: str = "file"  # "file" (pools file / apply) | "api" (PUT /pools/{id})
    removed_at: datetime | None = None  # being removed: drains, stops, then the row goes

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> PoolView:
        """From a pools row (column name → value) plus its `active_leases` count and, where read, its node's
        `node_heartbeat_at`."""
        data = {k: row[k] for k in cls.__dataclass_fields__ if k not in _PARSED}
        state = PoolState(row["state"])
        node_hb = row.get("node_heartbeat_at")
        if (
            state in _SERVING
            and node_hb is not None
            and (data["heartbeat_at"] is None or node_hb > data["heartbeat_at"])
        ):
            data["heartbeat_at"] = node_hb  # serving: the node's heartbeat (docs/registry.md), not a per-pool write
        data["spec"] = row["spec"] if isinstance(row["spec"], PoolSpec) else PoolSpec.from_json(row["spec"])
        data["state"] = state
        data["desired_state"] = DesiredState(row["desired_state"])
        data["pending_op"] = operation_from_json(row["pending_op"])
        return cls.built(data)

    @classmethod
    def built(cls, fields: dict[str, Any]) -> PoolView:
        """A view of exactly these fields (every one, already of its type), made without __init__: a frozen
        dataclass's __init__ sets each of its 40 fields through object.__setattr__ (the write path makes one
        per transition: bench/store.py)."""
        if fields.keys() != _FIELDS:
            raise TypeError(f"pool view fields: missing {sorted(_FIELDS - fields.keys())}, "
                            f"unknown {sorted(fields.keys() - _FIELDS)}")  # fmt: skip
        view = object.__new__(cls)
        view.__dict__.update(fields)
        return view

    # Derived, never stored (the pool_registry view computes the same from the same columns).
    @property
    def ready(self) -> bool:
        return self.state is PoolState.READY

    @property
    def draining(self) -> bool:
        return self.state is PoolState.DRAINING

    @property
    def live(self) -> bool:
        """An engine runs (or is starting) for the pool."""
        return self.state in ENGINE_STATES

    @property
    def slots_free(self) -> int:
        return max(0, self.slots_total - self.active_leases) if self.ready else 0

    @property
    def correlation_id(self) -> str | None:
        """The id of the request whose work is in flight on the pool, if any."""
        return self.pending_op.correlation_id if self.pending_op is not None else None

    def status(self) -> dict[str, Any]:
        """The public status document (API and `poolmgr pools --json`)."""
        return {
            "pool_id": self.id,
            "node_id": self.node_id,
            "state": self.state.value,
            "desired_state": self.desired_state.value,
            "live": self.live,
            "ready": self.ready,
            "draining": self.draining,
            "active_leases": self.active_leases,
            "slots_total": self.slots_total,
            "slots_free": self.slots_free,
            "engine": self.engine,
            "engine_version": self.engine_version,
            "model": self.model,
            "endpoint_url": self.endpoint_url,
            "pid": self.pid,
            "device_mask": self.device_mask,
            "restart_count": self.restart_count,
            "last_error": self.last_error,
            "heartbeat_at": _iso(self.heartbeat_at),
            "next_restart_at": _iso(self.next_restart_at),
            "breaker_until": _iso(self.breaker_until),
            "vram_total_bytes": self.vram_total_bytes,
            "vram_free_bytes": self.vram_free_bytes,
            "split_plan": self.split_plan,
            "pending_op": public_json(self.pending_op),
            "registry_version": self.version,
            "generation": self.generation,
            "source": self.source,
            "removing": self.removed_at is not None,
        }


_FIELDS = frozenset(PoolView.__dataclass_fields__)


@dataclass(frozen=True)
class EventView:
    id: int
    pool_id: str
    at: datetime
    kind: str
    from_state: str | None
    to_state: str | None
    trigger: str | None
    reason: str | None
    restart_count: int
    backoff_ms: int | None
    exit_code: int | None
    signal: int | None
    correlation_id: str | None
    node_id: str | None
    detail: dict[str, Any] | None

    @classmethod
    def of(cls, row: PoolEvent) -> EventView:
        return cls(**{k: getattr(row, k) for k in cls.__dataclass_fields__})

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = _iso(self.at)
        return data


@dataclass(frozen=True)
class LeaseView:
    id: str
    pool_id: str
    created_at: datetime
    expires_at: datetime

    @classmethod
    def of(cls, row: Lease) -> LeaseView:
        return cls(id=row.id, pool_id=row.pool_id, created_at=row.created_at, expires_at=row.expires_at)

    def to_json(self) -> dict[str, Any]:
        return {
            "lease_id": self.id,
            "pool_id": self.pool_id,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


__all__ = ["EventView", "LeaseView", "PoolView"]
