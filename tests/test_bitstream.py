"""MSB-first bit packing (onnx_dc/codec/bitstream.py), checked against numpy.packbits(bitorder="big")."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_dc.codec.bitstream import MAX_VALUE_BITS, byte_windows, pack_symbols, pack_symbols_chunked, pack_values, padding_bits_are_zero, unpack_fixed_width


def _reference_pack(values: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, int]:
    bits = [(int(v) >> (int(w) - 1 - i)) & 1 for v, w in zip(values, widths) for i in range(int(w))]
    return np.packbits(np.array(bits, dtype=np.uint8), bitorder="big"), len(bits)


@st.composite
def values_and_widths(draw):
    n = draw(st.integers(0, 3000))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    widths = rng.integers(1, draw(st.integers(1, MAX_VALUE_BITS)) + 1, n)
    values = rng.integers(0, 1 << widths) if n else np.zeros(0, dtype=np.int64)
    return values, widths


@settings(max_examples=100, deadline=None)
@given(values_and_widths())
def test_pack_values_matches_packbits(case):
    values, widths = case
    payload, n_bits = pack_values(values, widths)
    expected, expected_bits = _reference_pack(values, widths)
    assert n_bits == expected_bits
    np.testing.assert_array_equal(payload, expected)
    assert padding_bits_are_zero(payload, n_bits)


def test_pack_values_crosses_many_blocks():
    rng = np.random.default_rng(1)
    n = 200_000  # several internal blocks
    widths = rng.integers(1, 17, n)
    values = rng.integers(0, 1 << widths)
    payload, n_bits = pack_values(values, widths)
    assert n_bits == int(widths.sum())
    # Read back every value at its offset.
    windows = byte_windows(payload).astype(np.int64)
    start = np.cumsum(widths) - widths
    read = (windows[start >> 3] >> (32 - widths - (start & 7))) & ((1 << widths) - 1)
    np.testing.assert_array_equal(read, values)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 16), st.integers(0, 500), st.integers(0, 2**32 - 1))
def test_fixed_width_round_trip(width, n, seed):
    values = np.random.default_rng(seed).integers(0, 1 << width, n)
    payload, n_bits = pack_values(values, width)
    assert n_bits == n * width
    assert payload.size == -(-n_bits // 8)
    np.testing.assert_array_equal(unpack_fixed_width(payload, width, n), values)
    expected, _ = _reference_pack(values, np.full(n, width))
    np.testing.assert_array_equal(payload, expected)


def test_pack_symbols_equals_pack_values_of_lookups():
    rng = np.random.default_rng(2)
    width_table = np.array([1, 3, 3, 5, 12, 7])
    code_table = np.array([0, 5, 6, 17, 4000, 99])
    symbols = rng.integers(0, 6, 100_000)
    a = pack_symbols(symbols, code_table, width_table)
    b = pack_values(code_table[symbols], width_table[symbols])
    assert a[1] == b[1]
    np.testing.assert_array_equal(a[0], b[0])


def test_unpack_at_an_offset():
    payload = np.array([0b10110011, 0b01011100], dtype=np.uint8)
    assert unpack_fixed_width(payload, 3, 3, start_bit=2).tolist() == [0b110, 0b011, 0b010]


def test_padding_check():
    assert padding_bits_are_zero(np.array([0b10100000], dtype=np.uint8), 3)
    assert not padding_bits_are_zero(np.array([0b10100001], dtype=np.uint8), 3)
    assert padding_bits_are_zero(np.array([0xFF], dtype=np.uint8), 8)


def test_rejects_bad_widths():
    with pytest.raises(ValueError):
        pack_values(np.array([1]), 0)
    with pytest.raises(ValueError):
        pack_values(np.array([1]), MAX_VALUE_BITS + 1)
    with pytest.raises(ValueError):
        pack_values(np.array([1, 2]), np.array([3]))


@pytest.mark.parametrize("chunk_symbols", [1, 1000, 1024, 65536, 70_001, 500_000])
def test_chunk_bits_across_internal_blocks(chunk_symbols):
    rng = np.random.default_rng(4)
    width_table = np.array([2, 4, 7, 9, 15])
    code_table = np.array([1, 3, 100, 300, 20000])
    symbols = rng.integers(0, 5, 150_000)
    payload, chunk_bits = pack_symbols_chunked(symbols, code_table, width_table, chunk_symbols)
    widths = width_table[symbols]
    expected = [int(widths[i : i + chunk_symbols].sum()) for i in range(0, symbols.size, chunk_symbols)]
    np.testing.assert_array_equal(chunk_bits, expected)
    np.testing.assert_array_equal(payload, pack_values(code_table[symbols], widths)[0])


def test_pack_symbols_rejects_symbols_without_width():
    with pytest.raises(ValueError):
        pack_symbols(np.array([0, 1]), np.array([0, 0]), np.array([1, 0]))
