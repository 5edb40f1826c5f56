"""Requests to a pool through the node's data plane (B-PROXY): whether one may go to the engine now, how many are
in flight, and what happened to them.

Each pool has one `PoolTraffic`, kept by the node's `TrafficBoard` and set from the pool's row by `follow` each time
its worker reads or writes it (and by the API right after an operation it accepted):

- OPEN (ready): a request goes to the engine at once;
- QUEUE (starting, preloading, backing off, reloading): it waits — up to the queue timeout — for the pool to open,
  then goes to the engine that is serving by then (a reload keeps the pool's address: zero failed requests);
- REFUSE (draining, breaker open, stopped): 503 at once with the reason (and `Retry-After` where waiting helps).

A stopped pool with `load_on_demand` is started by the first request that finds it stopped (the board's `starter`,
given by the daemon: an operator's preload), and that request and those that follow wait as for any starting
pool; an idle unload of such a pool (its Drain's reason IDLE_UNLOAD) queues the requests that arrive meanwhile,
which start it again once it has stopped. A breaker-open pool is never started by a request.

A drain waits until `in_flight` and the leases reach 0 (`Drainer`), and at its deadline `cut()` cancels the
requests still running. Everything here runs on the event loop that serves the API and drives the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from poolmgr.correlation import CORRELATION_ID
from poolmgr.engines.llamacpp import api_key_headers
from poolmgr.inflight import IDLE_UNLOAD, Drain, Reload, Rollback
from poolmgr.states import DesiredState, PoolState
from poolmgr.store import PoolView

_T = TypeVar("_T")
# Request duration and time to first byte, in seconds: a 1-token answer (ms) to a long generation (minutes).
BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
DRAIN_RETRY_AFTER_S = 5
# Start a stopped pool for a request: (pool id, the request's correlation id); raises when it cannot.
Starter = Callable[[str, str | None], Awaitable[None]]


class Mode(str, Enum):
    OPEN = "open"
    QUEUE = "queue"
    REFUSE = "refuse"


class Refused(Exception):
    """A request the pool does not take now: HTTP `status` with `message` (and `Retry-After` when set)."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass
class Histogram:
    """Cumulative-ready bucket counts (Prometheus `le` buckets), sum and count."""

    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.total += seconds
        self.count += 1
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
                break


@dataclass
class RequestStats:
    """Running totals of one pool's proxied requests (since this poolmgr started)."""

    by_code: dict[int, int] = field(default_factory=dict)
    answered: int = 0  # the sum of by_code (read without a lock by the engine-metrics thread)
    duration: Histogram = field(default_factory=Histogram)
    first_byte: Histogram = field(default_factory=Histogram)
    version: int = 0  # moved last by each `record`: a reader that sees it has seen that record whole


class Ticket:
    """One admitted request: runs its forwarding as a task that a drain's deadline can cut."""

    def __init__(self, traffic: PoolTraffic) -> None:
        self._traffic = traffic
        self.cut = False

    async def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Await `coro` as a task of its own; raises asyncio.CancelledError in the caller only if the caller
        itself is cancelled — a cut raises `Cut` instead."""
        task = asyncio.ensure_future(coro)
        self._traffic.running[task] = self
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if self.cut:
                raise Cut() from None
            task.cancel()
            raise
        finally:
            self._traffic.running.pop(task, None)


class Cut(Exception):
    """The request was cut: its pool's drain reached its deadline."""


