"""llama.cpp's layer placement for `--split-mode layer`, reproduced in float32 as llama.cpp computes it.

src/llama-model.cpp (`load_tensors`, b11434): the tensor_split values are summed cumulatively and divided by
their sum (float); the offloaded units are the repeating layers from i_gpu_start on plus the output layer
(index n_layer); unit k goes to the first device whose split point is greater than float(k)/n_units
(`std::upper_bound`). So the output layer lands on the last device that gets anything, and a device whose
ratio is 0 gets nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "RATIO_DECIMALS",
    "format_ratios",
    "layer_counts",
    "normalise_ratios",
    "parse_ratios",
    "ratios_for_counts",
]

RATIO_DECIMALS = 6
_SCALE = 10**RATIO_DECIMALS


def layer_counts(ratios: Sequence[float], n_units: int) -> list[int]:
    """Units per device that llama.cpp assigns for these tensor_split values (need not be normalised)."""
    if not ratios:
        raise ValueError("no devices")
    counts = [0] * len(ratios)
    if n_units <= 0:
        return counts
    splits = np.cumsum(np.asarray(ratios, dtype=np.float32), dtype=np.float32)
    total = splits[-1]
    if not total > 0:
        raise ValueError("tensor_split needs a positive entry")
    splits = (splits / total).astype(np.float32)
    points = (np.arange(n_units, dtype=np.float32) / np.float32(n_units)).astype(np.float32)
    devices = np.searchsorted(splits, points, side="right")
    for device in devices.tolist():
        counts[min(int(device), len(ratios) - 1)] += 1
    return counts


def ratios_for_counts(counts: Sequence[int]) -> list[float]:
    """tensor_split values (6 decimals, summing to 1) for which llama.cpp assigns exactly `counts` units.

    Each split point sits half a unit inside its device's range, so float rounding cannot move a layer."""
    n_units = sum(counts)
    if n_units <= 0:
        raise ValueError("no units to place")
    points: list[int] = []
    cumulative = 0
    for count in counts:
        cumulative += count
        if cumulative == 0:
            points.append(0)
        elif cumulative == n_units:
            points.append(_SCALE)
        else:
            points.append(round((cumulative - 0.5) / n_units * _SCALE))
    parts = [b - a for a, b in zip([0, *points[:-1]], points, strict=True)]
    return [part / _SCALE for part in parts]


def normalise_ratios(values: Sequence[float]) -> list[float]:
    """Scale to sum 1 in steps of 1e-6 (largest remainder), so the text form sums to 1 exactly."""
    total = float(sum(values))
    exact = [v / total * _SCALE for v in values]
    parts = [int(x) for x in exact]
    order = sorted(range(len(values)), key=lambda i: (parts[i] - exact[i], i))
    for i in order[: _SCALE - sum(parts)]:
        parts[i] += 1
    return [part / _SCALE for part in parts]


def format_ratios(ratios: Sequence[float]) -> str:
    """The `--tensor-split` argument."""
    return ",".join(f"{r:.{RATIO_DECIMALS}f}" for r in ratios)


def parse_ratios(text: str) -> list[float]:
    """What llama.cpp reads back from `--tensor-split` (std::stof of each comma-separated value)."""
    return [float(np.float32(float(part))) for part in text.split(",")]
