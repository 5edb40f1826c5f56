"""The CLI: bad settings and bad pools files are one readable line and exit 2, and touch no database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("POOL_MANAGERD_")}
    base["POOL_MANAGERD_STATE_DIR"] = str(tmp_path / "state")
    base.update(env)
    return subprocess.run(
        [sys.executable, "-m", "poolmgr.cli", *args], env=base, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("ADDR", "not-an-address", "POOL_MANAGERD_ADDR='not-an-address': not a valid address"),
        ("ADDR", "127.0.0.1:70000", "port 70000 is out of range (allowed 1-65535)"),
        ("BACKOFF_INITIAL_MS", "90000", "must not exceed POOL_MANAGERD_BACKOFF_MAX_MS=60000"),
        ("RESTART_RATE_LIMIT", "0", "POOL_MANAGERD_RESTART_RATE_LIMIT=0: must be a positive integer"),
        ("CIRCUIT_BREAKER_THRESHOLD", "many", "POOL_MANAGERD_CIRCUIT_BREAKER_THRESHOLD='many': must be an integer"),
        ("LOG_FORMAT", "xml", "allowed values are json, text"),
        ("DATABASE_URL", "mysql://x", "must be a sqlite:/// or postgresql:// URL"),
    ],
)
def test_bad_setting_is_one_line_exit_2_and_no_database(tmp_path: Path, var: str, value: str, message: str) -> None:
    proc = run(["pools"], tmp_path, **{f"POOL_MANAGERD_{var}": value})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[pool]]\nid = "Bad!"\nmodel = "/m"\n', "field 'id': must match"),
        ('[[pool]]\nid = "a"\nmodel = "/m"\n[[pool]]\nid = "a"\nmodel = "/m"\n', "pool 'a': field 'id': duplicate"),
        ('[[pool]]\nid = "a"\nengine = "vllm"\nmodel = "/m"\n', "pool 'a': field 'engine': unknown engine 'vllm'"),
        ('[[pool]]\nid = "a"\nmodel = "/m"\nslots = 0\n', "pool 'a': field 'slots': must be a positive integer"),
        ('[[pool]]\nid = "a"\nmodel = "/m"\nctx_size = -5\n', "pool 'a': field 'ctx_size'"),
        ('[[pool]]\nid = "a"\n', "pool 'a': field 'model': must be a non-empty path"),
        ('[[pool]]\nid = "a"\nmodel = "/m"\ncolour = "red"\n', "pool 'a': field 'colour': unknown field"),
        ("[[pool]\n", "not valid TOML"),
    ],
)
def test_bad_pools_file_names_pool_and_field_exit_2(tmp_path: Path, toml: str, message: str) -> None:
    pools = tmp_path / "pools.toml"
    pools.write_text(toml)
    for args in (["validate", "--config", str(pools)], ["serve", "--config", str(pools)]):
        proc = run(args, tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "state").exists()


def test_validate_accepts_a_good_file(tmp_path: Path) -> None:
    pools = tmp_path / "pools.toml"
    pools.write_text('[[pool]]\nid = "a"\nmodel = "/m.gguf"\n[[pool]]\nid = "b.2"\nmodel = "/n.gguf"\nslots = 4\n')
    proc = run(["validate", "--config", str(pools)], tmp_path)
    assert proc.returncode == 0
    assert "2 pool(s) valid: a, b.2" in proc.stdout


def test_missing_pools_file_is_one_line(tmp_path: Path) -> None:
    proc = run(["validate", "--config", str(tmp_path / "nope.toml")], tmp_path)
    assert proc.returncode == 2
    assert "cannot read pools file: No such file or directory" in proc.stderr


def test_migrate_pools_and_events_on_a_fresh_database(tmp_path: Path) -> None:
    proc = run(["migrate"], tmp_path)
    assert proc.returncode == 0 and f"database at revision {_head_revision()}" in proc.stdout
    assert (tmp_path / "state" / "poolmgr.db").exists()
    proc = run(["pools", "--json"], tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
    proc = run(["events"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("ID")


def test_devices_shows_which_pool_holds_each_gpu(tmp_path: Path) -> None:
    from poolmgr.lifecycle.effects import EngineRecorded, Placed, PreloadStarted
    from poolmgr.lifecycle.fsm import fire
    from poolmgr.lifecycle.placing import Placement
    from poolmgr.poolsfile import PoolSpec
    from poolmgr.store import Registry, migrate

    snapshot = Path(__file__).parent / "fixtures" / "gpu" / "hetero-3gpu-synthetic" / "nvml-snapshot.json"
    url = f"sqlite:///{tmp_path / 'state' / 'poolmgr.db'}"
    migrate(url)
    reg = Registry(url, node_id="node-x")
    reg.register(PoolSpec(id="big", model="/m.gguf", device_mask="0,1"))
    uuids = ["GPU-4090aaaa-1111-2222-3333-444455556666", "GPU-3060bbbb-1111-2222-3333-444455556666"]
    fire(reg, "big", Placed())
    fire(reg, "big", PreloadStarted(Placement(env={}, device_uuids=uuids, split_plan={"device_uuids": uuids})))
    fire(reg, "big", EngineRecorded(4242, 1))
    reg.close()
    proc = run(["devices", "--json"], tmp_path, POOL_MANAGERD_FAKE_NVML=str(snapshot), POOL_MANAGERD_NODE_ID="node-x")
    assert proc.returncode == 0, proc.stderr
    held = {d["uuid"]: d["pool"] for d in json.loads(proc.stdout)}
    assert held[uuids[0]] == "big" and held[uuids[1]] == "big"
    assert held["GPU-a100cccc-1111-2222-3333-444455556666"] is None


def _head_revision() -> str:
    """The newest migration: what `migrate` brings a fresh database to."""
    from alembic.script import ScriptDirectory

    from poolmgr.store._db import alembic_config

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head
