"""Pool states and named groups of them. Imports nothing from poolmgr (layer 1)."""

from __future__ import annotations

from enum import Enum


class PoolState(str, Enum):
    DISCOVERED = "discovered"
    PLACED = "placed"
    PRELOADING = "preloading"
    READY = "ready"
    DRAINING = "draining"
    CRASHED = "crashed"
    BACKOFF = "backoff"
    BREAKER_OPEN = "breaker-open"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


ALL_STATES: tuple[PoolState, ...] = tuple(PoolState)
# States in which an engine process is (or should be) running for the pool.
ENGINE_STATES = frozenset({PoolState.PRELOADING, PoolState.READY, PoolState.DRAINING})


class Trigger(str, Enum):
    """Every edge of the pool FSM has a named trigger (see lifecycle/fsm.py for the table)."""

    PLACE = "place"
    START_PRELOAD = "start_preload"
    PRELOAD_OK = "preload_ok"
    PRELOAD_FAILED = "preload_failed"
    CRASH = "crash"
    BACK_OFF = "back_off"
    RETRY = "retry"
    OPEN_BREAKER = "open_breaker"
    TRIAL_START = "trial_start"
    RESET_BREAKER = "reset_breaker"
    DRAIN = "drain"
    DRAIN_DONE = "drain_done"
    RELOAD = "reload"
    ROLLBACK = "rollback"
    STOP = "stop"

    def __str__(self) -> str:
        return self.value


class DesiredState(str, Enum):
    RUNNING = "running"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


__all__ = ["ALL_STATES", "ENGINE_STATES", "DesiredState", "PoolState", "Trigger"]
