"""poolmgr.validation in-process: the host checks, NVML asked only when a GPU pool needs it, and one parser of
`[pool.isolation]` for the pools file and for the engine's isolation."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from poolmgr.devices import FakeNvmlBackend, Inventory, discover
from poolmgr.errors import ConfigError, ConfigProblems
from poolmgr.isolation import build_isolation
from poolmgr.poolsfile import PoolSpec, parse_pools
from poolmgr.settings import PoolManagerConfig
from poolmgr.validation import check_pools_file, validate_pools

from ._run import H100_NVML, HETERO_NVML


def _no_nvml() -> Inventory:
    raise AssertionError("NVML was asked about a file without GPU pools")


def test_cpu_pools_never_ask_nvml() -> None:
    checked = validate_pools([PoolSpec(id="a", model="/m"), PoolSpec(id="b", model="/m")], _no_nvml, source="f")
    assert [s.id for s in checked.specs] == ["a", "b"]
    assert (checked.devices, checked.warnings, checked.inventory) == ({}, [], None)


def test_gpu_pools_are_resolved_against_the_discovered_devices() -> None:
    inventory = discover(FakeNvmlBackend(HETERO_NVML), warn=False)
    specs = [PoolSpec(id="x", model="/m", device_mask="GPU1,0"), PoolSpec(id="c", model="/m")]
    checked = validate_pools(specs, lambda: inventory, source="f")
    assert [d.index for d in checked.devices["x"]] == [1, 0]
    assert "c" not in checked.devices and checked.inventory is inventory


def test_every_problem_is_raised_together_one_line_each() -> None:
    inventory = discover(FakeNvmlBackend(H100_NVML), warn=False)
    specs = [
        PoolSpec(id="a", model="/m", device_mask="banana"),
        PoolSpec(id="b", model="/m", device_mask="3"),
        PoolSpec(id="c", model="/m", device_mask="0"),
        PoolSpec(id="d", model="/m", device_mask="GPU0"),
        PoolSpec(id="e", model="/m", isolation={"user": "no-such-user-poolmgr"}),
    ]
    with pytest.raises(ConfigProblems) as caught:
        validate_pools(specs, inventory, source="f.toml")
    fields = [p.split(": ", 3)[:3] for p in caught.value.problems]
    assert fields == [
        ["f.toml", "pool 'a'", "field 'device_mask'"],
        ["f.toml", "pool 'b'", "field 'device_mask'"],
        ["f.toml", "pool 'd'", "field 'device_mask'"],  # shares GPU 0 with 'c', neither says share_devices
        ["f.toml", "pool 'e'", "field 'isolation.user'"],
    ]
    assert str(caught.value).splitlines() == list(caught.value.problems)


def test_a_file_and_the_settings_are_checked_together(tmp_path: Path) -> None:
    path = tmp_path / "pools.toml"
    path.write_text('[[pool]]\nid = "a"\nmodel = "/m"\nslots = 0\n')
    cfg = PoolManagerConfig(addr="0.0.0.0:9200", state_dir=tmp_path / "state")
    with pytest.raises(ConfigProblems) as caught:
        check_pools_file(path, cfg)
    assert len(caught.value.problems) == 2
    assert caught.value.problems[0].startswith("POOL_MANAGERD_ADDR=0.0.0.0:9200: refusing")
    assert caught.value.problems[1].startswith(f"{path}: pool 'a': field 'slots': ")
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("key", "value"), [("memory_max", '"8X"'), ("cpu_max", "0"), ("pids_max", "-1"), ("landlock", '"no"')]
)
def test_the_pools_file_and_the_engine_isolation_share_one_parser(key: str, value: str) -> None:
    with pytest.raises(ConfigProblems) as from_file:
        parse_pools(f'[[pool]]\nid = "p"\nmodel = "/m"\n[pool.isolation]\n{key} = {value}\n', source="f")
    [line] = from_file.value.problems
    why = line.split(f"field 'isolation.{key}': ", 1)[1]
    raw = _toml_value(value)
    with pytest.raises(ConfigError) as from_spawn:
        build_isolation({key: raw}, engine_user="", workdir_root=Path("/w"), pool_id="p")
    assert str(from_spawn.value) == f"pool 'p': isolation.{key}: {why}"


def _toml_value(value: str) -> object:
    return tomllib.loads(f"v = {value}")["v"]
