"""Engines (layer 5): what poolmgr runs in a pool and how.

- `LlamaCppAdapter` (`EngineAdapter`): the llama-server command line, /health, /slots, /props, the port from
  the log, the decisive stderr line (`classify_stderr`).
- `ProcessLauncher` (`Launcher`): spawn in an own session with the log rotated, (pid, start time) identity,
  exit seen at once through a pidfd, stop TERM → KILL of the whole process group.
- `install_llamacpp` / `list_engines` / `resolve_llama_server`: the llama-server binary cache.
- `poolmgr.engines.tiny_model.write_tiny_model` (not imported here: it needs numpy) writes a tiny real GGUF.
"""

from __future__ import annotations

from poolmgr.engines._adapter import (
    EngineAdapter,
    HealthResult,
    HealthStatus,
    SlotCounts,
    StderrReason,
    StderrVerdict,
)
from poolmgr.engines._install import (
    BUILD_NUMBER,
    InstalledEngine,
    binary_version,
    default_cache_dir,
    install_llamacpp,
    list_engines,
    resolve_llama_server,
)
from poolmgr.engines._logs import rotate_log
from poolmgr.engines._process import (
    ExitInfo,
    Launcher,
    LaunchRequest,
    ProcessLauncher,
    SpawnedEngine,
    WrapFn,
)
from poolmgr.engines.llamacpp import LlamaCppAdapter, classify_stderr, parse_listen_port
from poolmgr.errors import EngineError

_ADAPTERS: dict[str, EngineAdapter] = {"llamacpp": LlamaCppAdapter()}


def get_adapter(engine: str) -> EngineAdapter:
    """The adapter for a pool's `engine` field."""
    try:
        return _ADAPTERS[engine]
    except KeyError:
        raise EngineError(f"unknown engine {engine!r} (known: {', '.join(sorted(_ADAPTERS))})") from None


__all__ = [
    "BUILD_NUMBER",
    "EngineAdapter",
    "ExitInfo",
    "HealthResult",
    "HealthStatus",
    "InstalledEngine",
    "LaunchRequest",
    "Launcher",
    "LlamaCppAdapter",
    "ProcessLauncher",
    "SlotCounts",
    "SpawnedEngine",
    "StderrReason",
    "StderrVerdict",
    "WrapFn",
    "binary_version",
    "classify_stderr",
    "default_cache_dir",
    "get_adapter",
    "install_llamacpp",
    "list_engines",
    "parse_listen_port",
    "resolve_llama_server",
    "rotate_log",
]
