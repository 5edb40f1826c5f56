"""The float32 reproduction of llama.cpp's layer placement, and ratios that reproduce a chosen placement."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolmgr.placement._layer_split import (
    format_ratios,
    layer_counts,
    normalise_ratios,
    parse_ratios,
    ratios_for_counts,
)

from ._helpers import reference_layer_counts

ratio_lists = st.lists(st.floats(min_value=0.0, max_value=100.0, allow_nan=False), min_size=1, max_size=8).filter(
    lambda rs: sum(rs) > 1e-3
)


@given(ratio_lists, st.integers(min_value=1, max_value=200))
def test_vectorised_placement_equals_llama_cpps_loop(ratios: list[float], n_units: int) -> None:
    assert layer_counts(ratios, n_units) == reference_layer_counts(ratios, n_units)


def test_equal_split_of_81_units_over_two_devices_puts_output_on_the_last() -> None:
    counts = layer_counts([1.0, 1.0], 81)
    assert sum(counts) == 81
    assert counts == reference_layer_counts([1.0, 1.0], 81)
    assert counts[0] in (40, 41)


def test_zero_ratio_devices_get_nothing() -> None:
    assert layer_counts([0.0, 3.0, 0.0, 1.0, 0.0], 33) == reference_layer_counts([0.0, 3.0, 0.0, 1.0, 0.0], 33)
    counts = layer_counts([0.0, 3.0, 0.0, 1.0, 0.0], 33)
    assert counts[0] == counts[2] == counts[4] == 0


@given(st.lists(st.integers(min_value=0, max_value=120), min_size=2, max_size=8).filter(lambda c: sum(c) > 0))
def test_ratios_for_counts_reproduce_exactly_those_counts_through_the_flag_text(counts: list[int]) -> None:
    ratios = ratios_for_counts(counts)
    assert sum(ratios) == pytest.approx(1.0, abs=1e-9)
    assert all(r >= 0 for r in ratios)
    assert layer_counts(parse_ratios(format_ratios(ratios)), sum(counts)) == counts
    assert [r == 0 for r in ratios] == [c == 0 for c in counts]


@given(ratio_lists)
def test_normalised_ratios_sum_to_one_in_text_form(values: list[float]) -> None:
    ratios = normalise_ratios(values)
    assert sum(round(r * 1e6) for r in ratios) == 1_000_000
    assert all(abs(r - v / sum(values)) <= 1e-6 for r, v in zip(ratios, values, strict=True))


def test_all_zero_ratios_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        layer_counts([0.0, 0.0], 10)
    with pytest.raises(ValueError, match="no units"):
        ratios_for_counts([0, 0])
