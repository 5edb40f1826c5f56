"""Subcommands beyond the registry basics: serve, engines, dev, devices, plan, doctor, setup, and the
operator actions that talk to a running `serve` over its HTTP API (drain, reload, preload, breaker-reset)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from poolmgr.errors import ConfigError, PoolmgrError
from poolmgr.settings import PoolManagerConfig


class _StopBeforeStart(Exception):
    """SIGTERM arrived while serve was still importing and starting: nothing runs yet, exit cleanly."""


def _early_stop(signum: int, _frame: object) -> None:
    raise _StopBeforeStart(signum)


def cmd_serve(args: argparse.Namespace, cfg: PoolManagerConfig) -> int:
    # Until serve() installs its own handlers, a SIGTERM is a clean exit, not death by the signal.
    signal.signal(signal.SIGTERM, _early_stop)
    try:
        return _serve(args, cfg)
    except _StopBeforeStart:
        print("poolmgr: stopped before it started serving", file=sys.stderr)
        return 0


def _serve(args: argparse.Namespace, cfg: PoolManagerConfig) -> int:
    from poolmgr.validation import check_pools_file

    # First the one check `validate` runs, before anything opens the database (or imports the daemon).
    path = args.config or cfg.config
    checked = check_pools_file(Path(path) if path else None, cfg)

    from poolmgr.daemon import serve
    from poolmgr.observability.logs import setup_logging

    setup_logging(args.log_format or cfg.log_format, cfg.log_level)
    for line in checked.warnings:
        logging.getLogger("poolmgr.daemon").warning("%s", line)
    keep = True if args.keep_engines else None
    return asyncio.run(serve(cfg, checked.specs, keep_engines=keep, pools_file=Path(path) if path else None))


def cmd_engines_install(args: argparse.Namespace, cfg: PoolManagerConfig) -> int:
    from poolmgr.engines import install_llamacpp

    if args.engine != "llamacpp":
        raise ConfigError(f"unknown engine {args.engine!r} (known: llamacpp)")
    eng = install_llamacpp(fast=args.fast, force=args.force, progress=lambda line: print(line, flush=True))
    print(f"llama-server ready: {eng.path} ({eng.version or 'version unknown'})")
    _print_spawner()
    return 0


def _print_spawner() -> None:
    """Build the compiled spawner now (not on the first engine start) and say which one engines start through."""
    from poolmgr.isolation import choose_spawner

    print(f"engine spawner: {choose_spawner().detail}")


def cmd_engines_list(args: argparse.Namespace, cfg: PoolManagerConfig) -> int:
    from poolmgr.engines import list_engines

    engines = list_engines()
    if cfg.llama_server:
        print(f"POOL_MANAGERD_LLAMA_SERVER={cfg.llama_server} (used instead of the cache)")
    if not engines:
        print("no engine installed: run `poolmgr engines install llamacpp`")
        return 0
    for eng in engines:
        print(f"{eng.engine}\tb{eng.build}\t{eng.version or '-'}\t{eng.path}")
    return 0


def cmd_tiny_model(args: argparse.Namespace, cfg: PoolManagerConfig) -> int:
    from poolmgr.engines.tiny_model import write_tiny_model

    path = write_tiny_model(Path(args.path))
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


def cmd_devices(args: argparse.Namespace, cfg: PoolManagerConfig) -> int:
    from poolmgr.devices import backend_from_env, devices_json, devices_table, discover

    inv = discover(backend_from_env(cfg.fake_nvml))
    holders = _device_holders(cfg)
    if args.json:
        print(json.dumps(devices_json(inv, holders), indent=2))
    else:
        print(devices_table(inv, holders) if inv.devices else f"no GPU: {inv.reason or 'none found'}")
    return 0


def _device_holders(cfg: PoolManagerConfig) -> dict[str, str]:
    """uuid → pool id, from the split plans in the registry (when there is one: listing creates no database)."""
    if not cfg.database_url and not (cfg.state_dir / "poolmgr.db").exists():
        return {}
    from poolmgr.store import Registry

    reg = Registry(cfg.effective_database_url, node_id=cfg.node_id)
    try:
        return {
            uuid: pool.id
            for pool in reg.pools(node_id=cfg.node_id)
            if pool.split_plan and pool.pid is not None
            for uuid in pool.split_plan.get("device_uuids", [])
        }
    finally:
        reg.close()


def cmd_plan(args: argparse.Namespace, cfg: PoolManagerConfig) -> int:
    from poolmgr.devices import DeviceMask, backend_from_env, discover
    from poolmgr.placement import make_plan, plan_json, plan_table

    inv = discover(backend_from_env(cfg.fake_nvml))
    devices = DeviceMask.parse(args.devices).resolve(inv.devices)
    need, plan = make_plan(args.model, devices, args.ctx_size, args.slots)
    print(json.dumps(plan_json(need, plan), indent=2) if args.json else plan_table(need, plan))
    return 0


def cmd_doctor(args: argparse.Namespace, cfg: PoolManagerConfig) -> int:
    from poolmgr.isolation import doctor, doctor_table

    print(doctor_table(doctor()))
    return 0


def install_systemd_unit(unit_dir: Path, env_dir: Path, poolmgr_bin: str) -> list[Path]:
    """deploy/systemd/poolmgr.service into `unit_dir` with ExecStart running `poolmgr_bin`, and the settings
    example as `env_dir`/poolmgr.env (mode 0600) unless there is one: the paths written."""
    source = Path(__file__).resolve().parent / "systemd"
    unit = (source / "poolmgr.service").read_text()
    unit = unit.replace("ExecStart=/usr/local/bin/poolmgr ", f"ExecStart={poolmgr_bin} ")
    unit_dir.mkdir(parents=True, exist_ok=True)
    written = [unit_dir / "poolmgr.service"]
    written[0].write_text(unit)
    env = env_dir / "poolmgr.env"
    if not env.exists():
        env_dir.mkdir(parents=True, exist_ok=True)
        env.write_text((source / "poolmgr.env.example").read_text())
        env.chmod(0o600)
        written.append(env)
    return written


def cmd_setup(args: argparse.Namespace, cfg: PoolManagerConfig) -> int:
    from poolmgr.isolation import ensure_engine_user, ensure_subids
    from poolmgr.lifecycle.sandbox import engine_user

    if os.geteuid() != 0:
        raise ConfigError("poolmgr setup creates the engine user and must run as root")
    name = engine_user(cfg)
    uid, gid = ensure_engine_user(name)
    first, count = ensure_subids(name)  # rootless podman (runtime = "podman" pools) maps container ids onto these
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    print(f"engine user {name}: uid {uid} gid {gid}, subordinate ids {first}-{first + count - 1}; "
          f"state dir {cfg.state_dir}")  # fmt: skip
    _print_spawner()
    if args.systemd:
        beside = Path(sys.executable).parent / "poolmgr"  # the entry point of the environment running us
        binary = str(beside) if beside.is_file() else shutil.which("poolmgr") or "/usr/local/bin/poolmgr"
        for path in install_systemd_unit(Path(args.unit_dir), Path(args.env_dir), binary):
            print(f"wrote {path}")
        print("then: systemctl daemon-reload && systemctl enable --now poolmgr")
    return 0


def _api(cfg: PoolManagerConfig, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_token}"} if cfg.api_token else {}
    url = f"http://{cfg.addr}{path}"
    try:
        resp = httpx.request(method, url, json=body, headers=headers, timeout=30, trust_env=False)
    except httpx.HTTPError as exc:
        raise PoolmgrError(f"cannot reach poolmgr at {url}: {exc}") from None
    data = resp.json() if resp.content else {}
    if resp.status_code >= 400:
        message = data.get("error", {}).get("message", resp.text) if isinstance(data, dict) else resp.text
        raise PoolmgrError(f"{method} {path}: {resp.status_code}: {message}")
    return data


def _op(method: str, path: Callable[[argparse.Namespace], str], body: Callable[[argparse.Namespace], Any]) -> Any:
    def run(args: argparse.Namespace, cfg: PoolManagerConfig) -> int:
        data = _api(cfg, method, path(args), body(args))
        print(json.dumps(data, indent=2))
        return 0

    return run


def _register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the daemon: pools, supervision and the HTTP API")
    p.add_argument("--config", help="pools file (TOML); default POOL_MANAGERD_CONFIG")
    p.add_argument("--keep-engines", action="store_true", help="on exit leave engines serving (upgrade mode)")
    p.add_argument("--log-format", choices=("json", "text"), default=None)
    p.set_defaults(handler=cmd_serve)

    eng = sub.add_parser("engines", help="install or list engine binaries").add_subparsers(dest="sub", required=True)
    p = eng.add_parser("install", help="build llama-server from the llama.cpp sources (cached)")
    p.add_argument("engine", choices=("llamacpp",))
    p.add_argument("--fast", action="store_true", help="-O0 build: about half the compile time")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(handler=cmd_engines_install)
    eng.add_parser("list", help="installed engines and versions").set_defaults(handler=cmd_engines_list)

    dev = sub.add_parser("dev", help="developer helpers").add_subparsers(dest="sub", required=True)
    p = dev.add_parser("tiny-model", help="write a tiny deterministic llama GGUF for demos and tests")
    p.add_argument("path")
    p.set_defaults(handler=cmd_tiny_model)

    p = sub.add_parser("devices", help="discovered GPUs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_devices)

    p = sub.add_parser("plan", help="VRAM need and split plan for a model on devices (starts nothing)")
    p.add_argument("--model", required=True)
    p.add_argument("--devices", required=True, help='device mask, e.g. "0,1"')
    p.add_argument("--ctx-size", type=int, default=4096)
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_plan)

    sub.add_parser("doctor", help="isolation layers this machine supports").set_defaults(handler=cmd_doctor)
    p = sub.add_parser("setup", help="create the engine user and state dir (root); --systemd: the unit too")
    p.add_argument("--systemd", action="store_true", help="install the systemd unit and /etc/poolmgr/poolmgr.env")
    p.add_argument("--unit-dir", default="/etc/systemd/system", help=argparse.SUPPRESS)
    p.add_argument("--env-dir", default="/etc/poolmgr", help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_setup)
    _register_ops(sub)
    _register_desired(sub)


def cmd_apply(args: argparse.Namespace, cfg: PoolManagerConfig) -> int:
    """This node's file pools become FILE's: checked as `validate` checks it, written to the registry (a running
    serve acts on it within a heartbeat); prints what it adds, changes and removes."""
    from poolmgr.lifecycle.desired import apply_pools
    from poolmgr.store import Registry
    from poolmgr.validation import check_pools_file

    checked = check_pools_file(Path(args.file), cfg)
    registry = Registry(cfg.effective_database_url, node_id=cfg.node_id)
    try:
        done = apply_pools(registry, list(checked.specs))
    finally:
        registry.close()
    for line in done.lines() or ["no change"]:
        print(line)
    return 0


def cmd_pool_rm(args: argparse.Namespace, cfg: PoolManagerConfig) -> int:
    """Remove one of this node's pools: it drains, stops, then its row goes (a running serve does it)."""
    from poolmgr.lifecycle.desired import remove_pool
    from poolmgr.store import Registry

    registry = Registry(cfg.effective_database_url, node_id=cfg.node_id)
    try:
        view = remove_pool(registry, args.pool_id)
    finally:
        registry.close()
    print(f"removing {view.id} (state {view.state.value}): it drains, stops, then leaves the registry")
    return 0


