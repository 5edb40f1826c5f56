"""The pools file's `idle_unload_s` and `load_on_demand`: their defaults, the values they take, and the one line
naming the pool and the field that a bad value gets."""

from __future__ import annotations

import pytest

from poolmgr.errors import ConfigProblems
from poolmgr.poolsfile import MAX_IDLE_UNLOAD_S, PoolSpec, parse_pools

BASE = '[[pool]]\nid = "p"\nmodel = "/m.gguf"\n'


def test_by_default_a_pool_is_never_unloaded_and_never_started_by_a_request() -> None:
    (spec,) = parse_pools(BASE)
    assert spec.idle_unload_s is None and spec.load_on_demand is False


@pytest.mark.parametrize(("text", "seconds"), [("600", 600.0), ("2.5", 2.5), (str(MAX_IDLE_UNLOAD_S), 31536000.0)])
def test_idle_unload_s_takes_seconds_and_load_on_demand_a_bool(text: str, seconds: float) -> None:
    (spec,) = parse_pools(BASE + f"idle_unload_s = {text}\nload_on_demand = true\n")
    assert (spec.idle_unload_s, spec.load_on_demand) == (seconds, True)
    assert PoolSpec.from_json(spec.to_json()) == spec  # stored with the pool's row and read back


def test_a_spec_stored_before_the_fields_existed_reads_with_their_defaults() -> None:
    stored = parse_pools(BASE)[0].to_json()
    del stored["idle_unload_s"], stored["load_on_demand"]
    spec = PoolSpec.from_json(stored)
    assert (spec.idle_unload_s, spec.load_on_demand) == (None, False)


@pytest.mark.parametrize(
    ("line", "field", "why"),
    [
        ("idle_unload_s = 0", "idle_unload_s", "must be a number of seconds > 0"),
        ("idle_unload_s = -5", "idle_unload_s", "got -5"),
        ('idle_unload_s = "10m"', "idle_unload_s", "got '10m'"),
        ("idle_unload_s = true", "idle_unload_s", "got True"),
        ("idle_unload_s = inf", "idle_unload_s", "got inf"),
        ("idle_unload_s = 31536001", "idle_unload_s", f"at most {MAX_IDLE_UNLOAD_S}"),
        ('load_on_demand = "yes"', "load_on_demand", "must be true or false, got 'yes'"),
        ("load_on_demand = 1", "load_on_demand", "must be true or false, got 1"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_pool_and_the_field(line: str, field: str, why: str) -> None:
    with pytest.raises(ConfigProblems) as caught:
        parse_pools(BASE + line + "\n", source="pools.toml")
    (problem,) = caught.value.problems
    assert problem.startswith(f"pools.toml: pool 'p': field {field!r}: ") and why in problem, problem
