"""What poolmgr needs from an engine, whatever program it is: the `EngineAdapter` protocol and its results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import NamedTuple, Protocol

import httpx

from poolmgr.poolsfile import PoolSpec


class HealthStatus(str, Enum):
    OK = "ok"  # 200: the model is loaded, the engine serves
    LOADING = "loading"  # 503 "Loading model": transient, keep polling
    REFUSED = "refused"  # nothing listens (yet, or any more)
    ERROR = "error"  # anything else: timeout, other status, unreadable body

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class HealthResult:
    status: HealthStatus
    http_status: int | None = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.status is HealthStatus.OK


class SlotCounts(NamedTuple):
    total: int
    free: int


class StderrReason(str, Enum):
    """Why an engine failed (or misbehaves), read from its stderr. Values are metric `reason` labels."""

    VRAM_OOM = "vram_oom"
    DRIVER_ERROR = "driver_error"
    MODEL_MISSING = "model_missing"
    MODEL_CORRUPT = "model_corrupt"
    MODEL_LOAD_FAILED = "model_load_failed"
    PORT_IN_USE = "port_in_use"
    BAD_ARGUMENT = "bad_argument"
    HTTP_ERROR = "http_error"
    CPU_SPILLOVER = "cpu_spillover"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class StderrVerdict:
    """The decisive stderr line: `line` as logged, `message` without the engine's time/level prefix."""

    reason: StderrReason
    line: str
    message: str


class EngineAdapter(Protocol):
    """One engine program (llama.cpp's llama-server first). Pure command building and HTTP probing:
    spawning and signalling belong to the launcher."""

    name: str
    ready_markers: tuple[bytes, ...]  # what the engine writes to its log once it serves (LogWatch wakes on it)

    def command(
        self,
        spec: PoolSpec,
        *,
        binary: Path | str,
        model_path: Path | str,
        socket_path: Path | str,
        gpu_flags: Sequence[str] = (),
    ) -> list[str]: ...

    async def probe_health(self, client: httpx.AsyncClient, base_url: str, timeout: float) -> HealthResult: ...

    async def fetch_slots(
        self, client: httpx.AsyncClient, base_url: str, timeout: float, headers: Mapping[str, str] | None = None
    ) -> SlotCounts: ...

    async def fetch_version(
        self, client: httpx.AsyncClient, base_url: str, timeout: float, headers: Mapping[str, str] | None = None
    ) -> str: ...

    def classify_stderr(self, text: str, *, expect_gpu: bool = True) -> StderrVerdict | None: ...


__all__ = [
    "EngineAdapter",
    "HealthResult",
    "HealthStatus",
    "SlotCounts",
    "StderrReason",
    "StderrVerdict",
]
