"""read_model_header: shapes and weight bytes from a GGUF's header and tensor infos, never its data."""

from __future__ import annotations

from pathlib import Path

import pytest

from poolmgr.engines.tiny_model import write_tiny_model
from poolmgr.errors import ConfigError
from poolmgr.placement import ModelHeader, read_model_header

from ._helpers import LLAMA_70B, llama_header, write_sparse_llama_gguf


def test_tiny_model_header_counts_layer_input_and_output_bytes(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "tiny.gguf")
    header = read_model_header(path)
    n_embd, n_ff, n_kv, f32 = 64, 128, 32, 4
    per_layer = f32 * (2 * n_embd + 2 * n_embd * n_embd + 2 * n_embd * n_kv + 3 * n_embd * n_ff)
    assert header.n_layer == 2
    assert header.layer_bytes == (per_layer, per_layer)
    assert header.input_bytes == 320 * n_embd * f32  # token_embd stays on the CPU
    assert header.output_bytes == 320 * n_embd * f32 + n_embd * f32
    weight_bytes = sum(header.layer_bytes) + header.input_bytes + header.output_bytes
    assert weight_bytes + 9088 == path.stat().st_size  # all tensor bytes + the 9,088-byte header
    assert (header.n_head, header.n_head_kv, header.n_vocab, header.n_ctx_train) == (4, 2, 320, 2048)
    assert header.n_embd_k_gqa == header.n_embd_v_gqa == 32


def test_llama_cpp_model_buffer_of_the_h200_runs_is_layers_plus_output(tmp_path: Path) -> None:
    # vram-table.json logs "CUDA0 model buffer size = 0.36 MiB" (tiny) and 1.21 MiB (8 layers), CPU 0.08 MiB
    for n_layer, logged_mib in ((2, 0.36), (8, 1.21)):
        header = read_model_header(write_tiny_model(tmp_path / f"m{n_layer}.gguf", n_layer=n_layer))
        on_gpu = sum(header.layer_bytes) + header.output_bytes
        assert round(on_gpu / (1 << 20), 2) == logged_mib
        assert round(header.input_bytes / (1 << 20), 2) == 0.08


def test_seventy_billion_sparse_gguf_reads_from_tensor_infos_alone(tmp_path: Path) -> None:
    path = write_sparse_llama_gguf(tmp_path / "llama-70b.gguf", **LLAMA_70B)
    assert path.stat().st_size > 30 * (1 << 30)  # 36 GiB described, a hole on disk
    header = read_model_header(path)
    assert header == llama_header(**LLAMA_70B)
    assert header.n_embd_k_gqa == 1024


def test_missing_tied_output_counts_token_embd_on_the_output_device(tmp_path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "tied.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((10, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.zeros(8, dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = read_model_header(path)
    assert header.output_bytes == 10 * 8 * 4 + 8 * 4
    assert header.n_head_kv == 2  # no head_count_kv: same as head_count
    assert header.n_vocab == 10


def test_missing_corrupt_or_headless_files_raise_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        read_model_header(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTAGGUF" * 8)
    with pytest.raises(ConfigError, match="not a readable GGUF"):
        read_model_header(bad)


def test_hand_built_headers_are_validated() -> None:
    with pytest.raises(ValueError, match="layer_bytes"):
        ModelHeader("llama", 2, 64, 4, 2, 320, (1,), 0, 0)
    with pytest.raises(ValueError, match="positive"):
        ModelHeader("llama", 0, 64, 4, 2, 320, (), 0, 0)
