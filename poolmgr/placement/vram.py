"""How much VRAM a llama-server needs for a model, a context and a number of slots.

The parts, as llama.cpp b11434 allocates them (CUDA, flash attention off, f16 KV cache, `-ub 512`):

* weights: every repeating layer `blk.N.*` that is offloaded, plus the output layer; the input layer
  (`token_embd`) stays in host memory.
* KV cache: cells x offloaded layers x (K row + V row) x 2 bytes, where cells is the total context (`-c`,
  padded to 256) and a row is head_dim x n_head_kv. Exact against every run in the H200 table.
* compute buffer: the graph allocator's peak, which grows with the context PER SLOT (n_ctx_seq):
  the attention scores n_ctx_seq x n_ubatch x n_head x 4 (f32, the softmax runs in place) and the f32 KQ
  mask n_ctx_seq x n_ubatch x 4 (src/llama-graph.cpp, `build_attn_mha` / `build_attn_inp_kq_mask`), the
  per-token inputs (token ids, positions and output ids as i32, K and V cache indices as i64: 28 bytes a
  token, plus 128 for alignment), the output logits n_vocab x n_ubatch x 4, and a term of n_embd_k_gqa x 2
  bytes per cell of the TOTAL context, fitted to the table (1 M tokens in 4 slots costs 192 MiB more than
  1 M in one slot). This matches the logged compute buffer of every ready run of the 8-layer model in
  fixtures/gpu/h200-llama-server-b11434-cuda/vram-table.json to the printed 0.01 MiB, the failed 128 M-token
  allocation of its OOM probe to the byte, and the tiny model's to 0.12 MiB (over, not under); the totals
  are within 1 % of NVML. With several GPUs llama.cpp turns on pipeline parallelism and keeps
  GGML_SCHED_MAX_COPIES (4) copies of every graph input, the KQ mask included, on each device.
* CUDA context: about 0.5 GiB per device and process (528 MiB for llama-server on an H200, 518 MiB for
  torch on an H100).
* headroom: a safety margin per device that poolmgr leaves free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from poolmgr.errors import ConfigError
from poolmgr.placement.model_header import ModelHeader, read_model_header

__all__ = [
    "DEFAULT_CUDA_OVERHEAD_BYTES",
    "DEFAULT_HEADROOM_BYTES",
    "DEFAULT_N_UBATCH",
    "GIB",
    "MIB",
    "SCHED_MAX_COPIES",
    "VramNeed",
    "effective_context",
    "estimate_vram",
    "estimate_vram_from_header",
]

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_CUDA_OVERHEAD_BYTES = 528 * MIB  # NVML: llama-server's CUDA context on an H200 (torch: 518 MiB, H100)
DEFAULT_HEADROOM_BYTES = 256 * MIB
DEFAULT_N_UBATCH = 512  # llama-server's default -ub
SCHED_MAX_COPIES = 4  # GGML_SCHED_MAX_COPIES: input copies kept per device with pipeline parallelism
_CTX_PAD = 256  # llama_context pads n_ctx and n_ctx_seq to multiples of 256
_F16 = 2
_TOKEN_INPUT_BYTES = 3 * 4 + 2 * 8  # token id, position, output id (i32); K and V cache row index (i64)
_BUFFER_ALIGN = 128  # CUDA buffer alignment
_F32 = 4


def _pad(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def effective_context(ctx_size: int, slots: int, n_ctx_train: int = 0, *, kv_unified: bool = False) -> tuple[int, int]:
    """(total cells, cells one sequence can see) as llama.cpp sets them for `-c ctx_size --parallel slots`.

    `ctx_size` 0 means the model's training context, as with llama-server's `-c 0`. With a unified KV cache
    (`--kv-unified`, or llama-server's default when `--parallel` is not given) every slot sees all cells."""
    if slots < 1:
        raise ConfigError(f"slots={slots}: must be at least 1")
    if ctx_size < 0:
        raise ConfigError(f"ctx_size={ctx_size}: must be zero (the model's own) or positive")
    n_ctx = ctx_size or n_ctx_train
    if n_ctx <= 0:
        raise ConfigError("ctx_size=0 asks for the model's training context, but the header has none")
    if kv_unified:
        return _pad(n_ctx, _CTX_PAD), _pad(n_ctx, _CTX_PAD)
    n_ctx_seq = _pad(_pad(n_ctx, _CTX_PAD) // slots, _CTX_PAD)
    return n_ctx_seq * slots, n_ctx_seq


@dataclass(frozen=True)
class VramNeed:
    """The VRAM parts of one engine; `total_bytes` is what one device needs to hold all of it."""

    n_layer: int
    n_gpu_layers: int  # offloaded units as llama.cpp counts them: repeating layers + the output layer
    ctx_size: int  # total KV cells (after llama.cpp's padding)
    slots: int
    n_ctx_seq: int  # cells one sequence sees: per slot, or all of them with a unified KV cache
    n_ubatch: int
    per_layer_bytes: list[int]  # weights of blk.N.*, every layer (offloaded or not)
    output_bytes: int  # weights of the output layer
    host_bytes: int  # what stays in host memory: token_embd, layers not offloaded and their KV
    kv_bytes_per_layer: int
    kq_bytes: int  # attention scores, f32
    mask_bytes: int  # KQ mask, f32, one copy
    token_inputs_bytes: int  # positions, output ids, KV indices: one copy
    cells_bytes: int  # the per-cell compute term
    logits_bytes: int
    cuda_overhead_bytes: int
    headroom_bytes: int
    model_path: str = ""

    @property
    def first_gpu_layer(self) -> int:
        """Index of the first offloaded repeating layer (llama.cpp's i_gpu_start)."""
        return max(self.n_layer + 1 - self.n_gpu_layers, 0)

    @property
    def gpu_layer_count(self) -> int:
        return max(self.n_layer - self.first_gpu_layer, 0)

    @property
    def output_on_gpu(self) -> bool:
        return self.n_gpu_layers >= 1

    @property
    def weights_bytes(self) -> int:
        layers = sum(self.per_layer_bytes[self.first_gpu_layer :])
        return layers + (self.output_bytes if self.output_on_gpu else 0)

    @property
    def kv_bytes(self) -> int:
        return self.gpu_layer_count * self.kv_bytes_per_layer

    @property
    def compute_bytes(self) -> int:
        return self.compute_bytes_for(
            has_layers=self.gpu_layer_count > 0, has_output=self.output_on_gpu, pipeline_copies=1
        )

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.cuda_overhead_bytes + self.headroom_bytes

    def compute_bytes_for(self, *, has_layers: bool, has_output: bool, pipeline_copies: int = 1) -> int:
        """Compute buffer of one device: attention if it holds layers, logits if it holds the output."""
        inputs = (self.mask_bytes + self.token_inputs_bytes) * pipeline_copies
        attention = self.kq_bytes + inputs + self.cells_bytes if has_layers else 0
        return attention + (self.logits_bytes if has_output else 0)

    def device_extra_bytes(self, n_layers: int, *, has_output: bool, pipeline_copies: int = 1) -> int:
        """Everything a device holding `n_layers` repeating layers needs besides their weights: their KV
        cache, the output weights if it holds them, its compute buffer and its CUDA context."""
        return (
            n_layers * self.kv_bytes_per_layer
            + (self.output_bytes if has_output else 0)
            + self.compute_bytes_for(has_layers=n_layers > 0, has_output=has_output, pipeline_copies=pipeline_copies)
            + self.cuda_overhead_bytes
        )

    def breakdown(self) -> list[tuple[str, int]]:
        """(part, bytes) for one device holding everything offloaded; the parts sum to `total_bytes`."""
        return [
            ("layer_weights", self.weights_bytes - (self.output_bytes if self.output_on_gpu else 0)),
            ("output_weights", self.output_bytes if self.output_on_gpu else 0),
            ("kv_cache", self.kv_bytes),
            ("compute_buffer", self.compute_bytes),
            ("cuda_context", self.cuda_overhead_bytes),
            ("headroom", self.headroom_bytes),
        ]

    def with_margins(self, *, cuda_overhead_bytes: int | None, headroom_bytes: int | None) -> VramNeed:
        """The same need with other per-device margins (None keeps the current one)."""
        overhead = self.cuda_overhead_bytes if cuda_overhead_bytes is None else cuda_overhead_bytes
        headroom = self.headroom_bytes if headroom_bytes is None else headroom_bytes
        _check_margins(overhead, headroom)
        return replace(self, cuda_overhead_bytes=overhead, headroom_bytes=headroom)


def _check_margins(cuda_overhead_bytes: int, headroom_bytes: int) -> None:
    if cuda_overhead_bytes < 0 or headroom_bytes < 0:
        raise ConfigError("cuda_overhead_bytes and headroom_bytes must not be negative")


def _offloaded_units(n_gpu_layers: int | None, n_layer: int) -> int:
    if n_gpu_layers is None or n_gpu_layers < 0:  # None, -1 ("all"): everything, output layer included
        return n_layer + 1
    return min(n_gpu_layers, n_layer + 1)


def estimate_vram_from_header(
    header: ModelHeader,
    *,
    ctx_size: int,
    slots: int = 1,
    n_gpu_layers: int | None = None,
    cuda_overhead_bytes: int = DEFAULT_CUDA_OVERHEAD_BYTES,
    headroom_bytes: int = DEFAULT_HEADROOM_BYTES,
    n_ubatch: int = DEFAULT_N_UBATCH,
    kv_unified: bool = False,
    model_path: str = "",
) -> VramNeed:
    """The VRAM need of a model described by `header` (pure: no file, no device).

    Assumes llama-server gets `--parallel slots` explicitly (non-unified KV cache); pass `kv_unified=True`
    for `--kv-unified` or for llama-server's auto default (4 slots, unified), which costs far more compute
    buffer at long contexts because every slot's attention spans the whole context."""
    _check_margins(cuda_overhead_bytes, headroom_bytes)
    if n_ubatch < 1:
        raise ConfigError(f"n_ubatch={n_ubatch}: must be at least 1")
    n_ctx, n_ctx_seq = effective_context(ctx_size, slots, header.n_ctx_train, kv_unified=kv_unified)
    units = _offloaded_units(n_gpu_layers, header.n_layer)
    first_gpu = max(header.n_layer + 1 - units, 0)
    kv_per_layer = n_ctx * (header.n_embd_k_gqa + header.n_embd_v_gqa) * _F16
    n_tokens = min(n_ctx, n_ubatch)
    host = header.input_bytes + sum(header.layer_bytes[:first_gpu]) + first_gpu * kv_per_layer
    return VramNeed(
        n_layer=header.n_layer,
        n_gpu_layers=units,
        ctx_size=n_ctx,
        slots=slots,
        n_ctx_seq=n_ctx_seq,
        n_ubatch=n_ubatch,
        per_layer_bytes=list(header.layer_bytes),
        output_bytes=header.output_bytes,
        host_bytes=host + (header.output_bytes if units == 0 else 0),
        kv_bytes_per_layer=kv_per_layer,
        kq_bytes=n_ctx_seq * n_tokens * header.n_head * _F32,
        mask_bytes=n_ctx_seq * n_tokens * _F32,
        token_inputs_bytes=n_tokens * _TOKEN_INPUT_BYTES + _BUFFER_ALIGN,
        cells_bytes=n_ctx * header.n_embd_k_gqa * _F16,
        logits_bytes=header.n_vocab * n_tokens * _F32,
        cuda_overhead_bytes=cuda_overhead_bytes,
        headroom_bytes=headroom_bytes,
        model_path=model_path,
    )


def estimate_vram(
    model_path: str | os.PathLike[str],
    *,
    ctx_size: int,
    slots: int = 1,
    n_gpu_layers: int | None = None,
    cuda_overhead_bytes: int = DEFAULT_CUDA_OVERHEAD_BYTES,
    headroom_bytes: int = DEFAULT_HEADROOM_BYTES,
    n_ubatch: int = DEFAULT_N_UBATCH,
    kv_unified: bool = False,
) -> VramNeed:
    """Read the GGUF header at `model_path` and estimate the VRAM need (see the module docstring)."""
    return estimate_vram_from_header(
        read_model_header(model_path),
        ctx_size=ctx_size,
        slots=slots,
        n_gpu_layers=n_gpu_layers,
        cuda_overhead_bytes=cuda_overhead_bytes,
        headroom_bytes=headroom_bytes,
        n_ubatch=n_ubatch,
        kv_unified=kv_unified,
        model_path=os.fspath(model_path),
    )
