"""Builds the isolation wrapper for one engine spawn (B-SEC-001..003): who it runs as, where, and with what."""

from __future__ import annotations

import os
from pathlib import Path

from poolmgr.engines import WrapFn
from poolmgr.errors import PreloadFailed
from poolmgr.isolation import (
    DEFAULT_ENGINE_USER,
    PreparedIsolation,
    build_isolation,
    default_profile_path,
    podman_command,
    prepare,
    wrap_command,
    write_seccomp_profile,
)
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig

CDI_DIRS = (Path("/etc/cdi"), Path("/var/run/cdi"))
CONTAINER_PATH = "/usr/local/bin:/usr/bin:/bin"


def engine_user(cfg: PoolManagerConfig) -> str:
    """The user engines run as: the setting, else the dedicated system user when poolmgr is root."""
    if cfg.engine_user:
        return cfg.engine_user
    return DEFAULT_ENGINE_USER if os.geteuid() == 0 else ""


def _isolation(cfg: PoolManagerConfig, spec: PoolSpec, binary: Path, workdir_root: Path) -> PreparedIsolation:
    iso = build_isolation(
        spec.isolation,
        engine_user=engine_user(cfg),
        workdir_root=workdir_root,
        pool_id=spec.id,
        # A missing model is left to the engine, whose own line (`failed to open GGUF file`) says it best.
        readable_paths=tuple(p.absolute() for p in (Path(spec.model), binary) if p.exists()),
    )
    prepared = prepare(iso)
    if prepared.warnings:
        raise PreloadFailed(
            "not_readable",
            f"pool {spec.id!r}: the engine user cannot reach its files: {'; '.join(prepared.warnings)}",
        )
    return prepared


def sandbox_wrapper(cfg: PoolManagerConfig, spec: PoolSpec, *, binary: Path, workdir_root: Path) -> tuple[WrapFn, Path]:
    """(wrap, workdir) for the launcher. Refuses (PreloadFailed `not_readable`) when the engine user could not
    read the model or run the binary: better one clear line now than a confusing engine error later."""
    prepared = _isolation(cfg, spec, binary, workdir_root)

    def wrap(argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        return wrap_command(prepared, argv, env)

    return wrap, prepared.spec.workdir


def _cdi_devices(spec: PoolSpec, device_uuids: list[str]) -> list[str]:
    """GPUs of a container pool by CDI name; PreloadFailed `no_cdi` without a CDI spec on this host."""
    if spec.is_cpu:
        return []
    if not any(d.is_dir() and any(d.iterdir()) for d in CDI_DIRS):
        raise PreloadFailed(
            "no_cdi",
            f"pool {spec.id!r}: a GPU container pool needs a CDI spec of the GPUs (none in "
            f"{', '.join(map(str, CDI_DIRS))}): run `nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`",
        )
    return [f"nvidia.com/gpu={uuid}" for uuid in device_uuids]


def container_wrapper(
    cfg: PoolManagerConfig, spec: PoolSpec, *, binary: Path, workdir_root: Path, device_uuids: list[str]
) -> tuple[WrapFn, Path]:
    """(wrap, workdir) for a `runtime = "podman"` pool: the engine in a detached rootless container (B-SEC-010..012),
    with poolmgr's seccomp profile written next to the workdirs and the engine's environment passed in."""
    prepared = _isolation(cfg, spec, binary, workdir_root)
    devices = _cdi_devices(spec, device_uuids)
    root = spec.rootfs or spec.image or ""
    if spec.rootfs and not Path(spec.rootfs).is_dir():
        raise PreloadFailed("rootfs_missing", f"pool {spec.id!r}: rootfs {spec.rootfs} is not a directory")
    profile = write_seccomp_profile(default_profile_path(prepared.spec))

    def wrap(argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        inside = {**env, "PATH": CONTAINER_PATH}
        cmd = podman_command(prepared.spec, root, argv, seccomp_profile_path=profile, detach=True, env=inside,
                             devices=devices)  # fmt: skip
        return cmd, {"PATH": env.get("PATH", CONTAINER_PATH)}

    return wrap, prepared.spec.workdir


__all__ = ["container_wrapper", "engine_user", "sandbox_wrapper"]
