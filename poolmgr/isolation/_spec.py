"""`IsolationSpec`: what isolation a pool's engine should get, and `build_isolation` from the pool file.

The pool file's `isolation` table may override: user, group, seccomp, landlock, memory_max ("8G" or bytes),
cpu_max (CPUs as a number, or cgroup v2's "QUOTA PERIOD"), pids_max. The values are parsed by
`poolmgr.poolsfile.parse_isolation`, which also checks the pools file: one parser for both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from poolmgr import poolsfile
from poolmgr.errors import ConfigError

DEFAULT_CPU_PERIOD_US = poolsfile.CPU_PERIOD_US
DEFAULT_NOFILE = 65_536
# (name, soft, hard). Never RLIMIT_AS: an address-space limit breaks CUDA and mmap of big models.
DEFAULT_RLIMITS: tuple[tuple[str, int, int], ...] = (("CORE", 0, 0), ("NOFILE", DEFAULT_NOFILE, DEFAULT_NOFILE))
ALLOWED_RLIMITS = frozenset({"CORE", "NOFILE", "NPROC", "FSIZE", "CPU", "STACK", "MEMLOCK", "MSGQUEUE"})
OVERRIDE_KEYS = poolsfile.ISOLATION_KEYS


@dataclass(frozen=True)
class IsolationSpec:
    """The isolation one engine gets.

    user/group None: don't switch (refused by `prepare` when poolmgr is root). There is no network field:
    engines serve on a unix socket in their workdir and get no TCP/UDP at all (seccomp and Landlock).
    """

    pool_id: str
    workdir: Path
    user: str | int | None = None
    group: str | int | None = None
    drop_caps: bool = True
    no_new_privs: bool = True
    seccomp: bool = True
    landlock: bool = True
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
            readable_paths=tuple(Path(p) for p in data.get("readable_paths", ())),
            rlimits=tuple((str(n), int(s), int(h)) for n, s, h in data.get("rlimits", DEFAULT_RLIMITS)),
            memory_max_bytes=data.get("memory_max_bytes"),
            cpu_max=(int(cpu[0]), int(cpu[1])) if cpu is not None else None,
            pids_max=data.get("pids_max"),
            clean_env=data.get("clean_env", True),
        )


def build_isolation(
    overrides: dict[str, Any],
    *,
    engine_user: str,
    workdir_root: Path,
    pool_id: str,
    readable_paths: tuple[Path, ...] | list[Path] = (),
) -> IsolationSpec:
    """The spec for one pool: poolmgr's defaults, then the pool file's `isolation` table on top (parsed by
    poolmgr.poolsfile.parse_isolation, the same code that checks the pools file)."""
    changes, problems = poolsfile.parse_isolation(overrides)
    if problems:
        key, msg = problems[0]
        raise ConfigError(f"pool {pool_id!r}: isolation.{key}: {msg}")
    spec = IsolationSpec(
        pool_id=pool_id,
        workdir=Path(workdir_root) / pool_id,
        user=engine_user or None,
        readable_paths=tuple(Path(p) for p in readable_paths),
    )
    return replace(spec, **changes)


__all__ = [
    "DEFAULT_RLIMITS",
    "OVERRIDE_KEYS",
    "IsolationSpec",
    "build_isolation",
]
