"""Steps for features/placement/gpu_pools.feature: GPU placement under a real serve on a recorded H100."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from tests.config._run import databases, error_lines, run_cli
from tests.e2e.conftest import Serve, engine_pids, pools_toml
from tests.placement._helpers import LLAMA_70B, write_sparse_llama_gguf

pytestmark = pytest.mark.e2e

scenarios("placement/gpu_pools.feature")

H100 = Path(__file__).resolve().parents[1] / "fixtures" / "gpu" / "h100-80gb-hbm3" / "nvml-snapshot.json"
H100_UUID = "GPU-ce457ed6-3363-954f-622b-78199190f4f2"
NO_NVML = Path(__file__).resolve().parents[1] / "fixtures" / "gpu" / "no-nvml-synthetic" / "nvml-snapshot.json"


@pytest.fixture(scope="module")
def model_70b(shared_dir: Path) -> Path:
    path = write_sparse_llama_gguf(shared_dir / "llama-70b.gguf", **LLAMA_70B)
    path.chmod(0o644)
    return path


@pytest.fixture
def box() -> dict[str, Any]:
    return {}


def _start(
    box: dict[str, Any], serve_factory: Any, db: str, pool: dict[str, Any], *more: dict[str, Any], nvml: Path = H100
) -> None:
    srv: Serve = serve_factory(
        db,
        POOL_MANAGERD_FAKE_NVML=str(nvml),
        POOL_MANAGERD_BACKOFF_INITIAL_MS="60000",
        POOL_MANAGERD_BACKOFF_MAX_MS="60000",
    )
    srv.write_pools(pool, *more)
    srv.start()
    box["srv"], box["pool"] = srv, pool["id"]


@given(
    parsers.parse(
        'a running poolmgr on the recorded H100 with a GPU pool "{pool}" on device "{mask}" for a 70B model '
        "with a {ctx:d} context"
    )
)
def big_pool(
    box: dict[str, Any], serve_factory: Any, sqlite_url: str, model_70b: Path, pool: str, mask: str, ctx: int
) -> None:
    _start(box, serve_factory, sqlite_url, {"id": pool, "model": str(model_70b), "device_mask": mask, "ctx_size": ctx})


@given(
    parsers.parse(
        'a running poolmgr on the recorded H100 with a GPU pool "{pool}" on device "{mask}" for the tiny model'
    )
)
def tiny_gpu_pool(
    box: dict[str, Any], serve_factory: Any, sqlite_url: str, tiny_model: Path, pool: str, mask: str
) -> None:
    _start(box, serve_factory, sqlite_url, {"id": pool, "model": str(tiny_model), "device_mask": mask})


@then(parsers.parse('"{pool}" fails its preload with reason "{reason}"'))
def fails_with(box: dict[str, Any], pool: str, reason: str) -> None:
    srv: Serve = box["srv"]
    srv.wait_for(pool, lambda s: s["last_error"] is not None, what="a preload failure")
    failed = [e for e in srv.events(pool) if e["kind"] == "preload_failed"]
    assert failed and failed[0]["reason"] == reason, failed
    box["status"] = srv.status(pool)


@then("its last_error says how much is needed and how much the H100 has")
def says_need(box: dict[str, Any]) -> None:
    err = box["status"]["last_error"]
    assert "does not fit" in err and H100_UUID in err, err
    assert "needs 93.14 GiB" in err and "has 79.18 GiB free" in err, err


@then(parsers.parse('no engine of "{pool}" was ever spawned'))
def never_spawned(box: dict[str, Any], pool: str) -> None:
    srv: Serve = box["srv"]
    triggers = [e["trigger"] for e in srv.events(pool) if e["trigger"]]
    assert triggers[:2] == ["place", "preload_failed"], triggers
    assert "start_preload" not in triggers
    assert engine_pids(pool) == []
    assert not (srv.workdir / "state" / "logs" / f"{pool}.log").exists()


@then(parsers.parse('the split plan of "{pool}" names the H100\'s uuid'))
def split_plan(box: dict[str, Any], pool: str) -> None:
    plan = box["status"]["split_plan"]
    assert plan is not None and plan["device_uuids"] == [H100_UUID]


@then(parsers.parse('no engine of "{pool}" is left running'))
def none_left(box: dict[str, Any], pool: str) -> None:
    time.sleep(0.2)
    assert engine_pids(pool) == []
    assert box["status"]["pid"] is None


@given(
    parsers.parse('a pools file on the recorded H100 with a GPU pool "{pool}" on device "{mask}" for the tiny model')
)
def pools_file_only(box: dict[str, Any], tmp_path: Path, tiny_model: Path, pool: str, mask: str) -> None:
    path = tmp_path / "pools.toml"
    path.write_text(pools_toml({"id": pool, "model": str(tiny_model), "device_mask": mask}))
    box["pools"], box["pool"] = path, pool


@when("poolmgr serve is started with it")
def serve_refused(box: dict[str, Any], tmp_path: Path) -> None:
    box["state"] = tmp_path / "state"
    env = {"POOL_MANAGERD_FAKE_NVML": str(H100)}
    box["proc"] = run_cli(["serve", "--config", str(box["pools"])], box["state"], env)


@then(parsers.parse('serve exits with code 2 and one line naming pool "{pool}" and field "{fld}"'))
def exits_2(box: dict[str, Any], pool: str, fld: str) -> None:
    proc = box["proc"]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = error_lines(proc.stderr)
    assert proc.stderr.strip().splitlines() == [f"poolmgr: error: {line}"]
    assert line.startswith(f"{box['pools']}: pool {pool!r}: field {fld!r}: "), line
    box["line"] = line


@then("the line lists the valid devices")
def lists_valid(box: dict[str, Any]) -> None:
    assert f"unknown device '3'; valid: cpu, 0 = GPU0 = {H100_UUID}" in box["line"]


@then(parsers.parse('serve created no database and spawned no engine of "{pool}"'))
def nothing_started(box: dict[str, Any], pool: str) -> None:
    assert databases(box["state"]) == [] and not box["state"].exists()
    assert engine_pids(pool) == []


@given(
    parsers.parse('a running poolmgr on a host without an NVIDIA driver with a GPU pool "{gpu}" and a CPU pool "{cpu}"')
)
def no_driver(box: dict[str, Any], serve_factory: Any, sqlite_url: str, tiny_model: Path, gpu: str, cpu: str) -> None:
    _start(
        box,
        serve_factory,
        sqlite_url,
        {"id": gpu, "model": str(tiny_model), "device_mask": "0"},
        {"id": cpu, "model": str(tiny_model), "device_mask": "cpu"},
        nvml=NO_NVML,
    )


@then(parsers.parse('CPU pool "{pool}" is ready'))
def cpu_ready(box: dict[str, Any], pool: str) -> None:
    status = box["srv"].wait_state(pool, "ready")
    assert status["device_mask"] == "cpu" and status["pid"] in engine_pids(pool)
    assert "no NVIDIA driver" in box["srv"].log_path.read_text()
