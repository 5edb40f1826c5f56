"""The one check of a pools file and the settings: `poolmgr validate`, `poolmgr serve` (before it opens the
database) and any later path that accepts pool specs call it, so what `validate` accepts `serve` runs.

On top of the pools file's own parse (poolmgr.poolsfile, every field of every pool) it checks what needs this
host: each device mask's syntax and, when NVML answers (the driver, or POOL_MANAGERD_FAKE_NVML), the devices it
names and that pools which do not share use different devices; that `[pool.isolation]` user and group names
exist; a tensor_split with one value per device; and the settings' bind rule (a non-loopback
POOL_MANAGERD_ADDR needs POOL_MANAGERD_API_TOKEN). Every problem is one line naming the file, the pool and the
field; all of them are raised together (`ConfigProblems`). Without a driver, GPU pools are one warning line:
placement refuses them at start (reason no_gpu) while CPU pools run.

Layer: imports poolsfile and settings (layer 1) and poolmgr.devices (layer 2) only, so every layer above,
the faces included, may use it; it lives outside poolmgr/devices because it checks more than devices.
"""

from __future__ import annotations

import grp
import pwd
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from poolmgr.devices import DeviceMask, DeviceSnapshot, Inventory, NvmlBackend, backend_from_env, discover
from poolmgr.errors import ConfigError, ConfigProblems, DeviceError
from poolmgr.poolsfile import PoolSpec, collect_pools, parse_isolation, problem, read_pools_file
from poolmgr.settings import PoolManagerConfig

NO_CONFIG = "no pools file: pass --config FILE or set POOL_MANAGERD_CONFIG"


@dataclass(frozen=True)
class CheckedPools:
    """A pools file that passed: its pools, where each GPU pool's mask points, and warnings (one line each)."""

    specs: list[PoolSpec]
    devices: dict[str, list[DeviceSnapshot]] = field(default_factory=dict)  # GPU pool id → its devices
    warnings: list[str] = field(default_factory=list)
    inventory: Inventory | None = None  # None when no GPU pool needed NVML


@dataclass
class _Report:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    devices: dict[str, list[DeviceSnapshot]] = field(default_factory=dict)


def _gpu_masks(specs: Sequence[PoolSpec], source: str, report: _Report) -> dict[str, DeviceMask]:
    """The parsed mask of every GPU pool; a mask that does not parse is a problem."""
    masks: dict[str, DeviceMask] = {}
    for spec in specs:
        try:
            mask = DeviceMask.parse(spec.device_mask)
        except DeviceError as exc:
            report.problems.append(problem(source, spec.id, "device_mask", str(exc)))
            continue
        if spec.tensor_split is not None and len(spec.tensor_split) != len(mask.refs):
            devices = "a CPU pool has no devices" if mask.is_cpu else f"the mask names {len(mask.refs)} device(s)"
            report.problems.append(
                problem(source, spec.id, "tensor_split", f"has {len(spec.tensor_split)} value(s) but {devices}")
            )
        if not mask.is_cpu:
            masks[spec.id] = mask
    return masks


def _resolve(masks: dict[str, DeviceMask], inventory: Inventory, source: str, report: _Report) -> None:
    for pool_id, mask in masks.items():
        try:
            report.devices[pool_id] = mask.resolve(inventory.devices)
        except DeviceError as exc:
            report.problems.append(problem(source, pool_id, "device_mask", str(exc)))


def _overlaps(specs: Sequence[PoolSpec], source: str, report: _Report) -> None:
    """Two pools on one device unless both say share_devices = true: one line per pair and device."""
    share = {s.id: s.share_devices for s in specs}
    users: dict[str, list[str]] = {}
    for pool_id, devices in report.devices.items():
        for dev in devices:
            for other in users.get(dev.uuid, []):
                if not (share[pool_id] and share[other]):
                    report.problems.append(
                        problem(
                            source, pool_id, "device_mask",
                            f"{dev.uuid} (index {dev.index}) is also in the mask of pool {other!r}; "
                            "set share_devices = true on both to share a device",
                        )
                    )  # fmt: skip
            users.setdefault(dev.uuid, []).append(pool_id)


def _lookup(kind: str, name: str | int, find: Callable[[str], object]) -> str | None:
    if isinstance(name, int):
        return None  # a numeric id needs no entry in /etc/passwd or /etc/group
    try:
        find(name)
    except KeyError:
        return f"no {kind} {name!r} on this host (create it, or give a numeric id)"
    return None


