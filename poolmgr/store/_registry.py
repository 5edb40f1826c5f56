"""The registry: pools, their audit events and leases, in one database (B-REG).

Every state change is one transaction: read the row (locked), decide, update it where its version still
matches, insert the audit event, commit. A writer that loses a race re-reads and re-decides; nothing is lost
and nothing is written twice.

State changes (`transition`) are the hot path and run on SQLAlchemy Core with prebuilt statements: the ORM's
identity map, unit of work and read-back of the row cost about four times the SQL itself (bench/store.py).
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import bindparam, delete, func, insert, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from poolmgr import __version__
from poolmgr.clock import Clock, SystemClock
from poolmgr.errors import LeaseRefused, NotFoundError
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import DesiredState, PoolState
from poolmgr.store._db import make_engine, make_sessionmaker
from poolmgr.store._fastpath import SqliteStatements
from poolmgr.store._models import Device, Lease, Node, Pool, PoolEvent
from poolmgr.store._views import EventView, LeaseView, PoolView

log = logging.getLogger("poolmgr.store")

_MAX_CAS_RETRIES = 20
# Columns a caller may set through update()/transition(); the rest are derived or owned by the registry.
_WRITABLE = frozenset(
    {
        "spec", "model", "engine", "device_mask", "desired_state", "last_error", "heartbeat_at",
        "engine_version", "slots_total", "slots_free", "restart_count", "endpoint_url", "pid",
        "pid_start_time", "spawn_intent_at", "ready_since", "backoff_step", "next_restart_at",
        "consecutive_failures", "breaker_timeout_s", "breaker_until", "breaker_trial", "vram_total_bytes",
        "vram_free_bytes", "compute_capability", "split_plan", "live", "pending_op", "drain_deadline_at",
    }
)  # fmt: skip
_POOLS = Pool.metadata.tables["pools"]
_LOCK_POOL = select(_POOLS).where(_POOLS.c.id == bindparam("pool_id")).with_for_update()
# The SET clause follows the keys of the parameters; `_id` and `_version` are the compare-and-swap.
_CAS_POOL = _POOLS.update().where(_POOLS.c.id == bindparam("_id"), _POOLS.c.version == bindparam("_version"))
_INSERT_EVENT = insert(PoolEvent.metadata.tables["pool_events"])


@dataclass(frozen=True)
class EventData:
    """What an audit row says beyond the state change itself."""

    kind: str | None = None
    reason: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    backoff_ms: int | None = None
    correlation_id: str | None = None
    detail: dict[str, Any] | None = None


@dataclass(frozen=True)
class Decision:
    """The outcome of deciding a transition against a fresh row."""

    to_state: PoolState
    trigger: str
    updates: dict[str, Any] = field(default_factory=dict)
    event: EventData = field(default_factory=EventData)
    clear_leases: bool = False  # the engine is gone: its leases end with it


class Registry:
    def __init__(self, url: str, *, node_id: str, clock: Clock | None = None) -> None:
        self.url = url
        self.node_id = node_id
        self.clock: Clock = clock or SystemClock()
        self.engine = make_engine(url)
        self._sessions = make_sessionmaker(self.engine)
        self._sqlite: SqliteStatements | None = None
        if self.engine.dialect.name == "sqlite":
            self._sqlite = SqliteStatements(self.engine, _POOLS, PoolEvent.metadata.tables["pool_events"])

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def _locked(self, session: Session, pool_id: str) -> Pool:
        row = session.scalars(select(Pool).where(Pool.id == pool_id).with_for_update()).one_or_none()
        if row is None:
            raise NotFoundError(f"pool {pool_id!r} not found")
        return row

    def _add_event(self, session: Session, row: Pool, ev: EventData, **kw: Any) -> None:
        session.add(PoolEvent(**self._event_values(row.id, row.restart_count, ev, **kw)))

    def _event_values(self, pool_id: str, restart_count: int, ev: EventData, **kw: Any) -> dict[str, Any]:
        return {
            "pool_id": pool_id, "at": self.clock.now(), "kind": ev.kind or kw.get("trigger") or "event",
            "reason": ev.reason, "restart_count": restart_count, "backoff_ms": ev.backoff_ms,
            "exit_code": ev.exit_code, "signal": ev.signal, "correlation_id": ev.correlation_id,
            "node_id": self.node_id, "detail": ev.detail, **kw,
        }  # fmt: skip

    # -- nodes ----------------------------------------------------------------------------------------
    def heartbeat_node(self, hostname: str) -> None:
        now = self.clock.now()
        with self._tx() as s:
            node = s.get(Node, self.node_id)
            if node is None:
                s.add(
                    Node(
                        id=self.node_id,
                        hostname=hostname,
                        version=__version__,
                        started_at=now,
                        heartbeat_at=now,
                    )
                )
            else:
                node.heartbeat_at = now
                node.version = __version__

    # -- pools ----------------------------------------------------------------------------------------
    def register(self, spec: PoolSpec, *, correlation_id: str | None = None) -> PoolView:
        """Add a pool in state `discovered`, or update the spec of a known one (no state change)."""
        now = self.clock.now()
        with self._tx() as s:
            row = s.scalars(select(Pool).where(Pool.id == spec.id).with_for_update()).one_or_none()
            if row is not None:
                if row.spec != spec.to_json():
                    row.spec, row.model, row.engine = spec.to_json(), spec.model, spec.engine
                    row.device_mask, row.version, row.updated_at = spec.device_mask, row.version + 1, now
                    self._add_event(s, row, EventData(kind="spec_updated", correlation_id=correlation_id))
                return PoolView.of(row)
            row = Pool(
                id=spec.id, node_id=self.node_id, spec=spec.to_json(), engine=spec.engine, model=spec.model,
                device_mask=spec.device_mask, state=PoolState.DISCOVERED.value,
                desired_state=DesiredState.RUNNING.value, live=False, ready=False, draining=False,
                slots_total=spec.slots, slots_free=0, active_leases=0, restart_count=0, backoff_step=0,
                consecutive_failures=0, breaker_timeout_s=0.0, breaker_trial=False, version=1,
                created_at=now, updated_at=now,
            )  # fmt: skip
            s.add(row)
            s.flush()
            self._add_event(s, row, EventData(kind="registered", correlation_id=correlation_id), to_state=row.state)
            return PoolView.of(row)

    def deregister(self, pool_id: str, *, correlation_id: str | None = None) -> None:
        with self._tx() as s:
            row = self._locked(s, pool_id)
            self._add_event(s, row, EventData(kind="deregistered", correlation_id=correlation_id), from_state=row.state)
            s.execute(delete(Lease).where(Lease.pool_id == pool_id))
            s.delete(row)

    def find(self, pool_id: str) -> PoolView | None:
        with self._sessions() as s:
            row = s.get(Pool, pool_id)
            return PoolView.of(row) if row is not None else None

    def get(self, pool_id: str) -> PoolView:
        view = self.find(pool_id)
        if view is None:
            raise NotFoundError(f"pool {pool_id!r} not found")
        return view

    def pools(self, *, node_id: str | None = None) -> list[PoolView]:
        """Snapshots of all pools (of one node if given), sorted by pool id."""
        with self._sessions() as s:
            q = select(Pool).order_by(Pool.id)
            if node_id is not None:
                q = q.where(Pool.node_id == node_id)
            return [PoolView.of(r) for r in s.scalars(q)]

    def transition(self, pool_id: str, decide: Callable[[PoolView], Decision]) -> tuple[PoolView, Decision]:
        """Decide on the fresh row and persist state + audit row in one transaction (CAS on version)."""
        if self._sqlite is not None:
            return self._transition_sqlite(self._sqlite, pool_id, decide)
        for _ in range(_MAX_CAS_RETRIES):
            with self.engine.begin() as conn:
                row = conn.execute(_LOCK_POOL, {"pool_id": pool_id}).one_or_none()
                if row is None:
                    raise NotFoundError(f"pool {pool_id!r} not found")
                before = PoolView.of(cast(Pool, row))  # a Core row has the mapped attribute names
                decision = decide(before)
                if decision.clear_leases:
                    conn.execute(delete(Lease).where(Lease.pool_id == pool_id))
                    before = replace(before, active_leases=0)
                values = _derived(decision.to_state, before, decision.updates)
                if decision.clear_leases:
                    values["active_leases"] = 0
                values.update(state=decision.to_state.value, version=row.version + 1, updated_at=self.clock.now())
                if conn.execute(_CAS_POOL, {**values, "_id": pool_id, "_version": row.version}).rowcount != 1:
                    conn.rollback()
                    continue
                after = _applied(before, values)
                conn.execute(
                    _INSERT_EVENT,
                    self._event_values(
                        pool_id, after.restart_count, decision.event, from_state=before.state.value,
                        to_state=decision.to_state.value, trigger=decision.trigger,
                    ),
                )  # fmt: skip
                return after, decision
        raise RuntimeError(f"pool {pool_id!r}: gave up after {_MAX_CAS_RETRIES} compare-and-swap retries")

    def _transition_sqlite(
        self, st: SqliteStatements, pool_id: str, decide: Callable[[PoolView], Decision]
    ) -> tuple[PoolView, Decision]:
        """`transition` on the DB-API connection (see _fastpath.py): the same statements, values and CAS."""
        for _ in range(_MAX_CAS_RETRIES):
            raw = self.engine.raw_connection()
            try:
                cur = raw.cursor()
                cur.execute("BEGIN IMMEDIATE")
                try:
                    done = self._decide_and_write(st, cur, pool_id, decide)
                    cur.execute("COMMIT" if done is not None else "ROLLBACK")
                except BaseException:
                    if raw.driver_connection is not None and raw.driver_connection.in_transaction:
                        cur.execute("ROLLBACK")
                    raise
                if done is not None:
                    return done
            except sqlite3.OperationalError as exc:  # "database is locked" & co: what the retry wrappers expect
                raise OperationalError("BEGIN IMMEDIATE … COMMIT (pool transition)", None, exc) from exc
            finally:
                raw.close()
        raise RuntimeError(f"pool {pool_id!r}: gave up after {_MAX_CAS_RETRIES} compare-and-swap retries")

    def _decide_and_write(
        self, st: SqliteStatements, cur: Any, pool_id: str, decide: Callable[[PoolView], Decision]
    ) -> tuple[PoolView, Decision] | None:
        row = cur.execute(st.select_pool, (pool_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"pool {pool_id!r} not found")
        data = st.row_to_dict(row)
        before = PoolView.of(cast(Pool, SimpleNamespace(**data)))
        decision = decide(before)
        if decision.clear_leases:
            cur.execute("DELETE FROM leases WHERE pool_id = ?", (pool_id,))
            before = replace(before, active_leases=0)
        values = _derived(decision.to_state, before, decision.updates)
        if decision.clear_leases:
            values["active_leases"] = 0
        values.update(state=decision.to_state.value, version=data["version"] + 1, updated_at=self.clock.now())
        sql, params = st.update_pool(values)
        if cur.execute(sql, [*params, pool_id, data["version"]]).rowcount != 1:
            return None  # lost the compare-and-swap: re-read and re-decide
        after = _applied(before, values)
        sql, params = st.insert_event(
            self._event_values(
                pool_id, after.restart_count, decision.event, from_state=before.state.value,
                to_state=decision.to_state.value, trigger=decision.trigger,
            )
        )  # fmt: skip
        cur.execute(sql, params)
        return after, decision

    def update(self, pool_id: str, *, event: EventData | None = None, **fields: Any) -> PoolView:
        """Change registry fields without a state change; optionally append an audit event with them."""
        bad = set(fields) - _WRITABLE
        if bad:
            raise ValueError(f"not writable through update(): {sorted(bad)}")
        with self._tx() as s:
            row = self._locked(s, pool_id)
            if "slots_free" in fields or "slots_total" in fields:
                total = fields.get("slots_total", row.slots_total)
                fields["slots_free"] = max(0, min(total, fields.get("slots_free", row.slots_free)))
            for k, v in fields.items():
                setattr(row, k, v)
            row.version += 1
            row.updated_at = self.clock.now()
            s.flush()
            if event is not None:
                self._add_event(s, row, event, from_state=row.state, to_state=row.state)
            return PoolView.of(row)

    def record_event(self, pool_id: str, event: EventData) -> None:
        with self._tx() as s:
            row = self._locked(s, pool_id)
            self._add_event(s, row, event, from_state=row.state, to_state=row.state)

    def set_health(self, pool_id: str, *, live: bool, heartbeat: bool = True) -> PoolView:
        return self.update(pool_id, live=live, heartbeat_at=self.clock.now() if heartbeat else None)

    def set_last_error(self, pool_id: str, message: str | None) -> PoolView:
        return self.update(pool_id, last_error=message)

    def set_slots(self, pool_id: str, *, total: int, free: int) -> PoolView:
        """Slots are clamped to [0, total]; total never below zero."""
        return self.update(pool_id, slots_total=max(0, total), slots_free=free)

    # -- events ---------------------------------------------------------------------------------------
    def events(self, *, pool_id: str | None = None, limit: int | None = None, after_id: int = 0) -> list[EventView]:
        with self._sessions() as s:
            q = select(PoolEvent).where(PoolEvent.id > after_id).order_by(PoolEvent.id)
            if pool_id is not None:
                q = q.where(PoolEvent.pool_id == pool_id)
            if limit is not None:
                q = q.order_by(None).order_by(PoolEvent.id.desc()).limit(limit)
                return [EventView.of(r) for r in reversed(list(s.scalars(q)))]
            return [EventView.of(r) for r in s.scalars(q)]

    def count_events(self, pool_id: str, *, trigger: str, since: datetime) -> int:
        """Audit rows of one trigger since a moment: the sliding window of restart-storm detection."""
        with self._sessions() as s:
            q = select(func.count(PoolEvent.id)).where(
                PoolEvent.pool_id == pool_id, PoolEvent.trigger == trigger, PoolEvent.at >= since
            )
            return int(s.scalar(q) or 0)

    def event_rows(
        self, *, kinds: Collection[str], after_id: int = 0, node_id: str | None = None, limit: int = 10_000
    ) -> list[EventView]:
        """Audit rows of some kinds after an id, oldest first (by primary key): for incremental readers."""
        with self._sessions() as s:
            q = select(PoolEvent).where(PoolEvent.id > after_id, PoolEvent.kind.in_(sorted(kinds)))
            if node_id is not None:
                q = q.where(PoolEvent.node_id == node_id)
            return [EventView.of(r) for r in s.scalars(q.order_by(PoolEvent.id).limit(limit))]

    # -- leases ---------------------------------------------------------------------------------------
    def allocate_lease(self, pool_id: str, *, ttl_s: float, correlation_id: str | None = None) -> LeaseView:
        """A lease on one slot: refused while draining, not ready, or with no free slot."""
        now = self.clock.now()
        with self._tx() as s:
            row = self._locked(s, pool_id)
            if row.draining:
                raise LeaseRefused(f"pool {pool_id!r} is draining: no new leases")
            if not row.ready:
                raise LeaseRefused(f"pool {pool_id!r} is not ready (state {row.state})")
            if row.slots_free <= 0:
                raise LeaseRefused(f"pool {pool_id!r} has no free slot ({row.slots_total} in use)")
            lease = Lease(
                id=secrets.token_hex(8),
                pool_id=pool_id,
                created_at=now,
                expires_at=now + timedelta(seconds=ttl_s),
            )
            s.add(lease)
            row.active_leases += 1
            row.slots_free = max(0, row.slots_free - 1)
            row.version += 1
            row.updated_at = now
            s.flush()
            self._add_event(
                s, row, EventData(kind="lease_allocated", correlation_id=correlation_id, detail={"lease_id": lease.id}),
                from_state=row.state, to_state=row.state,
            )  # fmt: skip
            return LeaseView.of(lease)

    def release_lease(self, pool_id: str, lease_id: str, *, correlation_id: str | None = None) -> bool:
        """Release one lease. Unknown lease → False; the count never goes below zero."""
        with self._tx() as s:
            row = self._locked(s, pool_id)
            lease = s.get(Lease, lease_id)
            if lease is None or lease.pool_id != pool_id:
                return False
            s.delete(lease)
            self._recount(s, row)
            self._add_event(
                s, row, EventData(kind="lease_released", correlation_id=correlation_id, detail={"lease_id": lease_id}),
                from_state=row.state, to_state=row.state,
            )  # fmt: skip
            return True

    def leases(self, pool_id: str) -> list[LeaseView]:
        with self._sessions() as s:
            q = select(Lease).where(Lease.pool_id == pool_id).order_by(Lease.created_at)
            return [LeaseView.of(r) for r in s.scalars(q)]

    def active_leases(self, pool_id: str) -> int:
        """Unknown pool → 0 (B-REG)."""
        view = self.find(pool_id)
        return view.active_leases if view is not None else 0

    def reap_expired_leases(self) -> int:
        """Delete expired leases and recount their pools. Locks are taken pool row first, then its leases —
        the order allocate/release use — so a release racing with the reaper cannot deadlock on PostgreSQL."""
        now = self.clock.now()
        reaped = 0
        with self._sessions() as s:
            pool_ids = sorted(set(s.scalars(select(Lease.pool_id).where(Lease.expires_at <= now))))
        for pool_id in pool_ids:
            with self._tx() as s:
                row = s.scalars(select(Pool).where(Pool.id == pool_id).with_for_update()).one_or_none()
                if row is None:
                    continue
                ids = list(
                    s.scalars(
                        select(Lease.id).where(Lease.pool_id == pool_id, Lease.expires_at <= now).with_for_update()
                    )
                )
                if not ids:
                    continue  # released meanwhile
                s.execute(delete(Lease).where(Lease.id.in_(ids)))
                self._recount(s, row)
                self._add_event(
                    s, row, EventData(kind="leases_expired", detail={"lease_ids": ids}),
                    from_state=row.state, to_state=row.state,
                )  # fmt: skip
                reaped += len(ids)
        return reaped

    def _recount(self, s: Session, row: Pool) -> None:
        s.flush()
        n = int(s.scalar(select(func.count(Lease.id)).where(Lease.pool_id == row.id)) or 0)
        row.active_leases = n
        row.slots_free = max(0, min(row.slots_total, row.slots_total - n)) if row.ready else 0
        row.version += 1
        row.updated_at = self.clock.now()

    # -- devices --------------------------------------------------------------------------------------
    def upsert_devices(self, rows: list[dict[str, Any]]) -> None:
        now = self.clock.now()
        with self._tx() as s:
            for data in rows:
                dev = s.get(Device, (self.node_id, data["uuid"]))
                if dev is None:
                    s.add(Device(node_id=self.node_id, updated_at=now, **data))
                else:
                    for k, v in data.items():
                        setattr(dev, k, v)
                    dev.updated_at = now

    def devices(self) -> list[dict[str, Any]]:
        with self._sessions() as s:
            q = select(Device).where(Device.node_id == self.node_id).order_by(Device.idx)
            return [
                {c: getattr(d, c) for c in ("uuid", "idx", "name", "pci_bus_id", "compute_capability",
                                            "vram_total_bytes", "vram_free_bytes", "is_mig", "updated_at")}
                for d in s.scalars(q)
            ]  # fmt: skip


def _derived(to_state: PoolState, before: PoolView, updates: dict[str, Any]) -> dict[str, Any]:
    """Registry flags follow the FSM state so a reader never sees a mix (ready and draining, say)."""
    bad = set(updates) - _WRITABLE
    if bad:
        raise ValueError(f"not writable through a transition: {sorted(bad)}")
    values = dict(updates)
    ready = to_state is PoolState.READY
    values["ready"] = ready
    values["draining"] = to_state is PoolState.DRAINING
    values.setdefault("live", to_state in (PoolState.READY, PoolState.DRAINING, PoolState.PRELOADING))
    total = values.get("slots_total", before.slots_total)
    values["slots_free"] = max(0, min(total, total - before.active_leases)) if ready else 0
    return values


def _applied(view: PoolView, values: dict[str, Any]) -> PoolView:
    """`view` with the values just written: the row as it now is, without reading it back."""
    changes = dict(values)
    if "state" in changes:
        changes["state"] = PoolState(changes["state"])
    if "desired_state" in changes:
        changes["desired_state"] = DesiredState(changes["desired_state"])
    if "spec" in changes:
        changes["spec"] = PoolSpec.from_json(changes["spec"])
    return replace(view, **changes)


__all__ = ["Decision", "EventData", "Registry"]
