"""The llama.cpp adapter: command lines (served on a unix socket, under the served name), verdicts on the real
recorded stderr."""

from __future__ import annotations

from pathlib import Path

import pytest

from poolmgr.engines import LlamaCppAdapter, StderrReason, classify_stderr
from poolmgr.errors import EngineError
from poolmgr.poolsfile import PoolSpec

from ._support import CPU_FIXTURES, CUDA_FIXTURES

ADAPTER = LlamaCppAdapter()
SOCK = "/var/lib/poolmgr/work/tiny/engine.sock"


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_cpu_pool_command_line_carries_every_flag_poolmgr_owns() -> None:
    spec = PoolSpec(id="tiny", model="/m/tiny.gguf", slots=3, ctx_size=1536, extra_args=("--temp", "0"))
    argv = ADAPTER.command(spec, binary="/opt/llama-server", model_path="/m/tiny.gguf", socket_path=SOCK)
    assert argv[0] == "/opt/llama-server"
    assert _flag(argv, "--model") == "/m/tiny.gguf"
    assert _flag(argv, "--host") == SOCK  # llama-server serves on the unix socket, no TCP at all
    assert "--port" not in argv
    assert _flag(argv, "--alias") == "tiny"  # no served_model_name: clients call the model by the pool id
    assert _flag(argv, "--parallel") == "3"
    assert _flag(argv, "--ctx-size") == "1536"
    assert _flag(argv, "--n-gpu-layers") == "0"
    assert "--metrics" in argv and "--no-webui" in argv
    assert argv[-2:] == ["--temp", "0"]  # the pool's extra args come last


def test_the_engine_serves_the_model_under_the_pools_served_model_name() -> None:
    spec = PoolSpec(id="chat-a", model="/m/q.gguf", served_model_name="Qwen/Qwen2.5-0.5B-Instruct")
    argv = ADAPTER.command(spec, binary="llama-server", model_path="/m/q.gguf", socket_path=Path(SOCK))
    assert _flag(argv, "--alias") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert _flag(argv, "--host") == SOCK
    assert argv.count("--alias") == 1 and argv.count("--host") == 1


def test_gpu_pool_command_line_uses_the_placement_flags_verbatim() -> None:
    spec = PoolSpec(id="big", model="/m/big.gguf", device_mask="0,1", slots=2)
    gpu = ["--n-gpu-layers", "99", "--fit", "off", "--split-mode", "layer", "--tensor-split", "0.6,0.4"]
    argv = ADAPTER.command(spec, binary="llama-server", model_path=Path("/m/big.gguf"), socket_path=SOCK, gpu_flags=gpu)
    assert _flag(argv, "--host") == SOCK and "--port" not in argv
    assert argv[-len(gpu) :] == gpu
    assert argv.count("--n-gpu-layers") == 1


def test_gpu_pool_without_placement_flags_is_refused() -> None:
    spec = PoolSpec(id="big", model="/m/big.gguf", device_mask="0")
    with pytest.raises(EngineError, match="needs the placement's GPU flags"):
        ADAPTER.command(spec, binary="llama-server", model_path="/m/big.gguf", socket_path=SOCK)


def test_cpu_pool_with_gpu_flags_is_refused() -> None:
    spec = PoolSpec(id="tiny", model="/m/t.gguf")
    with pytest.raises(EngineError, match="takes no GPU flags"):
        ADAPTER.command(spec, binary="x", model_path="/m/t.gguf", socket_path=SOCK, gpu_flags=["--n-gpu-layers", "99"])


@pytest.mark.parametrize("where", ["127.0.0.1", "0.0.0.0", "/run/poolmgr/engine", "/run/poolmgr/engine.sock.d/x"])
def test_an_engine_address_that_is_not_a_socket_path_is_refused(where: str) -> None:
    # llama-server takes `--host` as a unix socket only when it ends in .sock; anything else would be TCP.
    with pytest.raises(EngineError, match=r"pool 't': the engine socket .* must end in \.sock"):
        ADAPTER.command(PoolSpec(id="t", model="m"), binary="x", model_path="m", socket_path=where)


@pytest.mark.parametrize(
    ("fixture", "expect_gpu", "reason"),
    [
        (CPU_FIXTURES / "ok-sigterm-stderr.txt", False, None),
        (CUDA_FIXTURES / "cuda-ok-stderr.txt", True, None),
        (CUDA_FIXTURES / "no-gpu-visible-stderr.txt", True, StderrReason.CPU_SPILLOVER),
    ],
)
def test_logs_of_engines_that_served_keep_their_verdicts(
    fixture: Path, expect_gpu: bool, reason: StderrReason | None
) -> None:
    # These engines loaded and served (each log has its `listening on` line): only the CUDA build that found no
    # GPU is a failure, the silent spill-over to the CPU.
    text = fixture.read_text()
    assert "srv  llama_server: listening on http://127.0.0.1:" in text
    verdict = classify_stderr(text, expect_gpu=expect_gpu)
    assert (verdict.reason if verdict is not None else None) is reason
    assert ADAPTER.classify_stderr(text, expect_gpu=expect_gpu) == verdict


