"""The tiny model writer: a deterministic, loadable llama GGUF (recipe in ENGINE.md)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, TokenType

from poolmgr.engines.tiny_model import TINY_MODEL_BYTES, write_tiny_model

from ._helpers import VRAM_TABLE, load_json


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_arguments_write_byte_identical_files(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a.gguf")
    b = write_tiny_model(tmp_path / "b.gguf")
    assert a.read_bytes() == b.read_bytes()


def test_default_file_has_the_recorded_size(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "tiny.gguf")
    assert path.stat().st_size == TINY_MODEL_BYTES == 469_120


def test_eight_layer_long_context_variant_matches_the_h200_runs_model_size(tmp_path: Path) -> None:
    # vram-table.json's "long" model: 8 layers, ctx_train 134,217,728, 1,360,096 bytes
    described = load_json(VRAM_TABLE)["models"]["long"]
    path = write_tiny_model(tmp_path / "long.gguf", n_layer=8, ctx=134_217_728)
    assert f"{path.stat().st_size:,} bytes" in described


def test_another_seed_changes_the_weights_not_the_size(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a.gguf", seed=0)
    b = write_tiny_model(tmp_path / "b.gguf", seed=1)
    assert a.stat().st_size == b.stat().st_size
    assert _sha(a) != _sha(b)


def test_file_loads_with_gguf_reader_with_the_recipe_header(tmp_path: Path) -> None:
    reader = GGUFReader(write_tiny_model(tmp_path / "tiny.gguf"))
    field = reader.fields
    assert field["general.architecture"].contents() == "llama"
    assert field["llama.block_count"].contents() == 2
    assert field["llama.embedding_length"].contents() == 64
    assert field["llama.attention.head_count"].contents() == 4
    assert field["llama.attention.head_count_kv"].contents() == 2
    assert field["llama.feed_forward_length"].contents() == 128
    assert field["llama.context_length"].contents() == 2048
    assert field["llama.rope.dimension_count"].contents() == 16
    assert field["general.file_type"].contents() == 0  # ALL_F32
    assert field["tokenizer.ggml.model"].contents() == "llama"
    tokens = field["tokenizer.ggml.tokens"].contents()
    types = field["tokenizer.ggml.token_type"].contents()
    scores = field["tokenizer.ggml.scores"].contents()
    assert len(tokens) == 320
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[3] == "<0x00>" and tokens[258] == "<0xFF>"
    assert types.count(int(TokenType.BYTE)) == 256
    assert types.count(int(TokenType.NORMAL)) == 61
    assert scores[259:] == sorted(scores[259:], reverse=True)
    assert field["tokenizer.ggml.bos_token_id"].contents() == 1
    assert field["tokenizer.ggml.eos_token_id"].contents() == 2
    assert field["tokenizer.ggml.add_bos_token"].contents() is True


def test_tensors_are_seeded_small_normal_f32_in_llama_layout(tmp_path: Path) -> None:
    reader = GGUFReader(write_tiny_model(tmp_path / "tiny.gguf"))
    by_name = {t.name: t for t in reader.tensors}
    assert len(by_name) == 3 + 2 * 9
    assert list(by_name["token_embd.weight"].shape) == [64, 320]  # gguf order: (in, out)
    assert list(by_name["blk.1.attn_k.weight"].shape) == [64, 32]
    assert list(by_name["blk.0.ffn_down.weight"].shape) == [128, 64]
    weights = np.asarray(by_name["blk.0.ffn_up.weight"].data, dtype=np.float32)
    assert weights.dtype == np.float32
    assert 0.04 < float(weights.std()) < 0.06
    assert abs(float(weights.mean())) < 0.01


def test_bad_shapes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_head"):
        write_tiny_model(tmp_path / "x.gguf", n_head=3)
    with pytest.raises(ValueError, match="positive"):
        write_tiny_model(tmp_path / "x.gguf", n_layer=0)
    assert not (tmp_path / "x.gguf").exists()
