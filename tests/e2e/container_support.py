"""What the container-pool end-to-end tests share: the engine user's minimal root filesystem (skipping where
podman or root is missing), the pool's containers as its podman lists them, and a completion through the pool."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from poolmgr.isolation import DEFAULT_ENGINE_USER, ensure_engine_user, ensure_subids
from tests.container_rootfs import minimal_rootfs
from tests.e2e.conftest import E2E_REQUIRED


def engine_rootfs(llama_server: Path) -> Path:
    """The cached root filesystem for llama-server, owned by the engine user (set up as `poolmgr setup` does)."""
    if shutil.which("podman") is None:
        if E2E_REQUIRED:
            pytest.fail("end-to-end tests are required but podman is not installed (.ci/run installs it)")
        pytest.skip("podman is not installed on this host")
    if os.geteuid() != 0:
        pytest.skip("needs root: podman runs as the engine user")
    uid, gid = ensure_engine_user(DEFAULT_ENGINE_USER)
    ensure_subids(DEFAULT_ENGINE_USER)
    return minimal_rootfs(llama_server, uid, gid)


def container_pool(model: Path, rootfs: Path, **extra: Any) -> dict[str, Any]:
    """A pools-file entry for a `runtime = "podman"` pool with a fresh id."""
    return {"id": f"pod-{uuid.uuid4().hex[:6]}", "model": str(model), "runtime": "podman", "rootfs": str(rootfs),
            "slots": 1, "ctx_size": 512, **extra}  # fmt: skip


def containers(srv: Any, pool_id: str) -> list[str]:
    """The pool's containers, running or not, as its podman (the engine user's, the pool's storage) lists them."""
    home = srv.workdir / "state" / "work" / ".podman" / pool_id
    user = DEFAULT_ENGINE_USER
    cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "env", "-i", "PATH=/usr/bin:/bin",
           f"HOME={home}", "podman", f"--root={home / 'storage'}", "ps", "--all", "--format={{.Names}}"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd="/").stdout.split()


def completion(endpoint_url: str) -> None:
    resp = httpx.post(f"{endpoint_url}/completion", json={"prompt": "hello", "n_predict": 2}, timeout=30)
    assert resp.status_code == 200, resp.text
