"""Building a pool's IsolationSpec from poolmgr's defaults and the pool file's `isolation` table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from poolmgr.errors import ConfigError
from poolmgr.isolation import IsolationSpec, build_isolation
from poolmgr.poolsfile import parse_pools


def _build(overrides: dict[str, object], **kw: object) -> IsolationSpec:
    args: dict[str, object] = {
        "engine_user": "poolmgr-engine",
        "workdir_root": Path("/var/lib/poolmgr/engines"),
        "pool_id": "tiny",
    }
    args.update(kw)
    return build_isolation(overrides, **args)  # type: ignore[arg-type]


def test_defaults_switch_user_drop_everything_and_keep_core_dumps_off() -> None:
    spec = _build({}, readable_paths=[Path("/models/tiny.gguf")])
    assert spec.user == "poolmgr-engine" and spec.group is None
    assert spec.workdir == Path("/var/lib/poolmgr/engines/tiny")
    assert (spec.drop_caps, spec.no_new_privs, spec.seccomp, spec.landlock, spec.clean_env) == (True,) * 5
    assert spec.readable_paths == (Path("/models/tiny.gguf"),)
    assert ("CORE", 0, 0) in spec.rlimits
    assert "AS" not in {name for name, _s, _h in spec.rlimits}
    assert (spec.memory_max_bytes, spec.cpu_max, spec.pids_max) == (None, None, None)


def test_empty_engine_user_means_no_switch_requested() -> None:
    assert _build({}, engine_user="").user is None


def test_pool_file_overrides_apply() -> None:
    text = """
    [[pool]]
    id = "big"
    model = "/m.gguf"
    [pool.isolation]
    user = "llm"
    group = 4242
    seccomp = false
    landlock = false
    memory_max = "8G"
    cpu_max = 2.5
    pids_max = 512
    """
    pool = parse_pools(text)[0]
    spec = _build(pool.isolation, pool_id=pool.id)
    assert (spec.user, spec.group, spec.seccomp, spec.landlock) == ("llm", 4242, False, False)
    assert spec.memory_max_bytes == 8 * 1024**3
    assert spec.cpu_max == (250_000, 100_000)
    assert spec.pids_max == 512


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1024, 1024), ("512M", 512 * 1024**2), ("2GiB", 2 * 1024**3), ("1t", 1024**4), ("4096", 4096)],
)
def test_memory_max_accepts_bytes_and_sizes(value: object, expected: int) -> None:
    assert _build({"memory_max": value}).memory_max_bytes == expected


@pytest.mark.parametrize(("value", "expected"), [("50000 100000", (50_000, 100_000)), (1, (100_000, 100_000))])
def test_cpu_max_accepts_cpus_or_quota_and_period(value: object, expected: tuple[int, int]) -> None:
    assert _build({"cpu_max": value}).cpu_max == expected


def test_unknown_key_names_the_pool_and_the_key() -> None:
    with pytest.raises(ConfigError, match=r"pool 'tiny': isolation\.network: unknown key"):
        _build({"network": "none"})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("memory_max", "lots"),
        ("memory_max", 0),
        ("cpu_max", "max"),
        ("cpu_max", True),
        ("pids_max", -1),
        ("seccomp", "yes"),
        ("user", ""),
        ("group", 1.5),
    ],
)
def test_bad_override_values_name_the_pool_and_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"pool 'tiny': isolation\.{key}: "):
        _build({key: value})


def test_address_space_rlimit_is_refused() -> None:
    with pytest.raises(ConfigError, match="RLIMIT_AS"):
        IsolationSpec(pool_id="p", workdir=Path("/w"), rlimits=(("AS", 1 << 30, 1 << 30),))


def test_spec_survives_a_json_round_trip() -> None:
    spec = _build({"memory_max": "1G", "cpu_max": "20000 100000", "pids_max": 9, "group": "video"})
    spec = IsolationSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert spec == _build({"memory_max": "1G", "cpu_max": "20000 100000", "pids_max": 9, "group": "video"})
