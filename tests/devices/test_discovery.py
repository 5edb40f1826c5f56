"""Discovery over the recorded H100, the synthetic 3-GPU host with MIG, the no-driver host, and the real NVML."""

from __future__ import annotations

import copy
import ctypes
import logging
from pathlib import Path

import pynvml
import pytest

from poolmgr.devices import (
    MIG_INDEX_BASE,
    FakeNvmlBackend,
    RealNvmlBackend,
    backend_from_env,
    discover,
)
from poolmgr.errors import ConfigError
from poolmgr.settings import PoolManagerConfig

from .gpu_fixtures import H100, HETERO, NO_NVML, load_json

NO_DRIVER_TAIL = "GPU pools will not be placed, CPU pools run"


def test_h100_snapshot_gives_one_gpu_with_recorded_fields(h100_backend: FakeNvmlBackend) -> None:
    raw = load_json(H100)["devices"][0]
    inv = discover(h100_backend)
    assert inv.available and inv.reason is None and inv.problems == []
    assert inv.driver_version == "580.159.04"
    [dev] = inv.devices
    assert (dev.index, dev.uuid, dev.name) == (0, raw["uuid"], raw["name"])
    assert dev.pci_bus_id == "00000000:00:06.0"
    assert dev.compute_capability == (9, 0)
    assert dev.vram_total_bytes == raw["memory_info_v2"]["total"]
    assert not dev.mig_enabled and not dev.is_mig and dev.parent_uuid is None
    assert dev.processes == ()


def test_memory_v2_is_preferred_so_the_driver_reservation_is_reported(h100_backend: FakeNvmlBackend) -> None:
    v2 = load_json(H100)["devices"][0]["memory_info_v2"]
    [dev] = discover(h100_backend).devices
    assert dev.vram_reserved_bytes == v2["reserved"] > 0
    assert dev.vram_free_bytes == v2["free"]


@pytest.mark.parametrize(("error", "code"), [("NVMLError_FunctionNotFound", 13), ("NVMLError_NotSupported", 3)])
def test_memory_falls_back_to_v1_when_v2_is_refused(error: str, code: int) -> None:
    data = load_json(H100)
    data["devices"][0]["memory_info_v2"] = {"nvml_error": error, "code": code, "str": "refused"}
    v1 = data["devices"][0]["memory_info_v1"]
    [dev] = discover(FakeNvmlBackend(data)).devices
    assert (dev.vram_total_bytes, dev.vram_free_bytes) == (v1["total"], v1["free"])
    assert dev.vram_reserved_bytes == 0  # v1 folds it into `used`


def test_mig_instances_appear_as_devices_of_their_own(hetero_backend: FakeNvmlBackend) -> None:
    raw = load_json(HETERO)["devices"]
    inv = discover(hetero_backend)
    assert [d.uuid for d in inv.devices] == [
        raw[0]["uuid"],
        raw[1]["uuid"],
        raw[2]["uuid"],
        *(m["uuid"] for m in raw[2]["mig_devices"]),
    ]
    parent = inv.devices[2]
    assert parent.mig_enabled and not parent.is_mig
    migs = inv.devices[3:]
    assert all(m.is_mig and m.parent_uuid == parent.uuid and m.uuid.startswith("MIG-") for m in migs)
    assert [m.index for m in migs] == [2 * MIG_INDEX_BASE + m["index"] for m in raw[2]["mig_devices"]]
    # MIG instances answer memory v1 only and share the parent's compute capability and PCI id
    assert [m.vram_total_bytes for m in migs] == [m["memory_info_v1"]["total"] for m in raw[2]["mig_devices"]]
    assert all(m.compute_capability == (8, 0) and m.pci_bus_id == parent.pci_bus_id for m in migs)
    assert parent not in inv.placeable and all(m in inv.placeable for m in migs)


def test_compute_processes_are_carried_on_each_snapshot(hetero_backend: FakeNvmlBackend) -> None:
    raw = load_json(HETERO)["devices"][1]["compute_processes"]
    inv = discover(hetero_backend)
    assert inv.devices[1].processes == tuple((p["pid"], p["usedGpuMemory"]) for p in raw)
    assert inv.devices[0].processes == ()


def test_refused_optional_fields_give_defaults_not_failures() -> None:
    data = load_json(H100)
    dev = data["devices"][0]
    dev["compute_processes"] = {"nvml_error": "NVMLError_NoPermission", "code": 4, "str": "no"}
    dev["cuda_compute_capability"] = {"nvml_error": "NVMLError_NotSupported", "code": 3, "str": "no"}
    inv = discover(FakeNvmlBackend(data))
    assert inv.problems == []
    assert inv.devices[0].processes == () and inv.devices[0].compute_capability == (0, 0)