def _register_desired(sub: Any) -> None:
    p = sub.add_parser("apply", help="make a pools file this node's pools (prints what it adds, changes, removes)")
    p.add_argument("-f", "--file", required=True, help="pools file (TOML), checked like `validate`")
    p.set_defaults(handler=cmd_apply)
    pool = sub.add_parser("pool", help="change this node's pools").add_subparsers(dest="sub", required=True)
    p = pool.add_parser("rm", help="remove a pool: it drains, stops, then leaves the registry")
    p.add_argument("pool_id")
    p.set_defaults(handler=cmd_pool_rm)


def _register_ops(sub: Any) -> None:
    p = sub.add_parser("drain", help="drain a pool of a running serve")
    p.add_argument("pool_id")
    p.add_argument("--deadline-ms", type=int, default=30_000)
    p.set_defaults(handler=_op("POST", lambda a: f"/pools/{a.pool_id}/drain", lambda a: {"deadline_ms": a.deadline_ms}))
    p = sub.add_parser("reload", help="drain a pool and start another model (rolls back on failure)")
    p.add_argument("pool_id")
    p.add_argument("--model", required=True)
    p.add_argument("--drain-deadline-ms", type=int, default=30_000)
    p.set_defaults(
        handler=_op(
            "POST",
            lambda a: f"/pools/{a.pool_id}/reload",
            lambda a: {"model": a.model, "drain_deadline_ms": a.drain_deadline_ms},
        )
    )
    p = sub.add_parser("preload", help="start a stopped pool again")
    p.add_argument("pool_id")
    p.set_defaults(handler=_op("POST", lambda a: f"/pools/{a.pool_id}/preload", lambda a: None))
    p = sub.add_parser("breaker-reset", help="close a pool's open circuit breaker")
    p.add_argument("pool_id")
    p.set_defaults(handler=_op("POST", lambda a: f"/pools/{a.pool_id}/breaker/reset", lambda a: None))


COMMANDS: list[Callable[[Any], None]] = [_register]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(2)