class PoolTraffic:
    def __init__(
        self,
        pool_id: str,
        *,
        queue_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        activity_clock: Callable[[], float] | None = None,
    ) -> None:
        self.pool_id = pool_id
        self.queue_timeout_s = queue_timeout_s
        self.clock = clock
        # The lifecycle's clock (its idle_unload_s is timed on it): when a request last began or ended.
        self.activity_clock = activity_clock or clock
        self.last_active = self.activity_clock()
        self.startable = False  # stopped, and `load_on_demand`: a request starts it (see `starter`)
        self.starter: Starter | None = None
        self._starting: asyncio.Future[None] | None = None
        self.mode = Mode.QUEUE
        self.reason = "starting"
        self.retry_after_s: int | None = None
        self.in_flight = 0
        self.queued = 0
        self.stats = RequestStats()
        self.names: frozenset[str] = frozenset({pool_id})  # what a request's `model` may call it
        self.served_name = pool_id  # what /v1/models lists for it
        self.socket_path = ""  # the engine's unix socket
        # Headers every request to the engine carries (its --api-key; the client's own Authorization is poolmgr's).
        self.engine_headers: list[tuple[bytes, bytes]] = []
        self.running: dict[asyncio.Future[Any], Ticket] = {}
        self._changed = asyncio.Condition()

    def set(self, mode: Mode, reason: str, retry_after_s: int | None = None) -> None:
        if (mode, reason, retry_after_s) == (self.mode, self.reason, self.retry_after_s):
            return
        self.mode, self.reason, self.retry_after_s = mode, reason, retry_after_s
        with contextlib.suppress(RuntimeError):  # no running loop (a test building a board by hand)
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def left_open(self, timeout_s: float) -> bool:
        """Wait until the pool is no longer open (its engine was seen gone), at most `timeout_s`: whether it left."""
        deadline = self.clock() + timeout_s
        while self.mode is Mode.OPEN:
            left = deadline - self.clock()
            if left <= 0:
                return False
            await self._next_change(left)
        return True

    async def _next_change(self, timeout_s: float) -> None:
        """Until the gate changes (`set`) or `timeout_s` passed, whichever comes first."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)

    @property
    def takes_requests(self) -> bool:
        """Open, queueing them, or stopped but started by a request (load_on_demand)."""
        return self.mode is not Mode.REFUSE or self.startable

    async def wait_open(self) -> None:
        """Until the pool is open; raises Refused when it refuses, or when it stayed queued too long. A stopped
        pool with load_on_demand is started (once, however many requests find it stopped) and waited for."""
        deadline = self.clock() + self.queue_timeout_s
        started = False
        self.queued += 1
        try:
            while self.mode is not Mode.OPEN:
                if self.mode is Mode.REFUSE:
                    if started or not self.startable:
                        raise Refused(503, f"pool {self.pool_id!r} is {self.reason}", self.retry_after_s)
                    started = True
                    await self._start(deadline)
                    continue
                left = deadline - self.clock()
                if left <= 0:
                    raise Refused(503, f"pool {self.pool_id!r} was not ready within {self.queue_timeout_s:g} s "
                                       f"({self.reason})", 1)  # fmt: skip
                await self._next_change(left)
        finally:
            self.queued -= 1

    async def _start(self, deadline: float) -> None:
        """Ask for the pool to start (load_on_demand): one ask for all the requests that find it stopped together;
        Refused when it cannot be started."""
        if self.starter is None:
            raise Refused(503, f"pool {self.pool_id!r} is {self.reason}", self.retry_after_s)
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self.starter(self.pool_id, CORRELATION_ID.get()))
        try:
            await asyncio.wait_for(asyncio.shield(self._starting), max(0.0, deadline - self.clock()))
        except TimeoutError:
            why = f"pool {self.pool_id!r} could not be started within {self.queue_timeout_s:g} s"
            raise Refused(503, why, 1) from None
        except Exception as exc:  # a breaker opened, a drain began, the database is away: say so
            why = f"pool {self.pool_id!r} is {self.reason} and could not be started: {exc}"
            raise Refused(503, why, 1) from None

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[Ticket]:
        """Wait until the pool takes the request (see `wait_open`); in flight until the block ends."""
        await self.wait_open()
        self.in_flight += 1
        self.last_active = self.activity_clock()
        try:
            yield Ticket(self)
        finally:
            self.in_flight -= 1
            self.last_active = self.activity_clock()

    def record(self, status: int, duration_s: float, first_byte_s: float | None) -> None:
        stats = self.stats
        stats.by_code[status] = stats.by_code.get(status, 0) + 1
        stats.answered += 1
        stats.duration.observe(duration_s)
        if first_byte_s is not None:
            stats.first_byte.observe(first_byte_s)
        stats.version += 1

    def cut(self) -> int:
        """Cancel every request still running (a drain's deadline passed); how many were cut."""
        for task, ticket in list(self.running.items()):
            ticket.cut = True
            task.cancel()
        return len(self.running)


class TrafficBoard:
    """The node's pools' traffic, by pool id."""

    def __init__(
        self,
        *,
        queue_timeout_s: float,
        socket_for: Callable[[str], str],
        clock: Callable[[], float] = time.monotonic,
        activity_clock: Callable[[], float] | None = None,
    ) -> None:
        self.queue_timeout_s = queue_timeout_s
        self.socket_for = socket_for
        self.clock = clock
        self.activity_clock = activity_clock or clock
        self.starter: Starter | None = None  # set by the daemon: starts a stopped pool with load_on_demand
        self.pools: dict[str, PoolTraffic] = {}
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (on the event loop; it must not block) whenever a pool's gate changes."""
        self._listeners.append(listener)

    def get(self, pool_id: str) -> PoolTraffic:
        traffic = self.pools.get(pool_id)
        if traffic is None:
            traffic = self.pools[pool_id] = PoolTraffic(
                pool_id, queue_timeout_s=self.queue_timeout_s, clock=self.clock, activity_clock=self.activity_clock
            )
            traffic.socket_path = self.socket_for(pool_id)
            traffic.starter = self.starter
        return traffic

    def follow(self, view: PoolView) -> None:
        """Set the pool's gate and names from its row (see the module docstring)."""
        traffic = self.get(view.id)
        traffic.names = frozenset({view.id, view.spec.served_name})
        traffic.served_name = view.spec.served_name
        traffic.engine_headers = [
            (k.lower().encode(), v.encode()) for k, v in api_key_headers(view.spec.extra_args).items()
        ]
        before = (traffic.mode, traffic.reason)
        mode, reason, retry_after_s = gate_for(view)
        traffic.startable = mode is Mode.REFUSE and startable_on_demand(view)
        traffic.starter = self.starter
        traffic.set(mode, reason, retry_after_s)
        if (traffic.mode, traffic.reason) != before:
            for listener in self._listeners:
                listener()

    def serving(self, model: str) -> list[PoolTraffic]:
        """The pools a request for `model` may go to (its pool id or served model name), open ones first."""
        found = [t for t in self.pools.values() if model in t.names and t.takes_requests]
        if not found:
            found = [t for t in self.pools.values() if model in t.names]
        return found

    def forget(self, pool_id: str) -> None:
        traffic = self.pools.pop(pool_id, None)
        if traffic is not None:
            traffic.startable = False
            traffic.set(Mode.REFUSE, "removed")


def gate_for(view: PoolView) -> tuple[Mode, str, int | None]:
    state, op = view.state, view.pending_op
    if state is PoolState.READY:
        return Mode.OPEN, "ready", None
    if state is PoolState.BREAKER_OPEN:
        why = f": {view.last_error}" if view.last_error else ""
        return Mode.REFUSE, f"breaker-open (restarts stopped{why}; POST /pools/{view.id}/breaker/reset)", None
    if state is PoolState.DRAINING:
        if isinstance(op, Reload):
            return Mode.QUEUE, f"reloading to {op.model}", None
        if isinstance(op, Drain) and op.reason == IDLE_UNLOAD and view.spec.load_on_demand:
            return Mode.QUEUE, "unloading after being idle (a request starts it again)", None
        return Mode.REFUSE, "draining", DRAIN_RETRY_AFTER_S
    if view.desired_state is DesiredState.STOPPED:
        return Mode.REFUSE, "stopped", None
    # desired running from here on: a stopped pool is about to be placed (a preload was accepted): it queues
    if isinstance(op, Reload | Rollback):
        return Mode.QUEUE, f"{op.kind} to {op.model}", None
    words = {PoolState.CRASHED: "restarting after a crash", PoolState.BACKOFF: "backing off before a restart",
             PoolState.STOPPED: "starting"}  # fmt: skip
    return Mode.QUEUE, words.get(state, state.value), None


def startable_on_demand(view: PoolView) -> bool:
    """Whether a request may start the pool: it has load_on_demand and is stopped (or stopping) — never while its
    breaker is open or a drain runs (request_preload refuses those too)."""
    return view.spec.load_on_demand and view.state not in (PoolState.BREAKER_OPEN, PoolState.DRAINING)


__all__ = [
    "BUCKETS",
    "Cut",
    "Histogram",
    "Mode",
    "PoolTraffic",
    "Refused",
    "RequestStats",
    "Starter",
    "Ticket",
    "TrafficBoard",
    "gate_for",
    "startable_on_demand",
]
