"""The device table and JSON the CLI and API show."""

from __future__ import annotations

import json

from poolmgr.devices import FakeNvmlBackend, Inventory, devices_json, devices_table, discover

from .gpu_fixtures import NO_NVML

GIB = 1024**3


def test_table_has_one_row_per_device_with_pool_holders(hetero: Inventory) -> None:
    holders = {hetero.devices[0].uuid: "big", hetero.devices[3].uuid: "mig-pool"}
    lines = devices_table(hetero, holders).splitlines()
    assert lines[0].split() == [
        "INDEX",
        "NAME",
        "UUID",
        "CC",
        "VRAM_TOTAL_GIB",
        "VRAM_FREE_GIB",
        "MIG",
        "POOL",
    ]
    assert len(lines) == 1 + len(hetero.devices)
    first = hetero.devices[0]
    row = lines[1]
    assert row.startswith("0 ") and first.uuid in row and row.split()[-1] == "big"
    assert f"{first.vram_total_bytes / GIB:.1f}" in row and f"{first.vram_free_bytes / GIB:.1f}" in row
    assert "8.9" in row
    assert lines[3].split()[-2:] == ["enabled", "-"]
    assert lines[4].startswith("2:0 ") and lines[4].split()[-2:] == ["instance", "mig-pool"]
    # columns line up: every uuid starts at the same offset
    assert len({line.index("GPU-") if "GPU-" in line else line.index("MIG-") for line in lines[1:]}) == 1


def test_table_without_a_driver_says_why() -> None:
    inv = discover(FakeNvmlBackend(NO_NVML), warn=False)
    assert devices_table(inv, {}) == f"no GPUs: {inv.reason}"
    assert devices_json(inv, {}) == []


def test_json_carries_every_field_and_is_serialisable(hetero: Inventory) -> None:
    holders = {hetero.devices[1].uuid: "small"}
    rows = devices_json(hetero, holders)
    assert json.loads(json.dumps(rows)) == rows
    assert [r["uuid"] for r in rows] == [d.uuid for d in hetero.devices]
    r1 = rows[1]
    dev = hetero.devices[1]
    assert r1["pool"] == "small" and rows[0]["pool"] is None
    assert r1["compute_capability"] == "8.6"
    assert (r1["vram_total_bytes"], r1["vram_free_bytes"]) == (dev.vram_total_bytes, dev.vram_free_bytes)
    assert r1["processes"] == [{"pid": pid, "used_bytes": used} for pid, used in dev.processes]
    assert rows[3]["is_mig"] and rows[3]["parent_uuid"] == rows[2]["uuid"] and rows[2]["mig_enabled"]
