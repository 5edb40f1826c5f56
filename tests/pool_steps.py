"""A representative real effect for every FSM trigger, to walk a pool through states in tests (through the one
write path, Registry.apply, exactly as the product does)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from poolmgr.engines import ExitInfo
from poolmgr.errors import PreloadFailed
from poolmgr.inflight import Drain, Reload
from poolmgr.lifecycle import effects as fx
from poolmgr.lifecycle.fsm import fire
from poolmgr.lifecycle.placing import CPU_PLACEMENT
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import Trigger
from poolmgr.store import Effect, PoolColumns, PoolView, Registry

T = Trigger
_AT = datetime(2026, 1, 1, tzinfo=UTC)
_RELOAD = Reload("/new.gguf", PoolSpec(id="p", model="/m.gguf"), _AT, 1000, "corr-1")

EFFECT_FOR: dict[Trigger, Callable[[], Effect]] = {
    T.PLACE: fx.Placed,
    T.START_PRELOAD: lambda: fx.PreloadStarted(CPU_PLACEMENT),
    T.PRELOAD_OK: lambda: fx.PreloadSucceeded(fx.ReadyInfo("http://127.0.0.1:9", "b11434-test", 2)),
    T.PRELOAD_FAILED: lambda: fx.StartFailed(PreloadFailed("exit", "engine exited with code 1 during preload")),
    T.CRASH: lambda: fx.Crashed(
        PreloadFailed("signal", "engine killed by signal 9 during serving"), ExitInfo(signal=9)
    ),
    T.BACK_OFF: lambda: fx.BackedOff(5, _AT, "backoff step 1"),
    T.RETRY: fx.Retried,
    T.OPEN_BREAKER: lambda: fx.BreakerOpened(_AT, 300.0, "5 consecutive failed starts"),
    T.TRIAL_START: fx.TrialStarted,
    T.RESET_BREAKER: lambda: fx.BreakerReset("corr-1"),
    T.DRAIN: lambda: fx.DrainRequested(Drain(_AT, 1000, "corr-1")),
    T.DRAIN_DONE: lambda: fx.Drained({"outcome": "drained"}),
    T.RELOAD: lambda: fx.ReloadStarted(_RELOAD, {"outcome": "drained"}),
    T.ROLLBACK: lambda: fx.RolledBack(_RELOAD),
    T.STOP: fx.Stopped,
}


@dataclass(frozen=True)
class Seeded(Effect):
    """Columns as an earlier poolmgr left them, written through the same write path (tests only)."""

    values: dict[str, Any]

    def columns(self, before: PoolView, now: datetime) -> PoolColumns:
        return cast(PoolColumns, dict(self.values))


def seed(registry: Registry, pool_id: str, **values: Any) -> PoolView:
    return fire(registry, pool_id, Seeded(values))


def step(registry: Registry, pool_id: str, *triggers: Trigger) -> PoolView:
    """Fire a representative effect for each trigger in turn; the pool as it then is."""
    view = registry.get(pool_id)
    for trigger in triggers:
        view = fire(registry, pool_id, EFFECT_FOR[trigger]())
    return view


__all__ = ["EFFECT_FOR", "Seeded", "seed", "step"]
