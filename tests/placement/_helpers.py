"""Test helpers for placement: fixture devices, synthetic model headers and GGUFs, a reference split."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from poolmgr.devices._snapshot import DeviceSnapshot
from poolmgr.placement import ModelHeader, VramNeed

VRAM_FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "vram"
VRAM_TABLE = VRAM_FIXTURES / "vram-table.json"
HETERO_SNAPSHOT = VRAM_FIXTURES / "hetero-3gpu-nvml-snapshot.json"
H100_SNAPSHOT = VRAM_FIXTURES / "h100-nvml-snapshot.json"

MIB = 1 << 20
GIB = 1 << 30
Q4_K = GGMLQuantizationType.Q4_K
Q6_K = GGMLQuantizationType.Q6_K


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def devices_from_snapshot(path: Path) -> list[DeviceSnapshot]:
    """DeviceSnapshots from a recorded NVML snapshot's memory_info_v2 (free excludes the driver's reserve)."""
    out = []
    for dev in load_json(path)["devices"]:
        mem = dev["memory_info_v2"]
        out.append(
            DeviceSnapshot(
                index=dev["index"],
                uuid=dev["uuid"],
                name=dev["name"],
                pci_bus_id=dev["pci"]["busId"],
                compute_capability=(dev["cuda_compute_capability"][0], dev["cuda_compute_capability"][1]),
                vram_total_bytes=mem["total"],
                vram_free_bytes=mem["free"],
                vram_reserved_bytes=mem["reserved"],
                processes=tuple((p["pid"], p["usedGpuMemory"]) for p in dev["compute_processes"]),
            )
        )
    return out


def device(uuid: str, free_bytes: int, *, name: str = "GPU", index: int = 0) -> DeviceSnapshot:
    return DeviceSnapshot(
        index=index,
        uuid=uuid,
        name=name,
        pci_bus_id=f"00000000:{index:02x}:00.0",
        compute_capability=(9, 0),
        vram_total_bytes=free_bytes + GIB,
        vram_free_bytes=free_bytes,
    )


def quant_bytes(n_elements: int, qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return n_elements // block * size


def llama_shapes(
    *, n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int, n_vocab: int
) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a llama model in numpy (out, in) order."""
    n_kv = n_embd // n_head * n_head_kv
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (n_vocab, n_embd),
        "output_norm.weight": (n_embd,),
        "output.weight": (n_vocab, n_embd),
    }
    for il in range(n_layer):
        p = f"blk.{il}."
        shapes |= {
            p + "attn_norm.weight": (n_embd,),
            p + "attn_q.weight": (n_embd, n_embd),
            p + "attn_k.weight": (n_kv, n_embd),
            p + "attn_v.weight": (n_kv, n_embd),
            p + "attn_output.weight": (n_embd, n_embd),
            p + "ffn_norm.weight": (n_embd,),
            p + "ffn_gate.weight": (n_ff, n_embd),
            p + "ffn_up.weight": (n_ff, n_embd),
            p + "ffn_down.weight": (n_embd, n_ff),
        }
    return shapes


def _qtype(name: str, shape: tuple[int, ...]) -> GGMLQuantizationType:
    if len(shape) == 1:
        return GGMLQuantizationType.F32
    return Q6_K if name == "output.weight" else Q4_K


def tensor_bytes(name: str, shape: tuple[int, ...]) -> int:
    return quant_bytes(int(np.prod(shape)), _qtype(name, shape))


def llama_header(
    *,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    n_ff: int,
    n_vocab: int = 32000,
    n_ctx_train: int = 4096,
) -> ModelHeader:
    """A ModelHeader for a Q4_K llama (Q6_K output, F32 norms), sized from its tensor shapes."""
    shapes = llama_shapes(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff, n_vocab=n_vocab
    )
    layers = [0] * n_layer
    for name, shape in shapes.items():
        if name.startswith("blk."):
            layers[int(name.split(".")[1])] += tensor_bytes(name, shape)
    return ModelHeader(
        architecture="llama",
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_vocab=n_vocab,
        layer_bytes=tuple(layers),
        input_bytes=tensor_bytes("token_embd.weight", shapes["token_embd.weight"]),
        output_bytes=sum(tensor_bytes(n, shapes[n]) for n in ("output.weight", "output_norm.weight")),
        n_ctx_train=n_ctx_train,
        n_ff=n_ff,
    )


LLAMA_7B = {"n_layer": 32, "n_embd": 4096, "n_head": 32, "n_head_kv": 32, "n_ff": 11008}
LLAMA_70B = {"n_layer": 80, "n_embd": 8192, "n_head": 64, "n_head_kv": 8, "n_ff": 28672}


def write_sparse_llama_gguf(path: Path, *, n_ctx_train: int = 4096, n_vocab: int = 32000, **dims: int) -> Path:
    """A GGUF whose header describes a full-size Q4_K llama and whose data is a hole (sparse file)."""
    shapes = llama_shapes(n_vocab=n_vocab, **dims)
    writer = GGUFWriter(path, "llama")
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(dims["n_embd"])
    writer.add_block_count(dims["n_layer"])
    writer.add_feed_forward_length(dims["n_ff"])
    writer.add_head_count(dims["n_head"])
    writer.add_head_count_kv(dims["n_head_kv"])
    writer.add_vocab_size(n_vocab)
    for name, shape in shapes.items():
        writer.add_tensor_info(name, shape, np.dtype(np.float32), tensor_bytes(name, shape), _qtype(name, shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    data_start = _align(path.stat().st_size, 32)
    data = sum(_align(tensor_bytes(n, s), 32) for n, s in shapes.items())
    os.truncate(path, data_start + data)
    return path


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def reference_layer_counts(ratios: list[float], n_units: int) -> list[int]:
    """llama.cpp's loop from load_tensors, one float32 step at a time (an independent check)."""
    f32 = np.float32
    splits = []
    acc = f32(0)
    for r in ratios:
        acc = f32(acc + f32(r))
        splits.append(acc)
    splits = [f32(s / acc) for s in splits]
    counts = [0] * len(ratios)
    for il in range(n_units):
        x = f32(f32(il) / f32(n_units))
        counts[next(i for i, s in enumerate(splits) if s > x)] += 1
    return counts


def device_bytes(need: VramNeed, first_layer: int, n_layers: int, *, has_output: bool, pipeline_copies: int = 1) -> int:
    """What llama.cpp allocates on a device holding layers first_layer..first_layer+n_layers-1 (headroom not
    included), from the need's parts: the oracle the split's own per-device bytes are checked against."""
    weights = sum(need.per_layer_bytes[first_layer : first_layer + n_layers])
    return weights + need.device_extra_bytes(n_layers, has_output=has_output, pipeline_copies=pipeline_copies)
