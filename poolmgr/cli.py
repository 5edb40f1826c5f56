"""The `poolmgr` command line. Errors are one readable line and an exit code (2: bad input, 1: failure)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from poolmgr import __version__
from poolmgr.errors import ConfigError, DeviceError, OwnedElsewhere, PoolmgrError
from poolmgr.settings import PoolManagerConfig

if TYPE_CHECKING:
    from poolmgr.poolsfile import PoolSpec
    from poolmgr.validation import CheckedPools

Handler = Callable[[argparse.Namespace, PoolManagerConfig], int]


def _settings() -> PoolManagerConfig:
    return PoolManagerConfig.from_env()


def _pools_file(args: argparse.Namespace, cfg: PoolManagerConfig) -> Path | None:
    path = getattr(args, "config", None) or cfg.config
    return Path(path) if path else None


def cmd_migrate(args: argparse.Namespace, cfg: PoolManagerConfig) -> int:
    from poolmgr.store import current_revision, migrate

    url = cfg.effective_database_url
    migrate(url)
    print(f"database at revision {current_revision(url)}")
    return 0


def _where(checked: CheckedPools, spec: PoolSpec) -> str:
    """Where `validate` says a pool will run: its devices, cpu, or not placed (no driver)."""
    if spec.is_cpu:
        return f"  {spec.id}: cpu (every GPU hidden from its engine)"
    devices = checked.devices.get(spec.id)
    if devices is None:
        return f"  {spec.id}: {spec.device_mask} -> not placed: no usable NVIDIA driver (see the warning)"
    return f"  {spec.id}: {spec.device_mask} -> " + ", ".join(f"{d.name} {d.uuid}" for d in devices)


def cmd_validate(args: argparse.Namespace, cfg: PoolManagerConfig) -> int:
    from poolmgr.validation import check_pools_file

    path = _pools_file(args, cfg)
    checked = check_pools_file(path, cfg)
    for line in checked.warnings:
        print(f"poolmgr: warning: {line}", file=sys.stderr)
    pools = checked.specs
    print(f"{path}: {len(pools)} pool(s) valid: {', '.join(p.id for p in pools) or '-'}")
    for spec in pools:
        print(_where(checked, spec))
    return 0


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def _registry(cfg: PoolManagerConfig) -> Any:
    from poolmgr.store import Registry, migrate

    migrate(cfg.effective_database_url)
    return Registry(cfg.effective_database_url, node_id=cfg.node_id)


def cmd_pools(args: argparse.Namespace, cfg: PoolManagerConfig) -> int:
    reg = _registry(cfg)
    try:
        pools = reg.pools()
    finally:
        reg.close()
    if args.json:
        print(json.dumps([p.status() for p in pools], indent=2))
        return 0
    rows = [
        (p.id, p.state.value, p.ready, f"{p.slots_free}/{p.slots_total}", p.active_leases, p.restart_count,
         p.pid, p.device_mask, p.endpoint_url, p.last_error)
        for p in pools
    ]  # fmt: skip
    print(
        _table(("POOL", "STATE", "READY", "SLOTS", "LEASES", "RESTARTS", "PID", "MASK", "ENDPOINT", "LAST_ERROR"), rows)
    )
    return 0


def cmd_events(args: argparse.Namespace, cfg: PoolManagerConfig) -> int:
    reg = _registry(cfg)
    try:
        events = reg.events(pool_id=args.pool, limit=args.limit)
    finally:
        reg.close()
    if args.json:
        print(json.dumps([e.to_json() for e in events], indent=2))
        return 0
    rows = [
        (e.id, e.at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3], e.pool_id, e.kind,
         f"{e.from_state or '-'}->{e.to_state or '-'}", e.reason, e.restart_count, e.backoff_ms, e.exit_code,
         e.signal, e.correlation_id)
        for e in events
    ]  # fmt: skip
    print(
        _table(
            ("ID", "AT", "POOL", "KIND", "TRANSITION", "REASON", "RESTARTS", "BACKOFF_MS", "EXIT", "SIG", "CORR"), rows
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolmgr", description="GPU pool manager for LLM engines")
    parser.add_argument("--version", action="version", version=f"poolmgr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("migrate", help="upgrade the registry database to the newest schema")
    p.set_defaults(handler=cmd_migrate)

    p = sub.add_parser("validate", help="check a pools file and the settings")
    p.add_argument("--config", help="pools file (TOML); default POOL_MANAGERD_CONFIG")
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("pools", help="list pools from the registry")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_pools)

    p = sub.add_parser("events", help="audit events (state changes, restarts, leases)")
    p.add_argument("--pool", help="only this pool")
    p.add_argument("--limit", type=int, default=None, help="only the newest N")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_events)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Other modules add their subcommands here (serve, engines, dev, devices, plan, doctor, drain, …).
_EXTRA_COMMANDS: list[Callable[[Any], None]] = []


def _load_extra_commands() -> None:
    from poolmgr import _cli_ops

    _EXTRA_COMMANDS[:] = _cli_ops.COMMANDS


def main(argv: Sequence[str] | None = None) -> int:
    _load_extra_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = _settings()
        handler: Handler = args.handler
        return handler(args, cfg)
    except (ConfigError, DeviceError, OwnedElsewhere) as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"poolmgr: error: {line}", file=sys.stderr)
        return 2
    except PoolmgrError as exc:
        print(f"poolmgr: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("poolmgr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
