"""The exceptions of poolmgr. Imports nothing from poolmgr (layer 1).

PoolmgrError
├── ConfigError                 bad settings or pools file (CLI exit 2)
│   └── ConfigProblems          several problems found at once, one line each
├── NotFoundError               unknown pool / lease / device (HTTP 404)
├── ConflictError               refused by the pool's current state (HTTP 409)
│   ├── IllegalTransition       an FSM trigger not allowed from the current state
│   └── LeaseRefused            no lease while draining / not ready / no free slot
├── DeviceError                 bad device mask, unknown device, NVML failure
│   └── InsufficientVram        the model cannot fit the pool's devices
├── EngineError                 the engine could not be built, spawned or made ready
│   └── PreloadFailed           carries a machine-readable reason
└── IsolationError              a requested isolation layer could not be applied

A database that is away is not a poolmgr error: lifecycle/outage.py waits it out (SQLAlchemy's OperationalError).
"""

from __future__ import annotations

from collections.abc import Sequence


class PoolmgrError(Exception):
    """Root of every error poolmgr raises on purpose."""


class ConfigError(PoolmgrError):
    pass


class ConfigProblems(ConfigError):
    """Every problem found in one input (a pools file and the settings), one line each, in the order found."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


class NotFoundError(PoolmgrError):
    pass


class ConflictError(PoolmgrError):
    pass


class OwnedElsewhere(ConflictError):
    """A pool id names one pool in the whole fleet: this one belongs to another node."""

    def __init__(self, pool_id: str, owner: str) -> None:
        super().__init__(
            f"pool {pool_id!r} belongs to node {owner!r}: a node never changes another node's pool "
            f"(move it by removing it there first: `poolmgr pool rm {pool_id}` on {owner})"
        )
        self.pool_id, self.owner = pool_id, owner


class IllegalTransition(ConflictError):
    def __init__(self, pool_id: str, trigger: str, state: str) -> None:
        super().__init__(f"pool {pool_id!r}: trigger {trigger!r} is not allowed from state {state!r}")
        self.pool_id = pool_id
        self.trigger = trigger
        self.state = state


class LeaseRefused(ConflictError):
    pass


class DeviceError(PoolmgrError):
    pass


class InsufficientVram(DeviceError):
    pass


class EngineError(PoolmgrError):
    pass


class PreloadFailed(EngineError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class IsolationError(PoolmgrError):
    pass


__all__ = [
    "ConfigError",
    "ConfigProblems",
    "ConflictError",
    "DeviceError",
    "EngineError",
    "IllegalTransition",
    "InsufficientVram",
    "IsolationError",
    "LeaseRefused",
    "NotFoundError",
    "OwnedElsewhere",
    "PoolmgrError",
    "PreloadFailed",
]
