"""`IsolationSpec`: what isolation a pool's engine should get, and `build_isolation` from the pool file.

The pool file's `isolation` table may override: user, group, seccomp, landlock, memory_max ("8G" or bytes),
cpu_max (CPUs as a number, or cgroup v2's "QUOTA PERIOD" / "max PERIOD"), pids_max.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from poolmgr.errors import ConfigError

DEFAULT_CPU_PERIOD_US = 100_000
DEFAULT_NOFILE = 65_536
# (name, soft, hard). Never RLIMIT_AS: an address-space limit breaks CUDA and mmap of big models.
DEFAULT_RLIMITS: tuple[tuple[str, int, int], ...] = (("CORE", 0, 0), ("NOFILE", DEFAULT_NOFILE, DEFAULT_NOFILE))
ALLOWED_RLIMITS = frozenset({"CORE", "NOFILE", "NPROC", "FSIZE", "CPU", "STACK", "MEMLOCK", "MSGQUEUE"})
OVERRIDE_KEYS = ("user", "group", "seccomp", "landlock", "memory_max", "cpu_max", "pids_max")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class IsolationSpec:
    """The isolation one engine gets.

    user/group None: don't switch (refused by `prepare` when poolmgr is root). bind_port None or 0: the
    engine may bind an ephemeral port only (where Landlock can say so).
    """

    pool_id: str
    workdir: Path
    user: str | int | None = None
    group: str | int | None = None
    drop_caps: bool = True
    no_new_privs: bool = True
    seccomp: bool = True
    landlock: bool = True
    bind_port: int | None = None
    readable_paths: tuple[Path, ...] = ()
    rlimits: tuple[tuple[str, int, int], ...] = DEFAULT_RLIMITS
    memory_max_bytes: int | None = None
    cpu_max: tuple[int, int] | None = None
    pids_max: int | None = None
    clean_env: bool = True

    def __post_init__(self) -> None:
        for name, _soft, _hard in self.rlimits:
            if name == "AS":
                raise ConfigError(f"pool {self.pool_id!r}: RLIMIT_AS is refused: it breaks CUDA and mmap")
            if name not in ALLOWED_RLIMITS:
                raise ConfigError(f"pool {self.pool_id!r}: unknown rlimit {name!r}")
        if self.bind_port is not None and not 0 <= self.bind_port < 65536:
            raise ConfigError(f"pool {self.pool_id!r}: bind_port {self.bind_port} is not a TCP port")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["workdir"] = str(self.workdir)
        data["readable_paths"] = [str(p) for p in self.readable_paths]
        data["rlimits"] = [list(r) for r in self.rlimits]
        data["cpu_max"] = list(self.cpu_max) if self.cpu_max is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IsolationSpec:
        cpu = data.get("cpu_max")
        return cls(
            pool_id=data["pool_id"],
            workdir=Path(data["workdir"]),
            user=data.get("user"),
            group=data.get("group"),
            drop_caps=data.get("drop_caps", True),
            no_new_privs=data.get("no_new_privs", True),
            seccomp=data.get("seccomp", True),
            landlock=data.get("landlock", True),
            bind_port=data.get("bind_port"),
            readable_paths=tuple(Path(p) for p in data.get("readable_paths", ())),
            rlimits=tuple((str(n), int(s), int(h)) for n, s, h in data.get("rlimits", DEFAULT_RLIMITS)),
            memory_max_bytes=data.get("memory_max_bytes"),
            cpu_max=(int(cpu[0]), int(cpu[1])) if cpu is not None else None,
            pids_max=data.get("pids_max"),
            clean_env=data.get("clean_env", True),
        )


def _bad(pool_id: str, key: str, msg: str) -> ConfigError:
    return ConfigError(f"pool {pool_id!r}: isolation.{key}: {msg}")


def parse_memory(pool_id: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and (m := _SIZE_RE.match(value)):
        unit = (m.group(2) or "b")[0].lower()
        size: int = int(m.group(1)) * 1024 ** "bkmgt".index(unit)
        if size > 0:
            return size
    raise _bad(pool_id, "memory_max", f'must be a positive byte count or a size like "8G", got {value!r}')


def parse_cpu_max(pool_id: str, value: Any) -> tuple[int, int]:
    """CPUs as a number (2.5 → 250000 µs per 100000 µs), or "QUOTA PERIOD" in µs as cgroup v2 writes it."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return max(1000, round(value * DEFAULT_CPU_PERIOD_US)), DEFAULT_CPU_PERIOD_US
    if isinstance(value, str):
        parts = value.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit() and int(parts[0]) and int(parts[1]):
            return int(parts[0]), int(parts[1])
    raise _bad(pool_id, "cpu_max", f'must be a number of CPUs or "QUOTA PERIOD" in microseconds, got {value!r}')


def _user_or_group(pool_id: str, key: str, value: Any) -> str | int:
    if isinstance(value, str) and value.strip():
        return int(value) if value.isdigit() else value.strip()
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise _bad(pool_id, key, f"must be a name or a numeric id, got {value!r}")


def _flag(pool_id: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(pool_id, key, f"must be true or false, got {value!r}")
    return value


def _pids(pool_id: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _bad(pool_id, "pids_max", f"must be a positive integer, got {value!r}")
    return value


def build_isolation(
    overrides: dict[str, Any],
    *,
    engine_user: str,
    workdir_root: Path,
    pool_id: str,
    bind_port: int | None,
    readable_paths: tuple[Path, ...] | list[Path] = (),
) -> IsolationSpec:
    """The spec for one pool: poolmgr's defaults, then the pool file's `isolation` table on top."""
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise ConfigError(f"pool {pool_id!r}: isolation.{unknown[0]}: unknown key (known: {', '.join(OVERRIDE_KEYS)})")
    spec = IsolationSpec(
        pool_id=pool_id,
        workdir=Path(workdir_root) / pool_id,
        user=engine_user or None,
        bind_port=bind_port,
        readable_paths=tuple(Path(p) for p in readable_paths),
    )
    changes: dict[str, Any] = {}
    if "user" in overrides:
        changes["user"] = _user_or_group(pool_id, "user", overrides["user"])
    if "group" in overrides:
        changes["group"] = _user_or_group(pool_id, "group", overrides["group"])
    for key in ("seccomp", "landlock"):
        if key in overrides:
            changes[key] = _flag(pool_id, key, overrides[key])
    if "memory_max" in overrides:
        changes["memory_max_bytes"] = parse_memory(pool_id, overrides["memory_max"])
    if "cpu_max" in overrides:
        changes["cpu_max"] = parse_cpu_max(pool_id, overrides["cpu_max"])
    if "pids_max" in overrides:
        changes["pids_max"] = _pids(pool_id, overrides["pids_max"])
    return replace(spec, **changes)


__all__ = [
    "DEFAULT_RLIMITS",
    "OVERRIDE_KEYS",
    "IsolationSpec",
    "build_isolation",
    "parse_cpu_max",
    "parse_memory",
]
