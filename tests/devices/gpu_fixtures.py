"""Paths of the GPU fixtures (copied from shared/fixtures/gpu) and a JSON loader for the devices tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GPU_FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "gpu"
H100 = GPU_FIXTURES / "h100-80gb-hbm3" / "nvml-snapshot.json"
HETERO = GPU_FIXTURES / "hetero-3gpu-synthetic" / "nvml-snapshot.json"
NO_NVML = GPU_FIXTURES / "no-nvml-synthetic" / "nvml-snapshot.json"
CUDA_PROBE = GPU_FIXTURES / "h100-80gb-hbm3" / "cuda-visible-devices-probe.json"
LLAMA_PROBE = GPU_FIXTURES / "h200-llama-server-b11434-cuda" / "probe.json"
LLAMA_DIR = GPU_FIXTURES / "h200-llama-server-b11434-cuda"


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
