"""The reconciler: one PoolWorker task per pool of this node, plus housekeeping (leases, heartbeat, devices).

Database calls go through RetryingRegistry (outage.py): in threads, retried while the database is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from datetime import timedelta

from poolmgr.devices import Inventory, backend_from_env, discover
from poolmgr.engines import SpawnedEngine, rotate_log_in_place
from poolmgr.errors import IllegalTransition, NotFoundError, PreloadFailed
from poolmgr.lifecycle.desired import Applied, apply_pools
from poolmgr.lifecycle.effects import EngineForgotten, Stopped, VramRefreshed, adoption_event
from poolmgr.lifecycle.outage import RetryingRegistry
from poolmgr.lifecycle.placing import CPU_PLACEMENT, Placement, gpu_problem, place
from poolmgr.lifecycle.policy import RestartPolicy
from poolmgr.lifecycle.runtime import EngineRuntime
from poolmgr.lifecycle.worker import PoolWorker
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig
from poolmgr.states import ENGINE_STATES, PoolState
from poolmgr.store import Beat, PoolView, Registry

log = logging.getLogger("poolmgr.reconciler")
_AUDIT_PRUNE_S = 3600.0  # audit retention runs hourly (POOL_MANAGERD_AUDIT_RETENTION_DAYS) ...
_AUDIT_PRUNE_ROWS = 1000  # ... at most this many rows a round, so the heartbeat never waits long
_LOG_ROTATE_CHECK_S = 10.0  # engine logs are checked for rotation this often (a stat per pool)
_SHUTDOWN_DB_WAIT_S = 10.0  # at shutdown, how long a database call may wait before poolmgr exits without it


class Reconciler:
    def __init__(
        self,
        cfg: PoolManagerConfig,
        registry: Registry,
        *,
        runtime: EngineRuntime | None = None,
        policy: RestartPolicy | None = None,
        inventory: Callable[[], Inventory] | None = None,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.store = RetryingRegistry(registry)
        self.runtime = runtime or EngineRuntime(cfg, clock=registry.clock)
        self.policy = policy or RestartPolicy(cfg)
        self._inventory_fn = inventory or (lambda: discover(backend_from_env(cfg.fake_nvml)))
        self.inventory: Inventory = Inventory()
        self.workers: dict[str, PoolWorker] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._housekeeping: asyncio.Task[None] | None = None
        self._generation = 0  # the node's desired_generation last acted on
        self._sync_wanted = asyncio.Event()
        self.stopping = False

    # -- start ----------------------------------------------------------------------------------------
    async def start(self, specs: Sequence[PoolSpec]) -> None:
        """Register every pool in one transaction, look at /proc once for engines of a previous poolmgr, re-adopt
        every live recorded engine in one pass (one audit transaction), then start all workers at once."""
        self._generation = (await self.store.call(self._heartbeat)).desired_generation
        self.inventory = await asyncio.to_thread(self._inventory_fn)
        await self._store_devices()
        await self.apply(specs)
        views = await self.store.call(self.registry.pools, node_id=self.cfg.node_id)
        await asyncio.to_thread(self.runtime.snapshot_unrecorded)
        adopted = await self._adopt_all(views)
        for view in views:
            self._start_worker(view.id, adopted.get(view.id))
        self._housekeeping = asyncio.create_task(self._housekeep(), name="housekeeping")

    async def apply(self, specs: Sequence[PoolSpec]) -> Applied:
        """The pools file's pools as this node's desired file pools (at start, on SIGHUP): what it adds, changes
        and removes is logged; workers start for new pools at once (OwnedElsewhere: nothing written)."""
        done: Applied = await self.store.call(apply_pools, self.registry, list(specs))
        if done.added or done.changed or done.removed:
            log.info("pools file applied: %s", "; ".join(done.lines()))
        if self._housekeeping is not None:  # running: new pools need workers now, changed ones a look
            await self._sync_desired()
        return done

    def _heartbeat(self) -> Beat:
        return self.registry.heartbeat_node(socket.gethostname(), grace_ms=self.cfg.node_grace_ms)

    async def _sync_desired(self) -> None:
        """This node's desired pools changed (another process, the API): start workers for pools that have none
        and let every worker look at its row (a removal, a new spec)."""
        self._sync_wanted.clear()
        for view in await self.store.call(self.registry.pools, node_id=self.cfg.node_id):
            if view.id not in self._tasks or self._tasks[view.id].done():
                self._start_worker(view.id)
        for worker in self.workers.values():
            worker.kick()

    async def _adopt_all(self, views: Sequence[PoolView]) -> dict[str, SpawnedEngine]:
        """The engines that outlived the previous poolmgr, re-adopted together (same pid AND start time): their
        handles for the workers, and one `adopted` audit row each, written in one transaction."""
        handles: dict[str, SpawnedEngine] = {}
        for view in views:
            pid, start = view.pid, view.pid_start_time
            if view.state in ENGINE_STATES and pid and start and self.runtime.launcher.is_alive(pid, start):
                whole_run = view.state is PoolState.PRELOADING
                handles[view.id] = await asyncio.to_thread(self.runtime.adopted, view.id, pid, start, whole_run)
        notes = [(pool_id, adoption_event(h.pid, h.start_time)) for pool_id, h in handles.items()]
        if notes:
            await self.store.call(self.registry.note_all, notes)
        for view in views:
            if view.id in handles:
                log.info(
                    "pool %s: adopted running engine pid %s (%s)", view.id, view.pid, view.state.value,
                    extra={"pool_id": view.id, "pid": view.pid},
                )  # fmt: skip
        return handles

    def _start_worker(self, pool_id: str, adopted: SpawnedEngine | None = None) -> None:
        worker = PoolWorker(
            pool_id, store=self.store, runtime=self.runtime, policy=self.policy, place=self._place,
            gpu_check=_NvmlCheck(self), adopted=adopted,
        )  # fmt: skip
        self.workers[pool_id] = worker
        self._tasks[pool_id] = asyncio.create_task(self._run_worker(worker), name=f"pool:{pool_id}")

    async def _run_worker(self, worker: PoolWorker) -> None:
        while not self.stopping:
            try:
                await worker.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "pool %s worker failed; restarting it in 1 s", worker.pool_id, extra={"pool_id": worker.pool_id}
                )
                await asyncio.sleep(1.0)

    def kick(self, pool_id: str) -> None:
        worker = self.workers.get(pool_id)
        task = self._tasks.get(pool_id)
        if worker is not None and task is not None and not task.done():
            worker.kick()
        else:  # a pool this serve has no worker for (just added through the API): look at the node's pools now
            self._sync_wanted.set()

    # -- placement ------------------------------------------------------------------------------------
    def _place(self, view: PoolView) -> Placement:
        if view.spec.is_cpu:
            return CPU_PLACEMENT  # nothing to share: no read of the other pools (N pools starting: not N² rows)
        others = [
            (p.id, p.device_mask, p.spec.share_devices)
            for p in self.registry.pools(node_id=self.cfg.node_id)
            if p.id != view.id and (p.state in ENGINE_STATES or p.state is PoolState.PLACED)
        ]
        return place(view.spec, self.inventory, others=others)

    def _gpu_applies(self, view: PoolView) -> bool:
        return not view.spec.is_cpu or self.inventory.available

    def _gpu_check(self, view: PoolView, pid: int) -> PreloadFailed | None:
        """NVML's view of a running engine (a fresh snapshot: which processes are on which GPU)."""
        uuids = list((view.split_plan or {}).get("device_uuids", []))
        if view.spec.is_cpu and not self.inventory.available:
            return None  # no driver: a CPU pool cannot be on a GPU
        inventory = self._inventory_fn()
        if inventory.available:
            self.inventory = inventory
        return gpu_problem(view.spec, uuids, pid, inventory)

    async def _store_devices(self) -> None:
        rows = [
            {"uuid": d.uuid, "idx": d.index, "name": d.name, "pci_bus_id": d.pci_bus_id,
             "compute_capability": f"{d.compute_capability[0]}.{d.compute_capability[1]}",
             "vram_total_bytes": d.vram_total_bytes, "vram_free_bytes": d.vram_free_bytes, "is_mig": d.is_mig}
            for d in self.inventory.devices
        ]  # fmt: skip
        if rows:
            await self.store.call(self.registry.upsert_devices, rows)

    # -- housekeeping ---------------------------------------------------------------------------------
    async def _housekeep(self) -> None:
        """Once a second: expired leases, the node's heartbeat (its only steady write); less often: devices,
        engine logs, and hourly the audit retention. Nothing here writes unless something changed (or aged), but
        for the heartbeat."""
        timer = asyncio.get_running_loop().time
        last = {"devices": timer(), "logs": timer(), "audit": timer() - _AUDIT_PRUNE_S}
        while not self.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sync_wanted.wait(), self.cfg.node_heartbeat_ms / 1000.0)
            with contextlib.suppress(Exception):
                beat = await self.store.call(self._heartbeat)
                if beat.desired_generation != self._generation or self._sync_wanted.is_set():
                    self._generation = beat.desired_generation
                    await self._sync_desired()
                if beat.expired_leases:
                    reaped: int = await self.store.call(self.registry.reap_expired_leases)
                    for pool_id in self.workers if reaped else ():
                        self.kick(pool_id)
                if timer() - last["devices"] >= self.cfg.vram_refresh_secs and self.inventory.available:
                    last["devices"] = timer()
                    self.inventory = await asyncio.to_thread(self._inventory_fn)
                    await self._store_devices()
                    await self._refresh_pool_vram()
                if timer() - last["logs"] >= _LOG_ROTATE_CHECK_S:
                    last["logs"] = timer()
                    await asyncio.to_thread(self._rotate_engine_logs)
                if timer() - last["audit"] >= _AUDIT_PRUNE_S:  # retention: hourly, on every round while behind
                    cutoff = self.registry.clock.now() - timedelta(days=self.cfg.audit_retention_days)
                    pruned = await self.store.call(
                        self.registry.prune_audit, cutoff, max_rows=_AUDIT_PRUNE_ROWS,
                        window_s=float(self.cfg.restart_window_secs),
                    )  # fmt: skip
                    last["audit"] = timer() - (_AUDIT_PRUNE_S if pruned >= _AUDIT_PRUNE_ROWS else 0.0)

    def _rotate_engine_logs(self) -> None:
        for pool_id in self.workers:
            rotate_log_in_place(self.runtime.log_path(pool_id))

    async def _refresh_pool_vram(self) -> None:
        """The pools' VRAM fields follow the devices they hold (B-REG: VRAM total/free of its devices)."""
        by_uuid = {d.uuid: d for d in self.inventory.devices}
        for view in await self.store.call(self.registry.pools, node_id=self.cfg.node_id):
            devs = [by_uuid[u] for u in (view.split_plan or {}).get("device_uuids", []) if u in by_uuid]
            if not devs:
                continue
            total, free = sum(d.vram_total_bytes for d in devs), sum(d.vram_free_bytes for d in devs)
            if (total, free) != (view.vram_total_bytes, view.vram_free_bytes):
                await self.store.apply(view.id, VramRefreshed(total, free))

    # -- shutdown -------------------------------------------------------------------------------------
    async def shutdown(self, *, keep_engines: bool) -> None:
        """Stop the workers; then stop every engine (default) or leave them serving for the next poolmgr."""
        self.stopping = True
        for worker in self.workers.values():
            worker.stop()
        tasks = [*self._tasks.values(), *([self._housekeeping] if self._housekeeping else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(w.settle(_SHUTDOWN_DB_WAIT_S) for w in self.workers.values()))
        if keep_engines:
            for worker in self.workers.values():
                if worker.engine is not None:
                    log.info(
                        "pool %s: engine pid %s keeps running for the next poolmgr", worker.pool_id,
                        worker.engine.pid, extra={"pool_id": worker.pool_id, "pid": worker.engine.pid},
                    )  # fmt: skip
        else:
            await asyncio.gather(*(self._stop_pool(pid) for pid in self.workers), return_exceptions=True)
        await self.runtime.aclose()

    async def _stop_pool(self, pool_id: str) -> None:
        worker = self.workers[pool_id]
        try:
            view = await asyncio.wait_for(self.store.get(pool_id), _SHUTDOWN_DB_WAIT_S)
        except NotFoundError:
            return
        except TimeoutError:
            log.error(
                "pool %s: the database is away: stopping its engine unrecorded", pool_id, extra={"pool_id": pool_id}
            )
            await worker.stop_engine()
            return
        await worker.kill_recorded(view)
        await worker.stop_strays(view)
        try:
            await asyncio.wait_for(self._record_stop(pool_id), _SHUTDOWN_DB_WAIT_S)
        except TimeoutError:
            log.error("pool %s: the database is away: its stop is not recorded", pool_id, extra={"pool_id": pool_id})

    async def _record_stop(self, pool_id: str) -> None:
        try:
            await self.store.apply(pool_id, Stopped("poolmgr shutdown"))
        except IllegalTransition:
            await self.store.apply(pool_id, EngineForgotten())


class _NvmlCheck:
    """The reconciler's NVML verdict on a running engine, as the ready watch asks it (watch.GpuCheck)."""

    def __init__(self, rec: Reconciler) -> None:
        self._rec = rec

    def applies(self, view: PoolView) -> bool:
        return self._rec._gpu_applies(view)

    def __call__(self, view: PoolView, pid: int) -> PreloadFailed | None:
        return self._rec._gpu_check(view, pid)


__all__ = ["Reconciler"]
