"""The fake NVML answers as nvidia-ml-py did on the recording machine (errors included)."""

from __future__ import annotations

import pynvml
import pytest

from poolmgr.devices import FakeNvmlBackend

from .gpu_fixtures import H100, HETERO, NO_NVML, load_json


def test_calls_before_init_and_after_shutdown_raise_uninitialized() -> None:
    fake = FakeNvmlBackend(H100)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.device_count()
    fake.init()
    assert fake.device_count() == load_json(H100)["device_count"]
    fake.shutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.handle_by_index(0)


def test_init_is_reference_counted_like_nvml() -> None:
    fake = FakeNvmlBackend(H100)
    fake.init()
    fake.init()
    fake.shutdown()
    assert fake.device_count() == 1
    fake.shutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.device_count()


def test_recorded_errors_are_raised_as_the_same_pynvml_classes() -> None:
    errors = load_json(H100)["errors"]
    fake = FakeNvmlBackend(H100)
    fake.init()
    with pytest.raises(pynvml.NVMLError) as out_of_range:
        fake.handle_by_index(1)
    assert type(out_of_range.value).__name__ == errors["index_out_of_range"]["nvml_error"]
    with pytest.raises(pynvml.NVMLError) as mig_on_non_mig:
        fake.mig_device_handle_by_index(fake.handle_by_index(0), 0)
    assert type(mig_on_non_mig.value).__name__ == errors["mig_instance_on_non_mig"]["nvml_error"]


def test_no_nvml_host_raises_library_not_found_from_init() -> None:
    with pytest.raises(pynvml.NVMLError_LibraryNotFound) as exc:
        FakeNvmlBackend(NO_NVML).init()
    assert exc.value.value == load_json(NO_NVML)["nvml_init_error"]["code"] == 12


def test_empty_mig_slots_raise_not_found() -> None:
    fake = FakeNvmlBackend(HETERO)
    fake.init()
    a100 = fake.handle_by_index(2)
    assert fake.max_mig_device_count(a100) == 7
    assert fake.uuid(fake.mig_device_handle_by_index(a100, 1)).startswith("MIG-")
    with pytest.raises(pynvml.NVMLError_NotFound):
        fake.mig_device_handle_by_index(a100, 2)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.mig_device_handle_by_index(a100, 7)


def test_fields_missing_from_a_snapshot_are_not_supported() -> None:
    fake = FakeNvmlBackend(HETERO)
    fake.init()
    mig = fake.mig_device_handle_by_index(fake.handle_by_index(2), 0)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        fake.memory_info_v2(mig)
    assert fake.memory_info_v1(mig).total > 0


def test_injected_processes_and_failures_show_in_later_queries() -> None:
    fake = FakeNvmlBackend(H100)
    uuid = load_json(H100)["devices"][0]["uuid"]
    fake.set_processes(uuid, [(448, 1542 * 1024**2)])
    fake.init()
    handle = fake.handle_by_index(0)
    assert fake.compute_running_processes(handle) == [(448, 1542 * 1024**2)]
    fake.fail_device(uuid)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        fake.memory_info_v1(handle)
    with pytest.raises(KeyError):
        fake.fail_device("GPU-00000000-0000-0000-0000-000000000000")
