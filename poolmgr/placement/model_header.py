"""What a VRAM estimate needs from a GGUF file, read from its header and tensor infos only.

`gguf.GGUFReader` memory-maps the file and parses the key/value header and the tensor infos; tensor data is
never read, so a 40 GB model costs a few milliseconds. Tensor sizes come from shapes x type sizes
(`ReaderTensor.n_bytes`), which is exactly what llama.cpp allocates for them.

Where llama.cpp puts the tensors (src/llama-model.cpp, `load_tensors`): the input layer (`token_embd`) always
stays on the CPU; each repeating layer `blk.N.*` goes to one device; the output layer (`output`,
`output_norm`) is placed like one more layer after the last. A model without `output.weight` ties it to
`token_embd`, which llama.cpp then duplicates onto the output layer's device.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poolmgr.errors import ConfigError

__all__ = ["ModelHeader", "read_model_header"]

_BLOCK = re.compile(r"^blk\.(\d+)\.")
# Tensors of the input layer: llama.cpp keeps them in host memory.
_INPUT_TENSORS = ("token_embd.", "token_types.", "position_embd.")


@dataclass(frozen=True)
class ModelHeader:
    """Model shape and weight bytes; `read_model_header` builds one from a GGUF, tests build them by hand."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    layer_bytes: tuple[int, ...]  # weights of blk.N.*, one entry per layer
    input_bytes: int  # token_embd & co: host memory
    output_bytes: int  # output + output_norm (+ anything not in a block), on the output layer's device
    head_dim_k: int = 0  # 0: n_embd // n_head
    head_dim_v: int = 0
    n_ctx_train: int = 0
    n_ff: int = 0

    def __post_init__(self) -> None:
        if min(self.n_layer, self.n_embd, self.n_head, self.n_head_kv, self.n_vocab) <= 0:
            raise ValueError("n_layer, n_embd, n_head, n_head_kv and n_vocab must be positive")
        if len(self.layer_bytes) != self.n_layer:
            raise ValueError(f"layer_bytes has {len(self.layer_bytes)} entries for {self.n_layer} layers")
        if min(self.layer_bytes) < 0 or self.input_bytes < 0 or self.output_bytes < 0:
            raise ValueError("tensor byte counts must not be negative")

    @property
    def n_embd_k_gqa(self) -> int:
        """Width of one K cache row: key head size x KV heads."""
        return (self.head_dim_k or self.n_embd // self.n_head) * self.n_head_kv

    @property
    def n_embd_v_gqa(self) -> int:
        return (self.head_dim_v or self.n_embd // self.n_head) * self.n_head_kv


def _scalar(fields: dict[str, Any], key: str, default: int | None = None) -> int:
    field = fields.get(key)
    if field is None:
        if default is None:
            raise ConfigError(f"GGUF header has no {key!r}")
        return default
    value = field.contents()
    if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv): the largest is the safe bound
        return int(max(value)) if value else (default or 0)
    return int(value)


def _split_tensor_bytes(tensors: Sequence[Any], n_layer: int) -> tuple[list[int], int, int, bool]:
    layers = [0] * n_layer
    input_bytes = output_bytes = 0
    has_output = False
    for tensor in tensors:
        name = str(tensor.name)
        size = int(tensor.n_bytes)
        match = _BLOCK.match(name)
        if match and int(match.group(1)) < n_layer:
            layers[int(match.group(1))] += size
        elif name.startswith(_INPUT_TENSORS):
            input_bytes += size
        else:
            output_bytes += size
            has_output = has_output or name == "output.weight"
    return layers, input_bytes, output_bytes, has_output


def _n_vocab(fields: dict[str, Any], tensors: Sequence[Any], arch: str) -> int:
    for tensor in tensors:
        if tensor.name == "token_embd.weight" and len(tensor.shape) == 2:
            return int(tensor.shape[1])  # gguf order: (n_embd, n_vocab)
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    return _scalar(fields, f"{arch}.vocab_size")


def read_model_header(path: str | os.PathLike[str]) -> ModelHeader:
    """Parse a GGUF's header and tensor infos (no tensor data is read).

    Raises `ConfigError` when the file is missing or not a GGUF that describes a transformer."""
    from gguf import GGUFReader  # heavy import (numpy); only the callers that read files pay it

    model = Path(path)
    if not model.is_file():
        raise ConfigError(f"model file not found: {model}")
    try:
        reader = GGUFReader(model, "r")
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ConfigError(f"{model}: not a readable GGUF file: {exc}") from exc
    fields: dict[str, Any] = dict(reader.fields)
    if "general.architecture" not in fields:
        raise ConfigError(f"{model}: GGUF header has no general.architecture")
    arch = str(fields["general.architecture"].contents())
    n_layer = _scalar(fields, f"{arch}.block_count")
    n_embd = _scalar(fields, f"{arch}.embedding_length")
    n_head = _scalar(fields, f"{arch}.attention.head_count")
    if n_layer <= 0 or n_embd <= 0 or n_head <= 0:
        raise ConfigError(f"{model}: block_count, embedding_length and head_count must be positive")
    layers, input_bytes, output_bytes, has_output = _split_tensor_bytes(reader.tensors, n_layer)
    if not has_output:
        # tied embeddings: llama.cpp duplicates token_embd onto the output layer's device
        output_bytes += sum(int(t.n_bytes) for t in reader.tensors if t.name == "token_embd.weight")
    return ModelHeader(
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=_scalar(fields, f"{arch}.attention.head_count_kv", n_head),
        n_vocab=_n_vocab(fields, reader.tensors, arch),
        layer_bytes=tuple(layers),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        head_dim_k=_scalar(fields, f"{arch}.attention.key_length", 0),
        head_dim_v=_scalar(fields, f"{arch}.attention.value_length", 0),
        n_ctx_train=_scalar(fields, f"{arch}.context_length", 0),
        n_ff=_scalar(fields, f"{arch}.feed_forward_length", 0),
    )