def _isolation_ids(specs: Sequence[PoolSpec], source: str, report: _Report) -> None:
    for spec in specs:
        values, _problems = parse_isolation(spec.isolation)
        for key, kind, find in (("user", "user", pwd.getpwnam), ("group", "group", grp.getgrnam)):
            if key in values and (why := _lookup(kind, values[key], find)):
                report.problems.append(problem(source, spec.id, f"isolation.{key}", why))


PODMAN_MISSING = (
    'podman is not installed on this host: runtime "podman" pools cannot run '
    "(Debian: apt-get install podman uidmap runc)"
)


_LIMIT_KEYS = ("memory_max", "cpu_max", "pids_max")
CGROUP2_CONTROLLERS = Path("/sys/fs/cgroup/cgroup.controllers")  # present only where /sys/fs/cgroup is cgroup v2


def _containers(specs: Sequence[PoolSpec], source: str, report: _Report) -> None:
    pods = [spec for spec in specs if spec.runtime == "podman"]
    if pods and shutil.which("podman") is None:
        report.problems.append(problem(source, pods[0].id, "runtime", PODMAN_MISSING))
    for spec in pods:
        if spec.rootfs is not None and not Path(spec.rootfs).is_dir():
            report.problems.append(problem(source, spec.id, "rootfs", f"{spec.rootfs} is not a directory"))
    limited = [spec.id for spec in pods if any(k in spec.isolation for k in _LIMIT_KEYS)]
    if limited and not CGROUP2_CONTROLLERS.exists():
        report.warnings.append(
            f"{source}: container pool(s) {', '.join(repr(p) for p in limited)}: [pool.isolation] memory_max, "
            "cpu_max and pids_max are not enforced: rootless podman ignores them on a cgroup v1/hybrid host"
        )


def validate_pools(
    specs: Sequence[PoolSpec], inventory: Inventory | Callable[[], Inventory], *, source: str
) -> CheckedPools:
    """The host checks of parsed pools. `inventory` may be a function: it is called only when a GPU pool
    needs it. ConfigProblems with every problem found."""
    report = _Report()
    masks = _gpu_masks(specs, source, report)
    inv: Inventory | None = None
    if masks:
        inv = inventory() if callable(inventory) else inventory
        if inv.available:
            _resolve(masks, inv, source, report)
            _overlaps(specs, source, report)
        else:
            report.warnings.append(
                f"{source}: GPU pool(s) {', '.join(repr(p) for p in masks)} will not be placed: "
                f"{inv.reason or 'NVML unavailable'}; CPU pools run"
            )
    _isolation_ids(specs, source, report)
    _containers(specs, source, report)
    if report.problems:
        raise ConfigProblems(report.problems)
    return CheckedPools(specs=list(specs), devices=report.devices, warnings=report.warnings, inventory=inv)


def _backend(cfg: PoolManagerConfig, problems: list[str]) -> NvmlBackend | None:
    try:
        return backend_from_env(cfg.fake_nvml)
    except ConfigError as exc:
        problems.append(str(exc))
        return None


def check_pools_file(path: Path | None, cfg: PoolManagerConfig) -> CheckedPools:
    """Everything `validate` checks and `serve` needs checked before it touches the database: the settings'
    bind rule, the pools file, and the pools against this host. ConfigProblems with every problem found."""
    problems = [p for p in (cfg.bind_problem(),) if p is not None]
    backend = _backend(cfg, problems)
    if path is None:
        raise ConfigProblems([*problems, NO_CONFIG])
    try:
        text = read_pools_file(path)
    except ConfigError as exc:
        raise ConfigProblems([*problems, str(exc)]) from None
    specs, found = collect_pools(text, source=str(path))
    problems += found

    def inventory() -> Inventory:
        return discover(backend, warn=False) if backend is not None else Inventory(reason="no usable NVML")

    try:
        checked = validate_pools(specs, inventory, source=str(path))
    except ConfigProblems as exc:
        raise ConfigProblems([*problems, *exc.problems]) from None
    if problems:
        raise ConfigProblems(problems)
    return checked


__all__ = ["NO_CONFIG", "PODMAN_MISSING", "CheckedPools", "check_pools_file", "validate_pools"]
