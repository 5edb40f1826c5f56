"""The pools file (TOML): `[[pool]]` tables describing the pools this node should run (layer 1).

    [[pool]]
    id = "tiny"
    engine = "llamacpp"
    model = "/models/tiny.gguf"
    device_mask = "cpu"        # or "0,1", "GPU0", a GPU-/MIG- uuid
    slots = 2
    ctx_size = 2048
    extra_args = ["--temp", "0"]
    idle_unload_s = 600        # stop it after 10 idle minutes (default: never)
    load_on_demand = true      # a request to it while stopped starts it (default: false)
    [pool.isolation]
    memory_max = "8G"

The parser collects every problem of a file, one line each naming the file, the pool and the field, and raises
them together (`ConfigProblems`). What needs the host (device masks against the discovered GPUs, that an
isolation user exists, the bind rule of the settings) is checked on top of this by `poolmgr.validation`.
The `[pool.isolation]` values are parsed here, once, for the file and for `poolmgr.isolation.build_isolation`.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from poolmgr.errors import ConfigError, ConfigProblems

KNOWN_ENGINES = ("llamacpp",)
# "podman": the engine in a rootless container, its root `rootfs` (a directory) or `image` (one of the two).
RUNTIMES = ("process", "podman")
POOL_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
FIELDS = (
    "id",
    "served_model_name",
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
    "rootfs",
    "image",
    "idle_unload_s",
    "load_on_demand",
)
ISOLATION_KEYS = ("user", "group", "seccomp", "landlock", "memory_max", "cpu_max", "pids_max")
# Flags poolmgr owns: a pool file may not set them through extra_args.
_RESERVED_FLAGS = {
    "--host", "--port", "-m", "--model", "--parallel", "-np", "--ctx-size", "-c", "--alias", "-a",
}  # fmt: skip
_SERVED_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
_INT32_MAX = 2**31 - 1  # llama-server reads --parallel and --ctx-size as C ints
_MAX_BYTES = 2**63 - 1  # what a cgroup limit file holds
CPU_PERIOD_US = 100_000  # the period of `cpu_max` given as a number of CPUs
_CPU_PERIOD_RANGE = (1000, 1_000_000)  # µs, as cgroup v2's cpu.max accepts
MAX_IDLE_UNLOAD_S = 365 * 24 * 3600
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


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
    rootfs: str | None = None  # runtime "podman": a prepared root filesystem (a directory) ...
    image: str | None = None  # ... or an image (podman pulls it into the pool's own storage)
    served_model_name: str | None = None
    idle_unload_s: float | None = None  # stop the pool once it had no request and no lease that long (None: never)
    load_on_demand: bool = False  # a request to the stopped pool starts it and waits until it is ready

    @property
    def served_name(self) -> str:
        """What clients call the model (`model` in an OpenAI request, the engine's --alias): the pool id unless
        `served_model_name` says otherwise."""
        return self.served_model_name or self.id

    @property
    def is_cpu(self) -> bool:
        return self.device_mask.strip().lower() == "cpu"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["extra_args"] = list(self.extra_args)
        data["tensor_split"] = list(self.tensor_split) if self.tensor_split is not None else None
        for key in ("rootfs", "image"):  # container fields: absent from a process pool's stored spec
            if data[key] is None:
                del data[key]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PoolSpec:
        return parse_pool(data, where="stored spec")


class _Bad(Exception):
    """Problems with fields of one pool: (field, message) each; `partial`: the field's good part, if any."""

    def __init__(self, *items: tuple[str, str], partial: Any = None) -> None:
        super().__init__(items)
        self.items = items
        self.partial = partial


def problem(source: str, pool: object, fld: str, msg: str) -> str:
    """One line of a pools file problem: the file, the pool, the field and what is wrong."""
    return f"{source}: pool {pool!r}: field {fld!r}: {msg}"


# -- the [pool.isolation] table ------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_memory(value: Any) -> int:
    """Bytes from a positive byte count or a size such as "512M", "8G", "2GiB" (powers of 1024)."""
    size = 0
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        unit = (m.group(2) or "b")[0].lower()
        size = int(m.group(1)) * 1024 ** "bkmgt".index(unit)
    if not 0 < size <= _MAX_BYTES:
        raise ValueError(f'must be a positive byte count or a size like "512M", "8G", "2GiB" (K/M/G/T), got {value!r}')
    return size


def parse_cpu_max(value: Any) -> tuple[int, int]:
    """(quota, period) in µs from a number of CPUs (2.5 → 250000 per 100000), or "QUOTA PERIOD" as cgroup v2
    writes it (period 1000-1000000 µs, quota at least 1000 µs)."""
    if _is_number(value) and math.isfinite(value) and 0 < value <= 1_000_000:
        return max(1000, round(value * CPU_PERIOD_US)), CPU_PERIOD_US
    if isinstance(value, str):
        parts = value.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            quota, period = int(parts[0]), int(parts[1])
            if quota >= 1000 and _CPU_PERIOD_RANGE[0] <= period <= _CPU_PERIOD_RANGE[1]:
                return quota, period
    raise ValueError(
        'must be a number of CPUs such as 2.5, or "QUOTA PERIOD" in microseconds such as "50000 100000" '
        f"(quota >= 1000, period 1000-1000000), got {value!r}"
    )


def parse_user_or_group(value: Any) -> str | int:
    """A name, or a numeric id (an int, or a string of digits)."""
    if isinstance(value, str) and value.strip():
        text = value.strip()
        return int(text) if text.isdigit() else text
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"must be a name or a numeric id, got {value!r}")


