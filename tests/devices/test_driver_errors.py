"""GPU-lost classification of NVML errors."""

from __future__ import annotations

import pynvml
import pytest

from poolmgr.devices import is_driver_error
from poolmgr.errors import DeviceError


@pytest.mark.parametrize(
    "code",
    [
        pynvml.NVML_ERROR_GPU_IS_LOST,
        pynvml.NVML_ERROR_UNKNOWN,
        pynvml.NVML_ERROR_RESET_REQUIRED,
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
        pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
        pynvml.NVML_ERROR_IRQ_ISSUE,
    ],
)
def test_gpu_lost_and_driver_gone_errors_are_driver_errors(code: int) -> None:
    assert is_driver_error(pynvml.NVMLError(code))


@pytest.mark.parametrize(
    "code",
    [
        pynvml.NVML_ERROR_UNINITIALIZED,
        pynvml.NVML_ERROR_INVALID_ARGUMENT,
        pynvml.NVML_ERROR_NOT_SUPPORTED,
        pynvml.NVML_ERROR_NO_PERMISSION,
        pynvml.NVML_ERROR_NOT_FOUND,
        pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    ],
)
def test_answers_that_a_query_is_unsupported_are_not(code: int) -> None:
    assert not is_driver_error(pynvml.NVMLError(code))


def test_the_specific_pynvml_classes_are_recognised() -> None:
    assert is_driver_error(pynvml.NVMLError_GpuIsLost())
    assert not is_driver_error(pynvml.NVMLError_NotFound())


def test_a_wrapped_nvml_error_is_recognised_through_its_cause() -> None:
    try:
        try:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        except pynvml.NVMLError as exc:
            raise DeviceError("reading GPU 0 failed") from exc
    except DeviceError as wrapped:
        assert is_driver_error(wrapped)


def test_other_exceptions_are_not_driver_errors() -> None:
    assert not is_driver_error(ValueError("x"))
    assert not is_driver_error(DeviceError("bad mask"))
