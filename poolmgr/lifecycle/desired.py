"""Desired state: which pools a node runs and with which spec — rows of the registry, owned by one node.

Every writer goes through here, with the same validation before it (`poolsfile.parse_pool`):
- the pools file, when `serve` starts and on SIGHUP, and `poolmgr apply -f FILE`: `apply_pools(source="file")`
  — the file is the whole set of the node's file pools: what it no longer names is removed;
- `PUT /pools/{id}`: `put_pool` (source "api": removed only by DELETE or `poolmgr pool rm`);
- `DELETE /pools/{id}` and `poolmgr pool rm ID`: `remove_pool`.

An id names one pool in the whole fleet: an id that belongs to another node is refused (OwnedElsewhere, naming
the owner) and nothing of the request is written. A new pool starts; a changed spec of a ready pool is a reload
to the new spec (the pool keeps its address; a failure rolls back to the old spec); a changed spec of a pool
that is not ready is stored and used at its next start; a removed pool drains, stops, then its row goes (its
audit stays). The node's `desired_generation` moves with each change, so a `serve` sees changes made by another
process (the CLI) at its next heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from poolmgr.errors import OwnedElsewhere
from poolmgr.inflight import Reload
from poolmgr.lifecycle.effects import ReloadRequested
from poolmgr.lifecycle.fsm import fire
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import PoolState
from poolmgr.store import PoolView, Registry

CHANGE_DRAIN_MS = 30_000  # how long a changed or removed pool's requests may finish before they are cut


@dataclass
class Applied:
    """What an apply did, by pool id."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"{word} {pool_id}" for word, ids in (("add", self.added), ("change", self.changed),
                                                       ("remove", self.removed)) for pool_id in ids]  # fmt: skip


def check_owned(registry: Registry, pool_ids: list[str]) -> None:
    """OwnedElsewhere for the first id that is another node's pool (before anything is written)."""
    owners = registry.owners(pool_ids)
    for pool_id in pool_ids:
        if owners.get(pool_id, registry.node_id) != registry.node_id:
            raise OwnedElsewhere(pool_id, owners[pool_id])


def apply_pools(
    registry: Registry, specs: list[PoolSpec], *, source: str = "file", correlation_id: str | None = None
) -> Applied:
    """Make the node's pools of `source` exactly `specs` (see the module docstring)."""
    check_owned(registry, [s.id for s in specs])
    mine = {v.id: v for v in registry.pools(node_id=registry.node_id)}
    done = Applied()
    new = [s for s in specs if s.id not in mine]
    if new:
        registry.register_all(new, source=source)
        done.added = [s.id for s in new]
    for spec in specs:
        view = mine.get(spec.id)
        if view is not None:
            changed = _change(registry, view, spec, source=source, correlation_id=correlation_id)
            (done.changed if changed else done.unchanged).append(spec.id)
    named = {s.id for s in specs}
    for view in mine.values():
        if view.source == source and view.id not in named and view.removed_at is None:
            registry.mark_removed(view.id, correlation_id=correlation_id)
            done.removed.append(view.id)
    return done


def put_pool(registry: Registry, spec: PoolSpec, *, correlation_id: str | None = None) -> tuple[bool, PoolView]:
    """Create or change one pool through the API: (created, the pool now)."""
    check_owned(registry, [spec.id])
    view = registry.find(spec.id)
    if view is None:
        return True, registry.register(spec, source="api", correlation_id=correlation_id)
    _change(registry, view, spec, source="api", correlation_id=correlation_id)
    return False, registry.get(spec.id)


def remove_pool(registry: Registry, pool_id: str, *, correlation_id: str | None = None) -> PoolView:
    """Start removing this node's pool (its worker drains and stops it, then deletes its row)."""
    return registry.mark_removed(pool_id, correlation_id=correlation_id)


def _change(registry: Registry, view: PoolView, spec: PoolSpec, *, source: str, correlation_id: str | None) -> bool:
    """Record `spec` for an existing pool of this node: whether anything changed."""
    if view.spec == spec and view.removed_at is None and view.source == source:
        return False
    pending = view.pending_op
    if isinstance(pending, Reload) and pending.new_spec == spec and view.removed_at is None:
        return False  # already reloading to it
    if view.state is PoolState.READY and view.spec != spec:
        op = Reload(spec.model, view.spec, registry.clock.now(), CHANGE_DRAIN_MS, correlation_id, spec)
        fire(registry, view.id, ReloadRequested(op), expect=[PoolState.READY])
        registry.touch_desired(view.id, source=source)
        return True
    registry.register(spec, source=source, correlation_id=correlation_id)
    return True


__all__ = ["CHANGE_DRAIN_MS", "Applied", "apply_pools", "check_owned", "put_pool", "remove_pool"]
