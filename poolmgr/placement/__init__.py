"""Placement: how much VRAM a model needs (from its GGUF header) and how it is split over GPUs."""

from poolmgr.placement.hetero_split import SplitPlan, engine_gpu_flags, format_bytes
from poolmgr.placement.model_header import ModelHeader, read_model_header
from poolmgr.placement.plan import make_plan, plan_json, plan_table
from poolmgr.placement.vram import (
    DEFAULT_CUDA_OVERHEAD_BYTES,
    DEFAULT_HEADROOM_BYTES,
    DEFAULT_N_UBATCH,
    VramNeed,
    effective_context,
    estimate_vram,
    estimate_vram_from_header,
)

__all__ = [
    "DEFAULT_CUDA_OVERHEAD_BYTES",
    "DEFAULT_HEADROOM_BYTES",
    "DEFAULT_N_UBATCH",
    "ModelHeader",
    "SplitPlan",
    "VramNeed",
    "effective_context",
    "engine_gpu_flags",
    "estimate_vram",
    "estimate_vram_from_header",
    "format_bytes",
    "make_plan",
    "plan_json",
    "plan_table",
    "read_model_header",
]
