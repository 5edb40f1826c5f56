"""Operations in flight on a pool: what a drain, a reload, its rollback or an operator's preload carries from
the request that started it to the worker that finishes it (layer 1: imports only the pools file).

Each is named after the FSM edge that starts it and stored in the pool row's `pending_op` column as JSON
(`{"op": "drain", ...}`), so a restarted poolmgr finishes what the previous one started:

    Drain     ready ─drain→ draining ─drain_done→ stopped
    Reload    ready ─drain→ draining ─reload→ placed → preloading → ready (new model)
    Rollback  the reload's new model failed: crashed ─rollback→ placed → preloading → ready (old model)
    Preload   stopped ─place→ placed → preloading → ready, carrying the request's correlation id
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from poolmgr.poolsfile import PoolSpec


@dataclass(frozen=True)
class Drain:
    kind: ClassVar[str] = "drain"
    started_at: datetime
    deadline_ms: int
    correlation_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"op": self.kind, "started_at": self.started_at.isoformat(), "deadline_ms": self.deadline_ms,
                "correlation_id": self.correlation_id}  # fmt: skip


@dataclass(frozen=True)
class _ModelChange:
    """A change of the pool's model: `model` the new one, `old_spec` what a failure rolls back to."""

    kind: ClassVar[str]
    model: str
    old_spec: PoolSpec
    started_at: datetime
    deadline_ms: int
    correlation_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"op": self.kind, "model": self.model, "old_spec": self.old_spec.to_json(),
                "started_at": self.started_at.isoformat(), "deadline_ms": self.deadline_ms,
                "correlation_id": self.correlation_id}  # fmt: skip


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
        return Drain(started, deadline, cid)
    for change in (Reload, Rollback):
        if kind == change.kind:
            return change(str(data["model"]), PoolSpec.from_json(data["old_spec"]), started, deadline, cid)
    raise ValueError(f"unknown operation in flight: {kind!r}")


def public_json(op: Operation | None) -> dict[str, Any] | None:
    """The operation for the status document: without the stored spec (its extra_args may hold an API key)."""
    if op is None:
        return None
    data = op.to_json()
    data.pop("old_spec", None)
    return {k: v for k, v in data.items() if v is not None or k == "correlation_id"}


__all__ = ["Drain", "Operation", "Preload", "Reload", "Rollback", "operation_from_json", "public_json"]