def test_a_socket_path_that_cannot_be_bound_is_a_port_in_use_verdict() -> None:
    # Measured with b11434 and `--host /tmp/lsm.6M8D/a.sock` over the socket file its previous run left behind:
    # the same line as a taken TCP port (llama-server prints its default port, unused for a socket).
    text = (
        "0.00.009.792 E srv         start: couldn't bind HTTP server socket, hostname: /tmp/lsm.6M8D/a.sock, "
        "port: 8080\n"
        "0.00.009.795 I srv    operator(): operator(): cleaning up before exit...\n"
        "0.00.010.023 E srv  llama_server: exiting due to HTTP server error\n"
    )
    verdict = classify_stderr(text, expect_gpu=False)
    assert verdict is not None and verdict.reason is StderrReason.PORT_IN_USE
    assert "hostname: /tmp/lsm.6M8D/a.sock" in verdict.message


@pytest.mark.parametrize(
    ("fixture", "reason", "needle"),
    [
        (CPU_FIXTURES / "missing-stderr.txt", StderrReason.MODEL_MISSING, "failed to open GGUF file 'missing.gguf'"),
        (CPU_FIXTURES / "empty-stderr.txt", StderrReason.MODEL_CORRUPT, "failed to read magic"),
        (CPU_FIXTURES / "bad-magic-stderr.txt", StderrReason.MODEL_CORRUPT, "invalid magic characters: 'XXXX'"),
        (CPU_FIXTURES / "truncated-header-stderr.txt", StderrReason.MODEL_CORRUPT, "failed to read key-value pairs"),
        (CPU_FIXTURES / "truncated-data-stderr.txt", StderrReason.MODEL_CORRUPT, "data is not within the file bounds"),
        (CPU_FIXTURES / "port-clash-stderr.txt", StderrReason.PORT_IN_USE, "couldn't bind HTTP server socket"),
        (CPU_FIXTURES / "bad-flag-stderr.txt", StderrReason.BAD_ARGUMENT, "error: invalid argument: --bogus"),
        (CUDA_FIXTURES / "oom-stderr.txt", StderrReason.VRAM_OOM, "cudaMalloc failed: out of memory"),
        (CUDA_FIXTURES / "no-gpu-visible-stderr.txt", StderrReason.CPU_SPILLOVER, "no usable GPU found"),
    ],
)
def test_real_stderr_is_classified_by_its_decisive_line(fixture: Path, reason: StderrReason, needle: str) -> None:
    verdict = classify_stderr(fixture.read_text())
    assert verdict is not None
    assert verdict.reason is reason
    assert needle in verdict.line
    assert verdict.line in fixture.read_text()
    assert not verdict.message[:1].isdigit()  # the time/level prefix is gone from the message


def test_vram_oom_beats_the_generic_model_loading_error_that_follows_it() -> None:
    text = (CUDA_FIXTURES / "oom-stderr.txt").read_text()
    assert "exiting due to model loading error" in text
    verdict = classify_stderr(text)
    assert verdict is not None and verdict.reason is StderrReason.VRAM_OOM
    assert verdict.message.startswith("ggml_backend_cuda_buffer_type_alloc_buffer: allocating 1318912.64 MiB")


def test_cpu_pool_ignores_the_no_gpu_warning_a_cpu_build_prints_for_n_gpu_layers() -> None:
    # Recorded with the CPU build and `--n-gpu-layers 0`: the warning is there, the engine served.
    text = (CPU_FIXTURES / "ok-sigterm-stderr.txt").read_text()
    assert "no usable GPU found" in text
    assert classify_stderr(text, expect_gpu=False) is None
    spill = classify_stderr(text, expect_gpu=True)
    assert spill is not None and spill.reason is StderrReason.CPU_SPILLOVER


def test_cuda_driver_failure_is_a_driver_error_not_a_spillover() -> None:
    text = (
        "0.00.012.891 E ggml_cuda_init: failed to initialize CUDA: CUDA driver version is insufficient "
        "for CUDA runtime version\nwarning: no usable GPU found, --gpu-layers option will be ignored\n"
    )
    verdict = classify_stderr(text)
    assert verdict is not None and verdict.reason is StderrReason.DRIVER_ERROR
    assert "driver version is insufficient" in verdict.message
    crash = classify_stderr("CUDA error: an illegal memory access was encountered\n  current device: 0\n")
    assert crash is not None and crash.reason is StderrReason.DRIVER_ERROR
