"""The registry: pools, their audit events and leases, in one database (B-REG).

Every write of a pool row goes through `apply`: one transaction that locks the row, lets the FSM decide,
writes it where its version still matches (compare-and-swap) and inserts the audit row (store/_write.py). A
writer that loses a race re-reads and re-decides; nothing is lost and nothing is written twice. `register` only
creates rows (or records a new spec); leases are rows of their own and never write the pool row.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, literal_column, select, update
from sqlalchemy.exc import DBAPIError, OperationalError, StatementError
from sqlalchemy.orm import Session

from poolmgr import __version__
from poolmgr.clock import Clock, SystemClock
from poolmgr.errors import LeaseRefused, NotFoundError, OwnedElsewhere
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import DesiredState, PoolState
from poolmgr.store._audit_read import AuditReader
from poolmgr.store._db import make_engine, make_sessionmaker
from poolmgr.store._effect import Effect, EventData, StateMachine
from poolmgr.store._models import Device, Lease, Node, Pool, PoolEvent
from poolmgr.store._retention import DEFAULT_BATCH, prune_audit
from poolmgr.store._views import EventView, LeaseView, PoolView
from poolmgr.store._write import (
    NODES,
    POOLS,
    Beat,
    RawStatements,
    RawTx,
    WriteTx,
    apply_effect,
)

log = logging.getLogger("poolmgr.store")

_MAX_CAS_RETRIES = 20
_MAX_CHAIN = 4  # effects one `apply` may chain in its transaction


def _database_clock_plus(dialect: str, ms: int) -> str:
    """SQL for the database server's clock + `ms` (liveness must not depend on the nodes' clocks agreeing)."""
    if dialect == "postgresql":
        return f"now() + interval '{int(ms)} milliseconds'"
    # SQLite: UTC text as SQLAlchemy writes it (microseconds), comparable with the view's strftime('%f')
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', '+{int(ms) / 1000:.3f} seconds') || '000'"


class _LostRace(Exception):
    """The compare-and-swap lost: roll back, re-read, re-decide."""


class Registry:
    def __init__(self, url: str, *, node_id: str, clock: Clock | None = None) -> None:
        self.url = url
        self.node_id = node_id
        self.clock: Clock = clock or SystemClock()
        self.engine = make_engine(url)
        self._sessions = make_sessionmaker(self.engine)
        self._raw = RawStatements(self.engine)  # the write path's statements (store/_write.py)
        self._dbapi: Any = self.engine.dialect.dbapi
        self.audit = AuditReader(self.engine)  # what /metrics reads (store/_audit_read.py)

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

    def _locked_own(self, session: Session, pool_id: str) -> Pool:
        """`_locked`, refusing another node's pool (a node never changes another node's pool)."""
        row = self._locked(session, pool_id)
        if row.node_id != self.node_id:
            raise OwnedElsewhere(pool_id, row.node_id)
        return row

    def owners(self, pool_ids: Collection[str]) -> dict[str, str]:
        """pool id -> its node, for those of `pool_ids` that exist (one query)."""
        if not pool_ids:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(select(POOLS.c.id, POOLS.c.node_id).where(POOLS.c.id.in_(list(pool_ids))))
            return {pool_id: node_id for pool_id, node_id in rows}

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
    def heartbeat_node(self, hostname: str, *, grace_ms: int = 5000) -> Beat:
        """The node's one steady write: its row's heartbeat (created on the first call), `alive_until` = the
        database's clock + `grace_ms` (pool_registry.node_alive). In the same transaction, what the node must
        act on: whether a lease of its pools expired (then `reap_expired_leases`) and the generation of its
        desired pools (a change: re-read them). An idle node: one transaction a heartbeat, whatever it runs —
        two statements on the DB-API cursor (store/_write.py's `RawStatements.beat`), a tenth of Core's CPU."""
        now, values = self.clock.now(), {"version": __version__, "grace_ms": grace_ms, "hostname": hostname}
        alive = _database_clock_plus(self.engine.dialect.name, grace_ms)
        for _ in range(2):
            with self._raw_tx("heartbeat") as cur:
                beat = self._raw.beat(cur, self.node_id, now, values, alive)
            if beat is not None:
                return beat
            self._add_node(now, values, alive)  # the node's first beat: its row, then the beat again
        raise AssertionError(f"node {self.node_id!r}: no row after creating it")  # pragma: no cover

    def _add_node(self, now: datetime, values: dict[str, Any], alive: str) -> None:
        """The node's row, created (Core; once per node), unless a CLI's registration made it meanwhile."""
        with self.engine.begin() as conn:
            row = {**values, "heartbeat_at": now, "alive_until": literal_column(alive)}
            if conn.execute(update(NODES).where(NODES.c.id == self.node_id).values(**row)).rowcount == 0:
                conn.execute(insert(NODES).values(id=self.node_id, started_at=now, **row))

    def _expired_leases(self, now: datetime) -> Any:
        """The expired leases of this node's pools (a node never touches another node's pools)."""
        return (
            select(Lease.pool_id)
            .join(Pool, Pool.id == Lease.pool_id)
            .where(Pool.node_id == self.node_id, Lease.expires_at <= now)
        )

    def note_all(self, notes: Sequence[tuple[str, EventData]]) -> None:
        """Audit rows that change no pool (an engine re-adopted at start), in one transaction; a retry after a
        COMMIT whose answer was lost finds them there (same pool, kind and detail) and writes none twice."""
        with self._tx() as s:
            kinds = sorted({ev.kind or "event" for _, ev in notes})
            recent = s.scalars(
                select(PoolEvent).where(PoolEvent.kind.in_(kinds)).order_by(PoolEvent.id.desc()).limit(2 * len(notes))
            )
            seen = {(e.pool_id, e.kind, repr(e.detail)) for e in recent}
            for pool_id, ev in notes:
                if (pool_id, ev.kind or "event", repr(ev.detail)) not in seen:
                    s.add(PoolEvent(**self._event_values(pool_id, 0, ev, from_state=None, to_state=None)))

    # -- pools ----------------------------------------------------------------------------------------
    def register_all(self, specs: Sequence[PoolSpec], *, source: str = "file") -> None:
        """`register` for every spec, in one transaction (a node's start: one commit, not one per pool)."""
        with self._tx() as s:
            for spec in specs:
                self._register_in(s, spec, correlation_id=None, source=source)

    def touch_desired(self, pool_id: str, *, source: str) -> None:
        """An operator changed this node's pool by another way than its spec row (a reload to a new spec):
        its generation moves, its source is `source`, a removal is called off."""
        with self._tx() as s:
            row = self._locked_own(s, pool_id)
            row.generation, row.source, row.removed_at = row.generation + 1, source, None
            self._bump_node(s)

    def register(self, spec: PoolSpec, *, correlation_id: str | None = None, source: str = "file") -> PoolView:
        """Add a pool of this node in state `discovered`, or record a new spec of one (no state change; a pool
        being removed is kept instead). OwnedElsewhere when the id is another node's pool."""
        with self._tx() as s:
            self._register_in(s, spec, correlation_id=correlation_id, source=source)
        return self.get(spec.id)

    def _register_in(self, s: Session, spec: PoolSpec, *, correlation_id: str | None, source: str = "file") -> str:
        """'added', 'changed' or 'unchanged' (see `register`)."""
        now = self.clock.now()
        row = s.scalars(select(Pool).where(Pool.id == spec.id).with_for_update()).one_or_none()
        if row is not None and row.node_id != self.node_id:
            raise OwnedElsewhere(spec.id, row.node_id)
        if row is None:
            row = Pool(
                id=spec.id, node_id=self.node_id, spec=spec.to_json(), engine=spec.engine, model=spec.model,
                device_mask=spec.device_mask, state=PoolState.DISCOVERED.value,
                desired_state=DesiredState.RUNNING.value, slots_total=spec.slots, restart_count=0,
                backoff_step=0, consecutive_failures=0, breaker_timeout_s=0.0, breaker_trial=False, version=1,
                created_at=now, updated_at=now, generation=1, source=source,
            )  # fmt: skip
            s.add(row)
            s.flush()
            self._add_event(s, row, EventData(kind="registered", correlation_id=correlation_id), to_state=row.state)
            self._bump_node(s)
            return "added"
        if row.spec == spec.to_json() and row.removed_at is None and row.source == source:
            return "unchanged"
        row.spec, row.model, row.engine = spec.to_json(), spec.model, spec.engine
        row.device_mask, row.version, row.updated_at = spec.device_mask, row.version + 1, now
        row.generation, row.source, row.removed_at = row.generation + 1, source, None
        self._add_event(s, row, EventData(kind="spec_updated", correlation_id=correlation_id))
        self._bump_node(s)
        return "changed"

    def _bump_node(self, s: Session) -> None:
        """This node's desired pools changed: its serve re-reads them at its next heartbeat."""
        bumped = update(Node).where(Node.id == self.node_id).values(desired_generation=Node.desired_generation + 1)
        if s.execute(bumped).rowcount == 0:  # type: ignore[attr-defined]
            now = self.clock.now()
            s.add(Node(id=self.node_id, hostname="", version=__version__, started_at=now, heartbeat_at=now,
                       desired_generation=1))  # fmt: skip

    def mark_removed(self, pool_id: str, *, correlation_id: str | None = None) -> PoolView:
        """Start removing this node's pool: its worker drains and stops it, then deletes its row."""
        with self._tx() as s:
            row = self._locked_own(s, pool_id)
            if row.removed_at is None:
                row.removed_at, row.generation = self.clock.now(), row.generation + 1
                row.version, row.updated_at = row.version + 1, self.clock.now()
                self._add_event(s, row, EventData(kind="remove_requested", correlation_id=correlation_id))
                self._bump_node(s)
        return self.get(pool_id)

    def deregister(self, pool_id: str, *, correlation_id: str | None = None) -> None:
        with self._tx() as s:
            row = self._locked_own(s, pool_id)
            self._add_event(s, row, EventData(kind="deregistered", correlation_id=correlation_id), from_state=row.state)
            s.execute(delete(Lease).where(Lease.pool_id == pool_id))
            s.delete(row)
            self._bump_node(s)

    def find(self, pool_id: str) -> PoolView | None:
        views = self._read_pools(self._raw.select_one_pool, pool_id)
        return views[0] if views else None

    def get(self, pool_id: str) -> PoolView:
        view = self.find(pool_id)
        if view is None:
            raise NotFoundError(f"pool {pool_id!r} not found")
        return view

    def pools(self, *, node_id: str | None = None) -> list[PoolView]:
        """Snapshots of all pools (of one node if given), sorted by pool id."""
        if node_id is None:
            return self._read_pools(self._raw.select_pools)
        return self._read_pools(self._raw.select_node_pools, node_id)

    def _read_pools(self, sql: str, *params: str) -> list[PoolView]:
        """Pools as the write path reads them (its statements and column processors, on the DB-API cursor: a
        fraction of Core's CPU; each distinct spec parsed once), unlocked."""
        with self._raw_tx("read pools", write=False) as cur:
            cur.execute(sql, params)
            return [PoolView.of(self._raw.row_to_dict(row, cur)) for row in cur.fetchall()]

    def apply(
        self,
        pool_id: str,
        effect: Effect,
        *,
        machine: StateMachine | None = None,
        expect: Collection[PoolState] | None = None,
        then: Callable[[PoolView], Effect | None] | None = None,
    ) -> PoolView:
        """The one write path of a pool row (store/_write.py): `effect` applied in one transaction; its trigger,
        if any, decided by `machine` on the locked row. `expect`: refuse (IllegalTransition, nothing written)
        unless the pool is in one of these states. `then`: asked after each step with the row as just written
        (so it answers by the row's state), it may give a next effect for the same transaction, each with its
        own audit row, all or none committed: a crash whose backoff is 0 ms is crash → back_off → retry in one
        commit. Returns the row as it now is."""
        expected = frozenset(expect) if expect is not None else None
        for _ in range(_MAX_CAS_RETRIES):
            try:
                with self._write() as tx:
                    view = self._apply_steps(tx, pool_id, effect, machine, expected, then)
                    if view is None:
                        raise _LostRace
                    return view
            except _LostRace:
                continue
        raise RuntimeError(f"pool {pool_id!r}: gave up after {_MAX_CAS_RETRIES} compare-and-swap retries")

    def _apply_steps(
        self,
        tx: WriteTx,
        pool_id: str,
        effect: Effect | None,
        machine: StateMachine | None,
        expect: frozenset[PoolState] | None,
        then: Callable[[PoolView], Effect | None] | None,
    ) -> PoolView | None:
        view: PoolView | None = None
        for _ in range(_MAX_CHAIN):
            if effect is None:
                break
            view = apply_effect(
                tx, pool_id, effect, machine=machine, expect=expect, now=self.clock.now(),
                event_values=self._audit_values, before=view,
            )  # fmt: skip
            if view is None or then is None:
                return view
            effect, expect = then(view), frozenset({view.state})
        return view

    @contextmanager
    def _write(self) -> Iterator[WriteTx]:
        """One pool write transaction on a DB-API connection of the pool (store/_write.py's RawTx)."""
        with self._raw_tx("pool write (lock, compare-and-swap, audit)") as cur:
            yield RawTx(self._raw, cur)

    @contextmanager
    def _raw_tx(self, what: str, *, write: bool = True) -> Iterator[Any]:
        """One transaction on a DB-API cursor of the pool (SQLite: BEGIN IMMEDIATE when it `write`s; a read runs
        in the statement's own snapshot, without the write lock). A driver error comes out as
        SQLAlchemy's, as from the Core paths: a lost or locked database as OperationalError (what the retry
        wrappers wait out); a lost server, as the Core paths do, takes the pool's connections with it."""
        try:
            raw = self.engine.raw_connection()  # a connection made now fails with the driver's own error
        except self._dbapi.Error as exc:
            raise self._wrapped(exc, f"connect ({what})") from exc
        cur = None
        try:
            cur = raw.cursor()
            if self._raw.sqlite and write:
                cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                raw.rollback()
                raise
            raw.commit()
        except self._dbapi.Error as exc:
            if self.engine.dialect.is_disconnect(exc, raw.dbapi_connection, cur):
                raw.invalidate(exc)
                self.engine.dispose(close=False)  # the other pooled connections went with the server
            raise self._wrapped(exc, what) from exc
        finally:
            raw.close()

    def _wrapped(self, exc: Exception, what: str) -> StatementError:
        """The driver's error as SQLAlchemy's Core paths raise it: a lost or locked database as OperationalError."""
        if isinstance(exc, self._dbapi.OperationalError | self._dbapi.InterfaceError):
            return OperationalError(what, None, exc)
        return DBAPIError.instance(what, None, exc, self._dbapi.Error)

    def _audit_values(self, pool_id: str, restart_count: int, ev: EventData, audit: dict[str, Any]) -> dict[str, Any]:
        return self._event_values(pool_id, restart_count, ev, **audit)

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

    def prune_audit(
        self, older_than: datetime, *, batch: int = DEFAULT_BATCH, max_rows: int | None = None, window_s: float = 60.0
    ) -> int:
        """Retention (store/_retention.py): delete this node's audit rows older than `older_than`, `batch` per
        transaction (at most `max_rows` in this call), each batch folded into audit_rollup as it is deleted.
        `window_s`: the storm window the metrics fold with. Returns the number of rows deleted."""
        return prune_audit(self.engine, self.node_id, older_than, batch=batch, max_rows=max_rows, window_s=window_s)

    # -- leases ---------------------------------------------------------------------------------------
    def allocate_lease(self, pool_id: str, *, ttl_s: float, correlation_id: str | None = None) -> LeaseView:
        """A lease on one slot: refused while draining, not ready, or with no free slot. The pool row is locked
        (never written) so that concurrent allocations count each other's leases. Leases leave no audit row: the
        leases table is their record (`correlation_id` is accepted for the API's sake)."""
        now = self.clock.now()
        with self._tx() as s:
            row = self._locked(s, pool_id)
            if row.state == PoolState.DRAINING.value:
                raise LeaseRefused(f"pool {pool_id!r} is draining: no new leases")
            if row.state != PoolState.READY.value:
                raise LeaseRefused(f"pool {pool_id!r} is not ready (state {row.state})")
            held = self._lease_count(s, pool_id)
            if held >= row.slots_total:
                raise LeaseRefused(f"pool {pool_id!r} has no free slot ({row.slots_total} in use)")
            lease = Lease(
                id=secrets.token_hex(8), pool_id=pool_id, created_at=now, expires_at=now + timedelta(seconds=ttl_s)
            )
            s.add(lease)
            return LeaseView.of(lease)

    def release_lease(self, pool_id: str, lease_id: str, *, correlation_id: str | None = None) -> bool:
        """Release one lease. Unknown lease → False; the count never goes below zero."""
        with self._tx() as s:
            self._locked(s, pool_id)  # the pool row first, then its lease: the order of allocate and the reaper
            lease = s.get(Lease, lease_id)
            if lease is None or lease.pool_id != pool_id:
                return False
            s.delete(lease)
            return True

    def active_leases(self, pool_id: str) -> int:
        """Unknown pool → 0 (B-REG)."""
        view = self.find(pool_id)
        return view.active_leases if view is not None else 0

    def reap_expired_leases(self) -> int:
        """Delete the expired leases of this node's pools. Locks are taken pool row first, then its leases — the
        order allocate/release use — so a release racing with the reaper cannot deadlock on PostgreSQL."""
        now = self.clock.now()
        reaped = 0
        with self._sessions() as s:
            pool_ids = sorted(set(s.scalars(self._expired_leases(now))))
        for pool_id in pool_ids:
            with self._tx() as s:
                row = s.scalars(select(Pool).where(Pool.id == pool_id).with_for_update()).one_or_none()
                if row is None:
                    continue
                expired = select(Lease.id).where(Lease.pool_id == pool_id, Lease.expires_at <= now).with_for_update()
                ids = list(s.scalars(expired))
                if not ids:
                    continue  # released meanwhile
                s.execute(delete(Lease).where(Lease.id.in_(ids)))
                reaped += len(ids)
        return reaped

    @staticmethod
    def _lease_count(s: Session, pool_id: str) -> int:
        s.flush()
        return int(s.scalar(select(func.count(Lease.id)).where(Lease.pool_id == pool_id)) or 0)

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


__all__ = ["Registry"]
