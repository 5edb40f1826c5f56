"""The pools file (TOML): `[[pool]]` tables describing the pools this node should run (layer 1).

    [[pool]]
    id = "tiny"
    engine = "llamacpp"
    model = "/models/tiny.gguf"
    device_mask = "cpu"        # or "0,1", "GPU0", a GPU-/MIG- uuid
    slots = 2
    ctx_size = 2048
    extra_args = ["--temp", "0"]

Every error names the pool and the field.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from poolmgr.errors import ConfigError

KNOWN_ENGINES = ("llamacpp",)
# "podman" is accepted by poolmgr.isolation's command builder, but serve does not run container pools yet.
RUNTIMES = ("process",)
POOL_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_FIELDS = {
    "id",
    "engine",
    "model",
    "device_mask",
    "slots",
    "ctx_size",
    "extra_args",
    "share_devices",
    "tensor_split",
    "isolation",
    "runtime",
}
# Flags poolmgr owns: a pool file may not set them through extra_args.
_RESERVED_FLAGS = {"--host", "--port", "-m", "--model", "--parallel", "-np", "--ctx-size", "-c"}


@dataclass(frozen=True)
class PoolSpec:
    id: str
    model: str
    engine: str = "llamacpp"
    device_mask: str = "cpu"
    slots: int = 1
    ctx_size: int = 2048
    extra_args: tuple[str, ...] = ()
    share_devices: bool = False
    tensor_split: tuple[float, ...] | None = None
    isolation: dict[str, Any] = field(default_factory=dict)
    runtime: str = "process"

    @property
    def is_cpu(self) -> bool:
        return self.device_mask.strip().lower() == "cpu"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["extra_args"] = list(self.extra_args)
        data["tensor_split"] = list(self.tensor_split) if self.tensor_split is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PoolSpec:
        return parse_pool(data, where="stored spec")


def _err(pool: str, fld: str, msg: str) -> ConfigError:
    return ConfigError(f"pool {pool!r}: field {fld!r}: {msg}")


def _positive_int(raw: dict[str, Any], pid: str, name: str, default: int) -> int:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _err(pid, name, f"must be a positive integer, got {value!r}")
    return value


def _check_engine_and_runtime(raw: dict[str, Any], pid: str) -> tuple[str, str]:
    engine = raw.get("engine", "llamacpp")
    if engine not in KNOWN_ENGINES:
        raise _err(pid, "engine", f"unknown engine {engine!r} (known: {', '.join(KNOWN_ENGINES)})")
    runtime = raw.get("runtime", "process")
    if runtime not in RUNTIMES:
        raise _err(pid, "runtime", f"unknown runtime {runtime!r} (known: {', '.join(RUNTIMES)})")
    return engine, runtime


def _check_extra_args(raw: dict[str, Any], pid: str) -> tuple[str, ...]:
    extra = raw.get("extra_args", [])
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        raise _err(pid, "extra_args", "must be a list of strings")
    for arg in extra:
        if arg.split("=", 1)[0] in _RESERVED_FLAGS:
            raise _err(pid, "extra_args", f"{arg!r} is set by poolmgr; use the pool's own field instead")
    return tuple(extra)


def _check_tensor_split(raw: dict[str, Any], pid: str) -> tuple[float, ...] | None:
    ts = raw.get("tensor_split")
    if ts is None:
        return None
    if (
        not isinstance(ts, list)
        or not ts
        or not all(isinstance(x, int | float) and not isinstance(x, bool) and x >= 0 for x in ts)
        or sum(ts) <= 0
    ):
        raise _err(pid, "tensor_split", "must be a non-empty list of non-negative numbers with a positive sum")
    return tuple(float(x) for x in ts)


def parse_pool(raw: Any, *, where: str) -> PoolSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: each [[pool]] must be a table")
    pid = raw.get("id")
    if not isinstance(pid, str) or not POOL_ID_RE.match(pid):
        raise ConfigError(f"{where}: pool {pid!r}: field 'id': must match [a-z0-9][a-z0-9._-]*")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise _err(pid, unknown[0], f"unknown field (known: {', '.join(sorted(_FIELDS))})")
    engine, runtime = _check_engine_and_runtime(raw, pid)
    model = raw.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _err(pid, "model", "must be a non-empty path")
    mask = raw.get("device_mask", "cpu")
    if not isinstance(mask, str) or not mask.strip():
        raise _err(pid, "device_mask", 'must be "cpu" or a list of GPU ids such as "0,1"')
    isolation = raw.get("isolation", {})
    if not isinstance(isolation, dict):
        raise _err(pid, "isolation", "must be a table")
    share = raw.get("share_devices", False)
    if not isinstance(share, bool):
        raise _err(pid, "share_devices", "must be true or false")
    return PoolSpec(
        id=pid,
        engine=engine,
        model=model,
        device_mask=mask.strip(),
        slots=_positive_int(raw, pid, "slots", 1),
        ctx_size=_positive_int(raw, pid, "ctx_size", 2048),
        extra_args=_check_extra_args(raw, pid),
        share_devices=share,
        tensor_split=_check_tensor_split(raw, pid),
        isolation=dict(isolation),
        runtime=runtime,
    )


def parse_pools(text: str, *, source: str = "pools file") -> list[PoolSpec]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"pool"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key {unknown[0]!r} (expected [[pool]] tables)")
    raw_pools = doc.get("pool", [])
    if not isinstance(raw_pools, list):
        raise ConfigError(f"{source}: 'pool' must be an array of tables: use [[pool]]")
    pools: list[PoolSpec] = []
    seen: set[str] = set()
    for raw in raw_pools:
        spec = parse_pool(raw, where=source)
        if spec.id in seen:
            raise _err(spec.id, "id", "duplicate pool id")
        seen.add(spec.id)
        pools.append(spec)
    return pools


def load_pools(path: Path) -> list[PoolSpec]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read pools file: {exc.strerror}") from None
    return parse_pools(text, source=str(path))


__all__ = ["KNOWN_ENGINES", "PoolSpec", "load_pools", "parse_pool", "parse_pools"]
