"""make_plan / plan_table / plan_json: what `poolmgr plan --model PATH --devices MASK` shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from poolmgr.engines.tiny_model import write_tiny_model
from poolmgr.errors import ConfigError, InsufficientVram
from poolmgr.placement import SplitPlan, make_plan, plan_json, plan_table

from ._helpers import GIB, H100_SNAPSHOT, HETERO_SNAPSHOT, LLAMA_70B, devices_from_snapshot, write_sparse_llama_gguf

HETERO = devices_from_snapshot(HETERO_SNAPSHOT)
H100 = devices_from_snapshot(H100_SNAPSHOT)


@pytest.fixture(scope="module")
def llama_70b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sparse_llama_gguf(tmp_path_factory.mktemp("models") / "llama-70b-q4_k.gguf", **LLAMA_70B)


def test_tiny_model_on_the_h100_renders_one_unsplit_device(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "tiny.gguf")
    need, plan = make_plan(model, H100, ctx_size=2048, slots=4)
    assert plan.ratios == [1.0]
    table = plan_table(need, plan)
    assert str(model) in table
    assert "context 2048 = 4 slot(s) x 512" in table
    assert H100[0].uuid in table
    assert "2+out" in table
    assert table.rstrip().endswith("flags   --n-gpu-layers 3 --fit off")


def test_seventy_b_over_three_gpus_renders_every_device_and_the_split_flags(llama_70b: Path) -> None:
    need, plan = make_plan(llama_70b, HETERO, ctx_size=8192, slots=1)
    table = plan_table(need, plan)
    for i, dev in enumerate(HETERO):
        row = next(line for line in table.splitlines() if line.startswith(dev.uuid))
        assert f"{dev.vram_free_bytes / GIB:.2f} GiB" in row
        assert f"{plan.per_device_bytes[i] / GIB:.2f} GiB" in row
        assert f"{plan.ratios[i]:.6f}" in row
    assert " ".join(plan.to_tensor_split_flags()) in table
    assert f"= {need.total_bytes / GIB:.2f} GiB on one device" in table


def test_plan_json_is_serialisable_and_consistent(llama_70b: Path) -> None:
    need, plan = make_plan(llama_70b, HETERO, ctx_size=8192, slots=2)
    doc = json.loads(json.dumps(plan_json(need, plan)))
    assert doc["model"] == str(llama_70b)
    assert (doc["ctx_size"], doc["slots"], doc["ctx_per_slot"]) == (8192, 2, 4096)
    assert sum(doc["need"]["parts"].values()) == doc["need"]["total_bytes"] == need.total_bytes
    assert [row["uuid"] for row in doc["devices"]] == [d.uuid for d in HETERO]
    assert sum(row["layers"] for row in doc["devices"]) == 80
    assert [row["output_layer"] for row in doc["devices"]] == [False, False, True]
    assert all(row["left_bytes"] >= plan.headroom_bytes for row in doc["devices"])
    assert SplitPlan.from_dict(doc["plan"]) == plan
    assert doc["flags"][:2] == ["--n-gpu-layers", "81"]


def test_make_plan_validates_a_user_tensor_split(llama_70b: Path) -> None:
    _, plan = make_plan(llama_70b, HETERO, ctx_size=8192, tensor_split=[1, 0.25, 3])
    assert plan.explicit
    with pytest.raises(InsufficientVram, match="RTX 3060"):
        make_plan(llama_70b, HETERO, ctx_size=8192, tensor_split=[1, 8, 1])


def test_make_plan_reports_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        make_plan(tmp_path / "missing.gguf", H100, ctx_size=512)
    model = write_tiny_model(tmp_path / "tiny.gguf")
    with pytest.raises(ConfigError, match="slots"):
        make_plan(model, H100, ctx_size=512, slots=0)
