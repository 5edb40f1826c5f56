"""The llama.cpp `llama-server` adapter (build b11434): command line, readiness, slots, version, stderr verdicts.

Facts it relies on (measured, see ENGINE.md and the H200 fixtures):
- `--host PATH.sock` listens on a unix socket instead of TCP (HTTP and SSE alike); the socket is bound, and
  answers 503 "Loading model", before the model is loaded; once loaded it logs `listening on unix://PATH`.
- `/health` answers 503 `{"error":{"message":"Loading model",...}}` while loading, then 200 `{"status":"ok"}`.
- Failures print one decisive stderr line and exit 1; a CUDA build with no usable GPU silently serves on the
  CPU after `warning: no usable GPU found` (a CPU build prints the same warning for any `--n-gpu-layers`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from poolmgr.engines._adapter import HealthResult, HealthStatus, SlotCounts, StderrReason, StderrVerdict
from poolmgr.errors import EngineError
from poolmgr.poolsfile import PoolSpec

LOADING_MESSAGE = "Loading model"

# `0.09.441.610 E ` — llama.cpp's log prefix (minutes.seconds.millis.micros, level letter).
_PREFIX_RE = re.compile(r"^\d+\.\d{2}\.\d{3}\.\d{3} [A-Z] ")

# Ordered: the first reason with a matching line wins, so the cause beats its consequences
# (`cudaMalloc failed` beats the `exiting due to model loading error` that follows it).
_RULES: tuple[tuple[StderrReason, re.Pattern[str]], ...] = (
    (
        StderrReason.VRAM_OOM,
        re.compile(r"cudaMalloc failed: out of memory|failed to allocate CUDA\d* buffer|CUDA error: out of memory"),
    ),
    (
        StderrReason.DRIVER_ERROR,
        re.compile(
            r"CUDA error|failed to initialize CUDA: (?!no CUDA-capable device is detected)"
            r"|CUDA driver version is insufficient|GPU has fallen off the bus|unspecified launch failure"
        ),
    ),
    (StderrReason.MODEL_MISSING, re.compile(r"failed to open GGUF file")),
    (
        StderrReason.MODEL_CORRUPT,
        re.compile(
            r"invalid magic characters|data is not within the file bounds|failed to read magic"
            r"|gguf_init_from_reader: |GGUF file version \d+ is extremely large|error loading model: "
        ),
    ),
    (StderrReason.PORT_IN_USE, re.compile(r"couldn't bind HTTP server socket")),
    (StderrReason.BAD_ARGUMENT, re.compile(r"error: invalid argument: |error while handling argument")),
    (StderrReason.MODEL_LOAD_FAILED, re.compile(r"exiting due to model loading error|failed to load model")),
    (StderrReason.HTTP_ERROR, re.compile(r"exiting due to HTTP server error")),
    (StderrReason.CPU_SPILLOVER, re.compile(r"no usable GPU found")),
)


def classify_stderr(text: str, *, expect_gpu: bool = True) -> StderrVerdict | None:
    """Find the decisive line of an engine's stderr. `expect_gpu=False` (a CPU pool) ignores the
    `no usable GPU found` warning, which a CPU build prints for any `--n-gpu-layers`."""
    lines = text.splitlines()
    for reason, pattern in _RULES:
        if reason is StderrReason.CPU_SPILLOVER and not expect_gpu:
            continue
        for line in lines:
            if pattern.search(line):
                clean = line.strip()
                return StderrVerdict(reason=reason, line=clean, message=_PREFIX_RE.sub("", clean))
    return None


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
    return ""


class LlamaCppAdapter:
    """Builds llama-server command lines and reads its HTTP answers. Holds no state."""

    name = "llamacpp"
    # `llama_server: model loaded` is written right after it starts answering /health 200, then `listening on`.
    ready_markers: tuple[bytes, ...] = (b"model loaded\n", b"listening on ")

    def command(
        self,
        spec: PoolSpec,
        *,
        binary: Path | str,
        model_path: Path | str,
        socket_path: Path | str,
        gpu_flags: Sequence[str] = (),
    ) -> list[str]:
        """The full argv: the engine serves on the unix socket `socket_path` only (no TCP), under the pool's
        served model name. CPU pools get `--n-gpu-layers 0`; GPU pools must pass the placement's flags
        (`--n-gpu-layers`, `--fit off`, split), so the plan that runs is poolmgr's, never a silent default."""
        if not str(socket_path).endswith(".sock"):
            raise EngineError(f"pool {spec.id!r}: the engine socket {socket_path} must end in .sock")
        argv = [
            str(binary),
            "--model",
            str(model_path),
            "--host",
            str(socket_path),
            "--alias",
            spec.served_name,
            "--parallel",
            str(spec.slots),
            "--ctx-size",
            str(spec.ctx_size),
            "--metrics",
            "--no-webui",
        ]
        if spec.is_cpu:
            if gpu_flags:
                raise EngineError(f"pool {spec.id!r}: a CPU pool takes no GPU flags, got {list(gpu_flags)}")
            argv += ["--n-gpu-layers", "0"]
        else:
            if not gpu_flags:
                raise EngineError(
                    f"pool {spec.id!r}: a GPU pool needs the placement's GPU flags (--n-gpu-layers, --fit off)"
                )
            argv += list(gpu_flags)
        argv += list(spec.extra_args)
        return argv

    async def probe_health(self, client: httpx.AsyncClient, base_url: str, timeout: float) -> HealthResult:
        try:
            resp = await client.get(f"{base_url}/health", timeout=timeout)
        except httpx.ConnectError as exc:
            return HealthResult(HealthStatus.REFUSED, None, f"connection refused: {exc}")
        except httpx.TimeoutException:
            return HealthResult(HealthStatus.ERROR, None, f"no answer within {timeout:g} s")
        except httpx.HTTPError as exc:
            return HealthResult(HealthStatus.ERROR, None, f"{type(exc).__name__}: {exc}")
        if resp.status_code == 200:
            return HealthResult(HealthStatus.OK, 200, _snippet(resp.text))
        body: Any = None
        with contextlib.suppress(ValueError):
            body = resp.json()
        if resp.status_code == 503 and _error_message(body) == LOADING_MESSAGE:
            return HealthResult(HealthStatus.LOADING, 503, LOADING_MESSAGE)
        return HealthResult(HealthStatus.ERROR, resp.status_code, f"HTTP {resp.status_code}: {_snippet(resp.text)}")

    async def _get_json(
        self, client: httpx.AsyncClient, url: str, timeout: float, headers: Mapping[str, str] | None = None
    ) -> Any:
        try:
            resp = await client.get(url, timeout=timeout, headers=headers)
        except httpx.HTTPError as exc:
            raise EngineError(f"GET {url} failed: {type(exc).__name__}: {exc}") from None
        if resp.status_code != 200:
            raise EngineError(f"GET {url} answered HTTP {resp.status_code}: {_snippet(resp.text)}")
        try:
            return resp.json()
        except ValueError:
            raise EngineError(f"GET {url} answered with a body that is not JSON: {_snippet(resp.text)}") from None

    async def fetch_slots(
        self, client: httpx.AsyncClient, base_url: str, timeout: float, headers: Mapping[str, str] | None = None
    ) -> SlotCounts:
        """(total, free) from /slots; a slot is free when it is not processing."""
        data = await self._get_json(client, f"{base_url}/slots", timeout, headers)
        if not isinstance(data, list) or not all(isinstance(s, dict) for s in data):
            raise EngineError(f"GET {base_url}/slots: expected a list of slots, got {_snippet(str(data))}")
        busy = sum(1 for s in data if s.get("is_processing"))
        return SlotCounts(total=len(data), free=len(data) - busy)

    async def fetch_version(
        self, client: httpx.AsyncClient, base_url: str, timeout: float, headers: Mapping[str, str] | None = None
    ) -> str:
        """The engine's `build_info` from /props, e.g. "b11434-unknown"."""
        data = await self._get_json(client, f"{base_url}/props", timeout, headers)
        info = data.get("build_info") if isinstance(data, dict) else None
        if not isinstance(info, str) or not info:
            raise EngineError(f"GET {base_url}/props: no build_info in {_snippet(str(data))}")
        return info

    def classify_stderr(self, text: str, *, expect_gpu: bool = True) -> StderrVerdict | None:
        return classify_stderr(text, expect_gpu=expect_gpu)


def api_key_headers(extra_args: Sequence[str]) -> dict[str, str]:
    """The Authorization header for an engine started with `--api-key K` (or `--api-key=K`): /health stays public,
    but /slots, /props and /metrics need it."""
    args = list(extra_args)
    for i, arg in enumerate(args):
        if arg == "--api-key" and i + 1 < len(args):
            return {"Authorization": f"Bearer {args[i + 1]}"}
        if arg.startswith("--api-key="):
            return {"Authorization": f"Bearer {arg.split('=', 1)[1]}"}
    return {}


__all__ = ["LOADING_MESSAGE", "LlamaCppAdapter", "api_key_headers", "classify_stderr"]