def test_no_driver_gives_empty_inventory_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="poolmgr.devices")
    inv = discover(FakeNvmlBackend(NO_NVML))
    assert (inv.available, inv.devices, inv.driver_version) == (False, [], None)
    assert inv.reason is not None and inv.reason.startswith("no NVIDIA driver")
    assert "NVMLError_LibraryNotFound" in inv.reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == f"{inv.reason}; {NO_DRIVER_TAIL}"


def test_no_driver_on_a_refresh_logs_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="poolmgr.devices")
    inv = discover(FakeNvmlBackend(NO_NVML), warn=False)
    assert not inv.available
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


def _libnvidia_ml_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_real_backend_on_this_host() -> None:
    inv = discover(RealNvmlBackend(), warn=False)
    if _libnvidia_ml_present():
        assert inv.available and inv.driver_version and inv.devices
        assert all(d.uuid.startswith(("GPU-", "MIG-")) for d in inv.devices)
    else:  # the CPU machines this project is tested on: nvidia-ml-py raises LibraryNotFound
        assert (inv.available, inv.devices) == (False, [])
        assert inv.reason is not None and "LibraryNotFound" in inv.reason


def test_real_backend_init_raises_the_pynvml_error_without_a_driver() -> None:
    if _libnvidia_ml_present():
        pytest.skip("this host has the NVIDIA driver")
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        RealNvmlBackend().init()


def test_a_gpu_lost_during_discovery_is_skipped_and_reported(
    hetero_backend: FakeNvmlBackend, caplog: pytest.LogCaptureFixture
) -> None:
    before = discover(hetero_backend)
    lost = before.devices[1].uuid
    hetero_backend.fail_device(lost)
    after = discover(hetero_backend)
    assert after.available and lost not in {d.uuid for d in after.devices}
    assert len(after.problems) == 1 and "GPU 1 skipped" in after.problems[0]
    assert "NVMLError_GpuIsLost" in after.problems[0]
    assert any(r.levelno == logging.WARNING and "GPU 1 skipped" in r.getMessage() for r in caplog.records)
    assert after.vanished_since(before) == [lost]


def test_losing_a_mig_parent_loses_its_instances(hetero_backend: FakeNvmlBackend) -> None:
    before = discover(hetero_backend)
    parent = before.devices[2].uuid
    hetero_backend.fail_device(parent)
    after = discover(hetero_backend)
    assert set(after.vanished_since(before)) == {d.uuid for d in before.devices[2:]}


def test_a_driver_error_before_any_device_makes_nvml_unavailable() -> None:
    class DriverGone(FakeNvmlBackend):
        def device_count(self) -> int:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    inv = discover(DriverGone(H100), warn=False)
    assert not inv.available and inv.devices == []
    assert inv.reason is not None and inv.reason.startswith("NVIDIA driver unusable")


def test_discover_shuts_nvml_down_again(h100_backend: FakeNvmlBackend) -> None:
    discover(h100_backend)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        h100_backend.device_count()


def test_backend_from_env_picks_the_fake_only_when_a_file_is_named() -> None:
    assert isinstance(backend_from_env(""), RealNvmlBackend)
    cfg = PoolManagerConfig.from_env({"POOL_MANAGERD_FAKE_NVML": str(HETERO)})
    backend = backend_from_env(cfg.fake_nvml)
    assert isinstance(backend, FakeNvmlBackend)
    assert len(discover(backend).devices) == 5


def test_backend_from_env_rejects_a_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"POOL_MANAGERD_FAKE_NVML=.*cannot read"):
        backend_from_env(str(tmp_path / "absent.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2", encoding="utf-8")
    with pytest.raises(ConfigError, match="not an NVML snapshot"):
        backend_from_env(str(broken))
    broken.write_text("[]", encoding="utf-8")
    with pytest.raises(ConfigError, match="not an NVML snapshot"):
        backend_from_env(str(broken))


def test_fake_does_not_change_the_loaded_snapshot_dict() -> None:
    data = load_json(HETERO)
    pristine = copy.deepcopy(data)
    fake = FakeNvmlBackend(data)
    fake.set_processes(data["devices"][0]["uuid"], [(1, 2)])
    assert data == pristine
