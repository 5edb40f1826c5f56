"""Which NVML errors mean "the GPU or its driver is gone" rather than "this query is not supported"."""

from __future__ import annotations

import pynvml

# The GPU fell off the bus, needs a reset, or the driver under NVML was unloaded / replaced: every pool on
# the device must go not-ready and back off. NotSupported, NotFound, NoPermission etc. are answers, not faults.
DRIVER_ERROR_CODES = frozenset(
    {
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED,  # 9
        pynvml.NVML_ERROR_IRQ_ISSUE,  # 11
        pynvml.NVML_ERROR_GPU_IS_LOST,  # 15
        pynvml.NVML_ERROR_RESET_REQUIRED,  # 16
        pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,  # 18: driver upgraded under a running NVML
        pynvml.NVML_ERROR_UNKNOWN,  # 999
    }
)
# init() failed because this host has no usable driver at all: a CPU-only host, not a fault.
NO_DRIVER_CODES = frozenset({pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED})


def is_driver_error(exc: BaseException) -> bool:
    """True when `exc` (or an exception it was raised from) is an NVML error that means GPU lost / driver gone."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, pynvml.NVMLError) and getattr(current, "value", None) in DRIVER_ERROR_CODES:
            return True
        current = current.__cause__ or current.__context__
    return False


def describe(exc: pynvml.NVMLError) -> str:
    """One line: NVML's message and the exception class, e.g. 'GPU is lost (NVMLError_GpuIsLost, code 15)'."""
    return f"{exc} ({type(exc).__name__}, code {getattr(exc, 'value', '?')})"


__all__ = ["DRIVER_ERROR_CODES", "NO_DRIVER_CODES", "describe", "is_driver_error"]
