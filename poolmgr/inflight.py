"""Operations in flight on a pool: what a drain, a reload, its rollback or an operator's preload carries from
the request that started it to the worker that finishes it (layer 1: imports only the pools file).

Each is named after the FSM edge that starts it and stored in the pool row's `pending_op` column as JSON
(`{"op": "drain", ...}`), so a restarted poolmgr finishes what the previous one started:

    Drain     ready ─drain→ draining ─drain_done→ stopped (an operator's drain, or an idle pool unloaded)
    Reload    ready ─drain→ draining ─reload→ placed → preloading → ready (new model)
    Rollback  the reload's new model failed: crashed ─rollback→ placed → preloading → ready (old model)
    Preload   stopped ─place→ placed → preloading → ready, carrying the request's correlation id
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from poolmgr.poolsfile import PoolSpec

IDLE_UNLOAD = "idle_unload"  # a Drain's reason: the pool had no request and no lease for its idle_unload_s
LOAD_ON_DEMAND = "load_on_demand"  # a preload's reason: a request found the pool stopped (its load_on_demand)


@dataclass(frozen=True)
class Drain:
    """`reason`: why poolmgr itself drains the pool (IDLE_UNLOAD); None for an operator's drain."""

    kind: ClassVar[str] = "drain"
    started_at: datetime
    deadline_ms: int
    correlation_id: str | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"op": self.kind, "started_at": self.started_at.isoformat(),
                                "deadline_ms": self.deadline_ms, "correlation_id": self.correlation_id}  # fmt: skip
        if self.reason is not None:
            data["reason"] = self.reason
        return data


@dataclass(frozen=True)
class _ModelChange:
    """A change of the pool's model: `model` the new one, `old_spec` what a failure rolls back to."""

    kind: ClassVar[str]
    model: str
    old_spec: PoolSpec
    started_at: datetime
    deadline_ms: int
    correlation_id: str | None = None
    new_spec: PoolSpec | None = None  # a whole new spec (a changed pool in apply / PUT), else only `model` changes

    def to_json(self) -> dict[str, Any]:
        data = {"op": self.kind, "model": self.model, "old_spec": self.old_spec.to_json(),
                "started_at": self.started_at.isoformat(), "deadline_ms": self.deadline_ms,
                "correlation_id": self.correlation_id}  # fmt: skip
        if self.new_spec is not None:
            data["new_spec"] = self.new_spec.to_json()
        return data


@dataclass(frozen=True)
class Reload(_ModelChange):
    """Drain the old engine, then start `model`; `old_spec` is what a failure rolls back to."""

    kind: ClassVar[str] = "reload"

    def rolled_back(self) -> Rollback:
        return Rollback(self.model, self.old_spec, self.started_at, self.deadline_ms, self.correlation_id)


@dataclass(frozen=True)
class Rollback(_ModelChange):
    """The reload to `model` failed: `old_spec` is starting again (a sibling of Reload, not a kind of it)."""

    kind: ClassVar[str] = "rollback"


@dataclass(frozen=True)
class Preload:
    kind: ClassVar[str] = "preload"
    correlation_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"op": self.kind, "correlation_id": self.correlation_id}


Operation = Drain | Reload | Rollback | Preload


def operation_from_json(data: dict[str, Any] | None) -> Operation | None:
    """The stored `pending_op` as its record (None for none); a malformed one raises ValueError."""
    if not data:
        return None
    kind, cid = data.get("op"), data.get("correlation_id")
    if kind == Preload.kind:
        return Preload(cid)
    started = datetime.fromisoformat(str(data["started_at"]))
    deadline = int(data.get("deadline_ms", 0))
    if kind == Drain.kind:
        reason = data.get("reason")
        return Drain(started, deadline, cid, str(reason) if reason is not None else None)
    for change in (Reload, Rollback):
        if kind == change.kind:
            new = PoolSpec.from_json(data["new_spec"]) if data.get("new_spec") else None
            return change(str(data["model"]), PoolSpec.from_json(data["old_spec"]), started, deadline, cid, new)
    raise ValueError(f"unknown operation in flight: {kind!r}")


def public_json(op: Operation | None) -> dict[str, Any] | None:
    """The operation for the status document: without the stored spec (its extra_args may hold an API key)."""
    if op is None:
        return None
    data = op.to_json()
    data.pop("old_spec", None)
    data.pop("new_spec", None)
    return {k: v for k, v in data.items() if v is not None or k == "correlation_id"}


__all__ = [
    "IDLE_UNLOAD",
    "LOAD_ON_DEMAND",
    "Drain",
    "Operation",
    "Preload",
    "Reload",
    "Rollback",
    "operation_from_json",
    "public_json",
]
