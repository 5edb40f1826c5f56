"""Engines (layer 5): what poolmgr runs in a pool and how.

- `LlamaCppAdapter` (`EngineAdapter`): the llama-server command line (serving on a unix socket), /health,
  /slots, /props, the decisive stderr line (`classify_stderr`).
- `ProcessLauncher` (`Launcher`): spawn in an own session with the log rotated, (pid, start time) identity,
  exit seen at once through a pidfd, stop TERM → KILL of the whole process group.
- `ContainerLauncher` (`Launcher`): the same, plus engines in a detached rootless podman container (their
  exit status read back from podman).
- `install_llamacpp` / `list_engines` / `resolve_llama_server`: the llama-server binary cache.
- `async_socket_client` / `socket_client`: httpx clients over an engine's unix socket.
- `read_stat` / `read_start_time` (`ProcStat`): a process's identity from /proc; `rotate_log` /
  `rotate_log_in_place`: engine logs.
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
from poolmgr.engines._container import ContainerLauncher
from poolmgr.engines._http import async_socket_client, socket_client
from poolmgr.engines._install import (
    BUILD_NUMBER,
    InstalledEngine,
    binary_version,
    default_cache_dir,
    install_llamacpp,
    list_engines,
    resolve_llama_server,
)
from poolmgr.engines._logs import rotate_log, rotate_log_in_place
from poolmgr.engines._logwatch import LogWatch, LogWatcher
from poolmgr.engines._prober import Address, HealthProber
from poolmgr.engines._process import (
    ExitInfo,
    Launcher,
    LaunchRequest,
    ProcessLauncher,
    SpawnedEngine,
    WrapFn,
)
from poolmgr.engines._procfs import ProcStat, read_start_time, read_stat
from poolmgr.engines.llamacpp import LlamaCppAdapter, classify_stderr

__all__ = [
    "BUILD_NUMBER",
    "Address",
    "ContainerLauncher",
    "EngineAdapter",
    "ExitInfo",
    "HealthProber",
    "HealthResult",
    "HealthStatus",
    "InstalledEngine",
    "LaunchRequest",
    "Launcher",
    "LlamaCppAdapter",
    "LogWatch",
    "LogWatcher",
    "ProcStat",
    "ProcessLauncher",
    "SlotCounts",
    "SpawnedEngine",
    "StderrReason",
    "StderrVerdict",
    "WrapFn",
    "async_socket_client",
    "binary_version",
    "classify_stderr",
    "default_cache_dir",
    "install_llamacpp",
    "list_engines",
    "read_start_time",
    "read_stat",
    "resolve_llama_server",
    "rotate_log",
    "rotate_log_in_place",
    "socket_client",
]
