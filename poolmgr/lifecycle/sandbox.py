"""Builds the isolation wrapper for one engine spawn (B-SEC-001..003): who it runs as, where, and with what."""

from __future__ import annotations

import os
from pathlib import Path

from poolmgr.engines import WrapFn
from poolmgr.errors import PreloadFailed
from poolmgr.isolation import DEFAULT_ENGINE_USER, build_isolation, prepare, wrap_command
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig


def engine_user(cfg: PoolManagerConfig) -> str:
    """The user engines run as: the setting, else the dedicated system user when poolmgr is root."""
    if cfg.engine_user:
        return cfg.engine_user
    return DEFAULT_ENGINE_USER if os.geteuid() == 0 else ""


def sandbox_wrapper(cfg: PoolManagerConfig, spec: PoolSpec, *, binary: Path, workdir_root: Path) -> tuple[WrapFn, Path]:
    """(wrap, workdir) for the launcher. Refuses (PreloadFailed `not_readable`) when the engine user could not
    read the model or run the binary: better one clear line now than a confusing engine error later."""
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

    def wrap(argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        return wrap_command(prepared, argv, env)

    return wrap, iso.workdir


__all__ = ["engine_user", "sandbox_wrapper"]
