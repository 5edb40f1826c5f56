"""nvidia-smi cross-check (on the recorded H100 query) and scripts/gpu-check on a host without a GPU."""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

from poolmgr.devices import SMI_QUERY, Inventory, compare_with_smi, parse_smi_csv

from .gpu_fixtures import GPU_FIXTURES

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check"


def _recorded_query() -> str:
    """The "== query" section nvidia-smi printed on the real H100, reordered to SMI_QUERY's columns."""
    text = (GPU_FIXTURES / "h100-80gb-hbm3" / "nvidia-smi-summary.txt").read_text(encoding="utf-8")
    section = text.split("== query\n", 1)[1].splitlines()
    header = [h.split(" [")[0].strip() for h in section[0].split(",")]
    cells = [c.strip() for c in section[1].split(",")]
    return ", ".join(cells[header.index(col)] for col in SMI_QUERY)


def test_nvml_and_nvidia_smi_agree_on_the_h100(h100: Inventory) -> None:
    rows = parse_smi_csv(_recorded_query())
    dev = h100.devices[0]
    assert [(r.index, r.uuid, r.name) for r in rows] == [(dev.index, dev.uuid, dev.name)]
    assert rows[0].total_mib == dev.vram_total_bytes // 1024**2
    assert compare_with_smi(h100, rows) == []


def test_disagreements_are_reported(h100: Inventory) -> None:
    dev = h100.devices[0]
    smaller = dataclasses.replace(dev, vram_total_bytes=dev.vram_total_bytes - 1024**3)
    inv = dataclasses.replace(h100, devices=[smaller])
    rows = parse_smi_csv("index, uuid, name, total, free\n" + _recorded_query() + "\n1, GPU-x, other, 10, 10")
    problems = compare_with_smi(inv, rows)
    assert any(p.startswith("indices") for p in problems)
    expected = f"total NVML {smaller.vram_total_bytes // 1024**2} MiB, nvidia-smi {rows[0].total_mib} MiB"
    assert any(expected in p for p in problems)


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_gpu_check_skips_cleanly_without_a_gpu() -> None:
    assert os.access(SCRIPT, os.X_OK)
    out = _run({**os.environ, "PATH": "/usr/bin:/bin"})
    lines = out.stdout.splitlines()
    if not lines[0].startswith("SKIP"):
        # a GPU host: every line still follows the contract
        assert all(line.split()[0] in ("PASS", "FAIL", "SKIP") for line in lines)
        return
    assert out.returncode == 0, out.stderr
    assert len(lines) >= 5
    assert all(line.startswith("SKIP ") and ": " in line for line in lines)
    assert "no NVIDIA driver" in lines[0]


def test_gpu_check_fails_when_nvidia_smi_exists_but_nvml_does_not(tmp_path: Path) -> None:
    stub = tmp_path / "nvidia-smi"
    stub.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stub.chmod(0o755)
    out = _run({**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"})
    first = out.stdout.splitlines()[0]
    if first.startswith("PASS"):
        return  # a real GPU host: NVML works there
    assert out.returncode == 1
    assert first.startswith("FAIL nvml_discovery: ")


def _load_script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("gpu_check_script", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check_script", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _libcuda_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def test_gpu_check_mask_rejection_check_passes_on_recorded_hosts(h100: Inventory, hetero: Inventory) -> None:
    script = _load_script()
    for inv in (h100, hetero):
        status, detail = script.check_mask_rejections(inv.devices)
        assert status == "PASS", detail


def test_gpu_check_children_report_instead_of_hanging(hetero: Inventory) -> None:
    """The CUDA child of gpu-check, started under engine_env, is read with a deadline and always stopped."""
    script = _load_script()
    start = time.monotonic()
    status, detail = script.check_masked_child(hetero.devices[0].uuid, hetero.devices)
    # a synthetic uuid is no GPU of any host: CUDA finds no device (or there is no libcuda at all)
    assert status == "FAIL" and ("NOLIB" in detail or "COUNT 0" in detail or "INIT" in detail)
    status, detail = script.check_cpu_child(hetero.devices)
    assert status == ("PASS" if _libcuda_present() else "FAIL"), detail
    assert time.monotonic() - start < 30
