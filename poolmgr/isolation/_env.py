"""The engine's environment: a short allow-list from poolmgr's own, the caller's engine env, never a secret."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

_KEEP_NAMES = frozenset({"PATH", "LANG", "LANGUAGE", "TZ"})
_KEEP_PREFIXES = ("LC_", "CUDA_", "NVIDIA_")
_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY")
# These act inside the trampoline's interpreter, which still runs as root before any layer applies.
_NEVER_NAMES = frozenset({"LD_PRELOAD", "LD_AUDIT"})
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def is_secret(name: str) -> bool:
    """True for names an engine must never see: poolmgr's own settings and anything secret-looking."""
    upper = name.upper()
    if upper.startswith("POOL_MANAGERD_"):
        return True
    if upper.startswith("CUDA_"):
        return False
    return any(word in upper for word in _SECRET_WORDS)


def _unsafe(name: str) -> bool:
    return name in _NEVER_NAMES or name.startswith("PYTHON")


def engine_environment(
    parent_env: Mapping[str, str], engine_env: Mapping[str, str], *, workdir: Path, clean: bool = True
) -> dict[str, str]:
    """The env to exec the engine with. clean=False keeps all of poolmgr's env, still minus secrets."""
    if clean:
        base = {k: v for k, v in parent_env.items() if k in _KEEP_NAMES or k.startswith(_KEEP_PREFIXES)}
    else:
        base = dict(parent_env)
    merged = base | dict(engine_env)
    env = {k: v for k, v in merged.items() if not is_secret(k) and not _unsafe(k)}
    env.setdefault("PATH", DEFAULT_PATH)
    env["HOME"] = str(workdir)
    env["TMPDIR"] = str(workdir)
    return env


__all__ = ["DEFAULT_PATH", "engine_environment", "is_secret"]
