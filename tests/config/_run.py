"""Run the real `poolmgr` command line as a subprocess, the way a user does, with a private state dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GPU = FIXTURES / "gpu"
H100_NVML = GPU / "h100-80gb-hbm3" / "nvml-snapshot.json"
HETERO_NVML = GPU / "hetero-3gpu-synthetic" / "nvml-snapshot.json"
NO_NVML = GPU / "no-nvml-synthetic" / "nvml-snapshot.json"


def run_cli(
    args: list[str], state_dir: Path, env: dict[str, str] | None = None, *, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """`python -m poolmgr.cli ARGS` with only the POOL_MANAGERD_* variables given (and STATE_DIR)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("POOL_MANAGERD_")}
    base["POOL_MANAGERD_STATE_DIR"] = str(state_dir)
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "poolmgr.cli", *args], env=base, capture_output=True, text=True, timeout=timeout
    )


def databases(state_dir: Path) -> list[Path]:
    """Database files under the state dir (there must be none after a refusal)."""
    return sorted(state_dir.rglob("*.db*")) if state_dir.exists() else []


def error_lines(stderr: str) -> list[str]:
    """The `poolmgr: error:` lines of a refusal (each one problem), without the prefix."""
    prefix = "poolmgr: error: "
    return [line[len(prefix) :] for line in stderr.splitlines() if line.startswith(prefix)]
