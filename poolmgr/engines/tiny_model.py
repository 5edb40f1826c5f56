"""A tiny, real llama-architecture GGUF for tests and development (no model hub is reachable).

The recipe is the one in ENGINE.md that loaded and generated with llama-server b11434: F32 weights drawn from a
seeded normal distribution (x 0.05), a 320-token "llama" (SentencePiece-style) vocabulary whose 256 byte tokens
make any text tokenizable. The same arguments always give a byte-identical file (469,120 bytes with the
defaults). The text it generates is noise: tests check status codes and structure, never text.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType

__all__ = ["TINY_MODEL_BYTES", "write_tiny_model"]

TINY_MODEL_BYTES = 469_120  # the size write_tiny_model() gives with its defaults

# 61 ordinary pieces; "▁" (U+2581) marks a word start as in SentencePiece vocabularies.
_PIECES = (
    "▁",
    "e",
    "t",
    "a",
    "o",
    "n",
    "i",
    "s",
    "r",
    "h",
    "l",
    "d",
    "he",
    "in",
    "er",
    "an",
    "on",
    "re",
    "at",
    "en",
    "nd",
    "es",
    "or",
    "is",
    "ed",
    "ing",
    "it",
    "ou",
    "ar",
    "st",
    "▁the",
    "▁and",
    "▁attention",
    "▁embedding",
    "▁tokenizer",
    "▁sampling",
    "▁inference",
    "▁that",
    "▁throughput",
    "▁for",
    "▁quantization",
    "▁temperature",
    "▁probability",
    "▁model",
    "▁token",
    "▁slot",
    "▁ready",
    "▁health",
    "▁engine",
    "▁device",
    "▁memory",
    "▁context",
    "▁server",
    "▁request",
    "▁response",
    "▁completion",
    "▁layer",
    "▁split",
    "▁pool",
    "▁generate",
    "▁prompt",
)


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    scores = [0.0, 0.0, 0.0]
    types = [int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.CONTROL)]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        scores.append(0.0)
        types.append(int(TokenType.BYTE))
    for rank, piece in enumerate(_PIECES):
        tokens.append(piece)
        scores.append(-float(rank + 1))
        types.append(int(TokenType.NORMAL))
    return tokens, scores, types


def _tensors(
    *, n_embd: int, n_layer: int, n_head: int, n_head_kv: int, n_ff: int, n_vocab: int, seed: int
) -> list[tuple[str, np.ndarray]]:
    """Weights in numpy's (out, in) order; gguf stores the shape reversed, as llama.cpp expects."""
    rng = np.random.default_rng(seed)
    n_embd_kv = n_embd // n_head * n_head_kv

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)).astype(np.float32)

    out = [
        ("token_embd.weight", rand(n_vocab, n_embd)),
        ("output_norm.weight", rand(n_embd)),
        ("output.weight", rand(n_vocab, n_embd)),
    ]
    for il in range(n_layer):
        p = f"blk.{il}."
        out += [
            (p + "attn_norm.weight", rand(n_embd)),
            (p + "attn_q.weight", rand(n_embd, n_embd)),
            (p + "attn_k.weight", rand(n_embd_kv, n_embd)),
            (p + "attn_v.weight", rand(n_embd_kv, n_embd)),
            (p + "attn_output.weight", rand(n_embd, n_embd)),
            (p + "ffn_norm.weight", rand(n_embd)),
            (p + "ffn_gate.weight", rand(n_ff, n_embd)),
            (p + "ffn_up.weight", rand(n_ff, n_embd)),
            (p + "ffn_down.weight", rand(n_embd, n_ff)),
        ]
    return out


def write_tiny_model(
    path: str | os.PathLike[str],
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    ctx: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a loadable llama GGUF to `path` and return it; same arguments → byte-identical file."""
    if n_embd <= 0 or n_layer <= 0 or n_ff <= 0 or ctx <= 0:
        raise ValueError("n_embd, n_layer, n_ff and ctx must be positive")
    if n_head <= 0 or n_head_kv <= 0 or n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_head must divide n_embd and n_head_kv must divide n_head")
    target = Path(path)
    tokens, scores, types = _vocab()
    writer = GGUFWriter(target, "llama")
    writer.add_context_length(ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(int(LlamaFileType.ALL_F32))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    tensors = _tensors(
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        n_vocab=len(tokens),
        seed=seed,
    )
    for name, array in tensors:
        writer.add_tensor(name, array)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return target