def _parse_flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _parse_pids(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _INT32_MAX:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return value


# key → (IsolationSpec field, parser)
_ISOLATION_PARSERS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "user": ("user", parse_user_or_group),
    "group": ("group", parse_user_or_group),
    "seccomp": ("seccomp", _parse_flag),
    "landlock": ("landlock", _parse_flag),
    "memory_max": ("memory_max_bytes", parse_memory),
    "cpu_max": ("cpu_max", parse_cpu_max),
    "pids_max": ("pids_max", _parse_pids),
}


def parse_isolation(table: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The `[pool.isolation]` table as IsolationSpec field values, and (key, problem) for every bad key."""
    values: dict[str, Any] = {}
    allowed = ", ".join(ISOLATION_KEYS)
    problems = [(key, f"unknown key (allowed: {allowed})") for key in table if key not in _ISOLATION_PARSERS]
    for key, (attr, parse) in _ISOLATION_PARSERS.items():
        if key in table:
            try:
                values[attr] = parse(table[key])
            except ValueError as exc:
                problems.append((key, str(exc)))
    return values, problems


# -- one pool ------------------------------------------------------------------------------------------------


def _positive_int(raw: Mapping[str, Any], name: str, default: int) -> int:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _INT32_MAX:
        raise _Bad((name, f"must be a positive integer (at most {_INT32_MAX}), got {value!r}"))
    return value


def _choice(raw: Mapping[str, Any], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = raw.get(name, default)
    if value not in allowed:
        raise _Bad((name, f"unknown {name} {value!r} (allowed: {', '.join(allowed)})"))
    return str(value)


def _model(raw: Mapping[str, Any]) -> str:
    model = raw.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _Bad(("model", "must be a non-empty path"))
    return model


def _served_model_name(raw: Mapping[str, Any]) -> str | None:
    name = raw.get("served_model_name")
    if name is None:
        return None
    if not isinstance(name, str) or not _SERVED_NAME_RE.match(name):
        raise _Bad(("served_model_name", "must be 1-128 characters of A-Z a-z 0-9 . _ : / @ + - (no spaces)"))
    return name


def _device_mask(raw: Mapping[str, Any]) -> str:
    mask = raw.get("device_mask", "cpu")
    if not isinstance(mask, str) or not mask.strip():
        raise _Bad(("device_mask", 'must be "cpu" or GPUs such as "0,1", "GPU0,GPU1" or GPU-/MIG- uuids'))
    return mask.strip()


def _extra_args(raw: Mapping[str, Any]) -> tuple[str, ...]:
    extra = raw.get("extra_args", [])
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        raise _Bad(("extra_args", "must be a list of strings"))
    reserved = [a for a in extra if a.split("=", 1)[0] in _RESERVED_FLAGS]
    if reserved:
        raise _Bad(("extra_args", f"{reserved[0]!r} is set by poolmgr; use the pool's own field instead"))
    return tuple(extra)


def _flag(raw: Mapping[str, Any], name: str) -> bool:
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise _Bad((name, f"must be true or false, got {value!r}"))
    return value


def _idle_unload_s(raw: Mapping[str, Any]) -> float | None:
    value = raw.get("idle_unload_s")
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value) or not 0 < value <= MAX_IDLE_UNLOAD_S:
        raise _Bad(("idle_unload_s", f"must be a number of seconds > 0 (at most {MAX_IDLE_UNLOAD_S}; leave it out "
                                     f"for never), got {value!r}"))  # fmt: skip
    return float(value)


def _tensor_split(raw: Mapping[str, Any]) -> tuple[float, ...] | None:
    ts = raw.get("tensor_split")
    if ts is None:
        return None
    if (
        not isinstance(ts, list)
        or not ts
        or not all(_is_number(x) and math.isfinite(x) and x >= 0 for x in ts)
        or sum(ts) <= 0
    ):
        raise _Bad(("tensor_split", "must be a non-empty list of non-negative numbers with a positive sum"))
    return tuple(float(x) for x in ts)


def _isolation(raw: Mapping[str, Any]) -> dict[str, Any]:
    table = raw.get("isolation", {})
    if not isinstance(table, dict):
        raise _Bad(("isolation", f"must be a table ([pool.isolation]) with keys {', '.join(ISOLATION_KEYS)}"))
    _values, problems = parse_isolation(table)
    if problems:
        good = {k: v for k, v in table.items() if k not in {key for key, _msg in problems}}
        raise _Bad(*((f"isolation.{key}", msg) for key, msg in problems), partial=good)
    return dict(table)


def _container_root(raw: Mapping[str, Any], key: str) -> str | None:
    value = raw.get(key)
    runtime = raw.get("runtime", "process")
    other = "image" if key == "rootfs" else "rootfs"
    if value is None:
        if runtime == "podman" and raw.get(other) is None and key == "rootfs":
            raise _Bad(("runtime", 'runtime "podman" needs `rootfs = "/path"` (a directory) or `image = "name"`'))
        return None
    if runtime != "podman":
        raise _Bad((key, 'only for runtime = "podman"'))
    if not isinstance(value, str) or not value.strip():
        raise _Bad((key, "must be a non-empty string"))
    if key == "rootfs" and not value.startswith("/"):
        raise _Bad((key, f"must be an absolute path, got {value!r}"))
    if raw.get(other) is not None and key == "image":
        raise _Bad((key, "give either rootfs or image, not both"))
    return value


_CHECKS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "engine": lambda raw: _choice(raw, "engine", "llamacpp", KNOWN_ENGINES),
    "runtime": lambda raw: _choice(raw, "runtime", "process", RUNTIMES),
    "rootfs": lambda raw: _container_root(raw, "rootfs"),
    "image": lambda raw: _container_root(raw, "image"),
    "model": _model,
    "served_model_name": _served_model_name,
    "device_mask": _device_mask,
    "slots": lambda raw: _positive_int(raw, "slots", 1),
    "ctx_size": lambda raw: _positive_int(raw, "ctx_size", 2048),
    "extra_args": _extra_args,
    "share_devices": lambda raw: _flag(raw, "share_devices"),
    "tensor_split": _tensor_split,
    "isolation": _isolation,
    "idle_unload_s": _idle_unload_s,
    "load_on_demand": lambda raw: _flag(raw, "load_on_demand"),
}


_DEFAULTS: dict[str, Any] = {"model": ""}  # a field that failed its check, in a spec kept for further checks


def collect_pool(raw: Any, *, where: str) -> tuple[PoolSpec | None, list[str]]:
    """One `[[pool]]` table: its spec and every problem of it (one line each). With problems the spec (None
    without a valid id) has its bad fields at their defaults: worth checking further, never worth running."""
    if not isinstance(raw, dict):
        return None, [f"{where}: each [[pool]] must be a table"]
    pid = raw.get("id")
    valid_id = isinstance(pid, str) and POOL_ID_RE.match(pid) is not None
    problems = [] if valid_id else [problem(where, pid, "id", "must match [a-z0-9][a-z0-9._-]*")]
    allowed = ", ".join(FIELDS)
    problems += [problem(where, pid, k, f"unknown field (allowed: {allowed})") for k in raw if k not in FIELDS]
    values: dict[str, Any] = {}
    for name, check in _CHECKS.items():
        try:
            values[name] = check(raw)
        except _Bad as bad:
            problems += [problem(where, pid, fld, msg) for fld, msg in bad.items]
            if bad.partial is not None or name in _DEFAULTS:
                values[name] = bad.partial if bad.partial is not None else _DEFAULTS[name]
    if not valid_id:
        return None, problems
    return PoolSpec(id=str(pid), **values), problems


def parse_pool(raw: Any, *, where: str) -> PoolSpec:
    """One pool; ConfigProblems with every problem of it."""
    spec, problems = collect_pool(raw, where=where)
    if spec is None or problems:
        raise ConfigProblems(problems)
    return spec


# -- the file ------------------------------------------------------------------------------------------------


def collect_pools(text: str, *, source: str = "pools file") -> tuple[list[PoolSpec], list[str]]:
    """The pools of a file and every problem found in it, one line each. With problems, the pools are those
    with a valid, unique id, bad fields at their defaults: worth checking further, never worth running."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return [], [f"{source}: not valid TOML: {exc}"]
    problems = [f"{source}: unknown top-level key {k!r} (allowed: [[pool]] tables)" for k in doc if k != "pool"]
    raw_pools = doc.get("pool", [])
    if not isinstance(raw_pools, list):
        return [], [*problems, f"{source}: 'pool' must be an array of tables: write [[pool]], not [pool]"]
    pools: list[PoolSpec] = []
    seen: set[str] = set()
    for raw in raw_pools:
        spec, found = collect_pool(raw, where=source)
        problems += found
        if spec is None:
            continue
        if spec.id in seen:
            problems.append(problem(source, spec.id, "id", "duplicate pool id"))
            continue
        seen.add(spec.id)
        pools.append(spec)
    return pools, problems


def parse_pools(text: str, *, source: str = "pools file") -> list[PoolSpec]:
    pools, problems = collect_pools(text, source=source)
    if problems:
        raise ConfigProblems(problems)
    return pools


def read_pools_file(path: Path) -> str:
    """The text of a pools file; ConfigError (one line) when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read pools file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (the pools file is UTF-8 TOML)") from None


__all__ = [
    "FIELDS",
    "ISOLATION_KEYS",
    "KNOWN_ENGINES",
    "MAX_IDLE_UNLOAD_S",
    "RUNTIMES",
    "PoolSpec",
    "collect_pool",
    "collect_pools",
    "parse_cpu_max",
    "parse_isolation",
    "parse_memory",
    "parse_pool",
    "parse_pools",
    "parse_user_or_group",
    "problem",
    "read_pools_file",
]
