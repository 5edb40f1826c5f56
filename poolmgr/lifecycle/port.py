"""The narrow, typed port through which the parts of a pool's worker (watching a ready engine, draining it) act
on their pool: read it, fire an effect, stop its engine, wait on the injected clock. The worker (worker.py)
implements it; the parts never see the worker itself, so they import nothing of it (no cycle)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, Protocol

from poolmgr.clock import Clock
from poolmgr.lifecycle.runtime import EngineRuntime
from poolmgr.states import PoolState
from poolmgr.store import Effect, PoolView


class PoolPort(Protocol):
    @property
    def pool_id(self) -> str: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def runtime(self) -> EngineRuntime: ...

    @property
    def stopping(self) -> bool:
        """poolmgr is shutting down: a part returns at once and writes nothing more."""
        ...

    async def read(self) -> PoolView:
        """The pool row as it is now (waits out a database outage). Clears the kick first: a kick that lands
        after the read ends the next wait at once."""
        ...

    async def fire(
        self,
        effect: Effect,
        *,
        expect: Collection[PoolState],
        then: Callable[[PoolView], Effect | None] | None = None,
    ) -> PoolView:
        """Apply `effect` through the one write path, refused (IllegalTransition) unless in `expect`; `then`
        may chain further effects into the same transaction (Registry.apply)."""
        ...

    async def stop_engine(self, *, grace: bool = True) -> None:
        """Stop the engine this worker holds, if any (TERM → KILL after the stop grace; `grace=False`: KILL at
        once, for an engine that answers nothing; never a pid now owned by another program)."""
        ...

    async def wait(self, seconds: float | None) -> None:
        """Sleep on the injected clock (None: until kicked), cut short by a kick (an API request, a lease
        release, shutdown)."""
        ...

    def log_extra(self, view: PoolView, **more: Any) -> dict[str, Any]:
        """The fields of a log line about the pool (B-LOG-001..004 and the correlation id in flight)."""
        ...


__all__ = ["PoolPort"]
