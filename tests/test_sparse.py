"""Relative indices with filler entries (onnx_dc/codec/relative_indices.py, FORMAT.md section 4.3)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_dc.errors import InvalidTensorError, SettingsError
from onnx_dc.codec.relative_indices import absolute_positions, count_fillers, fillers_per_position, gap_symbol_counts, relative_indices


@st.composite
def positions_and_bits(draw, max_numel: int = 5000):
    numel = draw(st.integers(0, max_numel))
    density = draw(st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 2**32 - 1))
    kept = np.random.default_rng(seed).random(numel) < density
    return np.flatnonzero(kept), draw(st.integers(1, 16))


def _reference_entries(positions: np.ndarray, index_bits: int) -> tuple[list[int], list[bool]]:
    """FORMAT.md 4.3 written as a plain loop: (gap symbols, is_filler) of every entry."""
    gaps, fillers = [], []
    previous = -1
    span = 1 << index_bits
    for q in positions.tolist():
        d = q - previous
        while d > span:
            gaps.append(span - 1)
            fillers.append(True)
            d -= span
        gaps.append(d - 1)
        fillers.append(False)
        previous = q
    return gaps, fillers


@settings(max_examples=200, deadline=None)
@given(positions_and_bits())
def test_relative_indices_match_the_specification_and_round_trip(case):
    positions, index_bits = case
    gaps, kept_entries = relative_indices(positions, index_bits)
    expected_gaps, expected_fillers = _reference_entries(positions, index_bits)
    assert gaps.tolist() == expected_gaps
    is_filler = np.ones(gaps.size, dtype=bool)
    is_filler[kept_entries] = False
    assert is_filler.tolist() == expected_fillers
    assert gaps.size == 0 or (gaps.min() >= 0 and gaps.max() < 1 << index_bits)
    entry_positions = absolute_positions(gaps)
    np.testing.assert_array_equal(entry_positions[kept_entries], positions)
    assert count_fillers(positions, index_bits) == int(is_filler.sum())
    np.testing.assert_array_equal(
        gap_symbol_counts(positions, index_bits), np.bincount(gaps, minlength=1 << index_bits)
    )
    np.testing.assert_array_equal(fillers_per_position(positions, index_bits).sum(), is_filler.sum())


def test_paper_style_example_three_bit_gaps():
    # Positions 1, 4, 15 with 3-bit gaps (advance 1..8): 4 -> 15 is 11 > 8, so one filler at 12.
    gaps, kept = relative_indices(np.array([1, 4, 15]), 3)
    assert gaps.tolist() == [1, 2, 7, 2]
    assert kept.tolist() == [0, 1, 3]
    assert absolute_positions(gaps).tolist() == [1, 4, 12, 15]
    assert count_fillers(np.array([1, 4, 15]), 3) == 1


def test_distance_exactly_the_span_needs_no_filler():
    span = 1 << 5
    positions = np.array([span - 1, 2 * span - 1, 2 * span + span])  # distances 32, 32, 33
    gaps, kept = relative_indices(positions, 5)
    assert gaps.tolist() == [31, 31, 31, 0]  # only the distance 33 needs one filler
    assert count_fillers(positions, 5) == 1


@pytest.mark.parametrize("index_bits", [1, 2, 5, 8, 16])
def test_huge_gap(index_bits):
    positions = np.array([0, 10_000_000, 10_000_001])
    gaps, kept = relative_indices(positions, index_bits)
    expected_fillers = (10_000_000 - 1) >> index_bits
    assert count_fillers(positions, index_bits) == expected_fillers
    assert gaps.size == 3 + expected_fillers
    np.testing.assert_array_equal(absolute_positions(gaps)[kept], positions)


def test_empty_positions():
    gaps, kept = relative_indices(np.array([], dtype=np.int64), 4)
    assert gaps.size == 0 and kept.size == 0
    assert count_fillers(np.array([], dtype=np.int64), 4) == 0
    assert absolute_positions(np.array([], dtype=np.int64)).size == 0
    assert gap_symbol_counts(np.array([], dtype=np.int64), 4).tolist() == [0] * 16


@pytest.mark.parametrize("positions", [[3, 3], [5, 2], [-1, 4], [[1, 2]]])
def test_rejects_positions_that_are_not_strictly_increasing_naturals(positions):
    with pytest.raises(InvalidTensorError):
        relative_indices(np.array(positions), 4)


def test_rejects_float_positions():
    with pytest.raises(InvalidTensorError):
        relative_indices(np.array([1.0, 2.0]), 4)


@pytest.mark.parametrize("index_bits", [0, 17, -3, True, 2.0, "5"])
def test_rejects_index_bits_out_of_range(index_bits):
    with pytest.raises(SettingsError):
        relative_indices(np.array([1, 2]), index_bits)


def test_absolute_positions_rejects_negative_gaps():
    with pytest.raises(InvalidTensorError):
        absolute_positions(np.array([1, -1]))
