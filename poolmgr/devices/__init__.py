"""GPU discovery (NVML behind a Protocol), device snapshots, device masks and spillover checks (layer 2)."""

from poolmgr.devices._backend import MemoryInfo, NvmlBackend, RealNvmlBackend
from poolmgr.devices._discovery import MIG_INDEX_BASE, Inventory, backend_from_env, discover
from poolmgr.devices._fake import FakeNvmlBackend
from poolmgr.devices._mask import DeviceMask, check_exclusive, engine_env
from poolmgr.devices._nvml_errors import is_driver_error
from poolmgr.devices._render import devices_json, devices_table
from poolmgr.devices._smi import SMI_QUERY, SmiRow, compare_with_smi, parse_smi_csv
from poolmgr.devices._snapshot import DeviceSnapshot
from poolmgr.devices._spillover import (
    CPU_SPILLOVER_MARKERS,
    descendant_pids,
    engine_on_gpus,
    find_foreign_gpus,
    stderr_shows_cpu_spillover,
)

__all__ = [
    "CPU_SPILLOVER_MARKERS",
    "MIG_INDEX_BASE",
    "SMI_QUERY",
    "DeviceMask",
    "DeviceSnapshot",
    "FakeNvmlBackend",
    "Inventory",
    "MemoryInfo",
    "NvmlBackend",
    "RealNvmlBackend",
    "SmiRow",
    "backend_from_env",
    "check_exclusive",
    "compare_with_smi",
    "descendant_pids",
    "devices_json",
    "devices_table",
    "discover",
    "engine_env",
    "engine_on_gpus",
    "find_foreign_gpus",
    "is_driver_error",
    "parse_smi_csv",
    "stderr_shows_cpu_spillover",
]
