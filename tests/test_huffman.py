"""Canonical length-limited Huffman codes and the lockstep table decoder (onnx_dc/codec/huffman.py)."""

from __future__ import annotations

import heapq
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_dc.codec import huffman
from onnx_dc.errors import ContainerError, InvalidTensorError, SettingsError
from onnx_dc.codec.huffman import MAX_CODE_LENGTH, ChunkedStream, HuffmanCode, decode_chunked_streams, default_length_limit


def _heap_huffman_cost(freqs: list[int]) -> int:
    """Cost (total bits) of an unrestricted optimal Huffman code, the textbook way."""
    used = [f for f in freqs if f > 0]
    if len(used) == 1:
        return used[0]
    heap = list(used)
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def _kraft(lengths: np.ndarray) -> float:
    return float(sum(2.0 ** -int(length) for length in lengths if length > 0))


def _is_prefix_free(code: HuffmanCode) -> bool:
    words = [
        format(int(code.codes[s]), f"0{int(code.lengths[s])}b") for s in range(code.alphabet_size) if code.lengths[s]
    ]
    return not any(a != b and b.startswith(a) for a in words for b in words)


def _reference_decode(code: HuffmanCode, payload: np.ndarray, n: int) -> list[int]:
    """Bit-by-bit decoding by code-word lookup (the slow, obvious way)."""
    words = {
        format(int(code.codes[s]), f"0{int(code.lengths[s])}b"): s for s in range(code.alphabet_size) if code.lengths[s]
    }
    bits = "".join(format(int(b), "08b") for b in payload)
    out, current = [], ""
    for bit in bits:
        if len(out) == n:
            break
        current += bit
        if current in words:
            out.append(words[current])
            current = ""
    return out


frequencies = st.lists(st.integers(0, 10_000), min_size=1, max_size=300).filter(lambda f: any(f))


@settings(max_examples=200, deadline=None)
@given(frequencies)
def test_code_is_optimal_when_the_limit_does_not_bind(freqs):
    code = HuffmanCode.from_frequencies(np.array(freqs), max_length=MAX_CODE_LENGTH)
    used = np.flatnonzero(freqs)
    assert np.all(code.lengths[used] > 0) and np.all(np.delete(code.lengths, used) == 0)
    assert _kraft(code.lengths) <= 1.0
    assert _is_prefix_free(code)
    heap_cost = _heap_huffman_cost(freqs)
    cost = code.encoded_bits(np.array(freqs))
    if code.max_length < MAX_CODE_LENGTH:  # the limit did not bind: must be optimal
        assert cost == heap_cost
    else:
        assert cost >= heap_cost


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=2, max_size=6), st.integers(1, 4))
def test_length_limited_code_is_optimal_by_brute_force(freqs, limit):
    if len(freqs) > 1 << limit:
        with pytest.raises(SettingsError):
            HuffmanCode.from_frequencies(np.array(freqs), max_length=limit)
        return
    code = HuffmanCode.from_frequencies(np.array(freqs), max_length=limit)
    assert code.max_length <= limit
    best = min(
        sum(f * n for f, n in zip(freqs, lengths))
        for lengths in itertools.product(range(1, limit + 1), repeat=len(freqs))
        if sum(2.0**-n for n in lengths) <= 1.0
    )
    assert code.encoded_bits(np.array(freqs)) == best


def test_default_limit_is_12_then_15():
    assert default_length_limit(1) == 12
    assert default_length_limit(4096) == 12
    assert default_length_limit(4097) == 15
    # Fibonacci frequencies force a maximally skewed tree (unlimited depth ~ n - 1).
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    code = HuffmanCode.from_frequencies(np.array(fib))
    assert code.max_length == 12
    assert _kraft(code.lengths) == 1.0
    wide = HuffmanCode.from_frequencies(np.array(fib + [1] * 5000))
    assert wide.max_length == 15


def test_too_many_symbols_for_the_limit():
    with pytest.raises(SettingsError):
        HuffmanCode.from_frequencies(np.ones((1 << 15) + 1, dtype=np.int64))
    with pytest.raises(SettingsError):
        HuffmanCode.from_frequencies(np.ones(5, dtype=np.int64), max_length=2)
    code = HuffmanCode.from_frequencies(np.ones(1 << 15, dtype=np.int64))
    assert set(code.lengths.tolist()) == {15}


def test_single_symbol_gets_code_zero_of_length_one():
    code = HuffmanCode.from_frequencies(np.array([0, 0, 7, 0]))
    assert code.lengths.tolist() == [0, 0, 1, 0]
    assert int(code.codes[2]) == 0
    payload, n_bits = code.encode(np.array([2, 2, 2]))
    assert n_bits == 3 and payload.tolist() == [0]


def test_canonical_codes_match_rfc1951_example():
    # RFC 1951 section 3.2.2: lengths (3, 3, 3, 3, 3, 2, 4, 4) for symbols A..H.
    code = HuffmanCode.from_lengths(np.array([3, 3, 3, 3, 3, 2, 4, 4]))
    words = [format(int(c), f"0{int(n)}b") for c, n in zip(code.codes, code.lengths)]
    assert words == ["010", "011", "100", "101", "110", "00", "1110", "1111"]


@pytest.mark.parametrize(
    "lengths, keyword",
    [
        ([1, 1, 1], "oversubscribed"),
        ([2, 2, 2, 2, 3], "oversubscribed"),
        ([0, 0, 0], "empty code"),
        ([], "empty code"),
        ([16, 1], "outside"),
        ([-1, 1], "outside"),
    ],
)
def test_from_lengths_rejects_invalid_sets(lengths, keyword):
    with pytest.raises(ContainerError, match=keyword):
        HuffmanCode.from_lengths(np.array(lengths, dtype=np.int64))


def test_from_lengths_rejects_non_integer_arrays():
    with pytest.raises(ContainerError):
        HuffmanCode.from_lengths(np.array([[1, 1]]))
    with pytest.raises(ContainerError):
        HuffmanCode.from_lengths(np.array([1.0, 1.0]))


def test_from_lengths_accepts_incomplete_codes():
    code = HuffmanCode.from_lengths(np.array([1, 0, 2]))  # Kraft 3/4
    assert [int(c) for c in code.codes] == [0, 0, 2]


@pytest.mark.parametrize("freqs", [[0, 0], [-1, 2], [[1, 2]], [1.5, 2.0]])
def test_from_frequencies_rejects_bad_input(freqs):
    with pytest.raises(InvalidTensorError):
        HuffmanCode.from_frequencies(np.array(freqs))


def test_from_frequencies_rejects_bad_limit():
    with pytest.raises(SettingsError):
        HuffmanCode.from_frequencies(np.array([1, 2]), max_length=16)
    with pytest.raises(SettingsError):
        HuffmanCode.from_frequencies(np.array([1, 2]), max_length=0)


def test_encode_rejects_symbols_without_code():
    code = HuffmanCode.from_frequencies(np.array([3, 0, 1]))
    with pytest.raises(InvalidTensorError):
        code.encode(np.array([0, 1]))
    with pytest.raises(InvalidTensorError):
        code.encode(np.array([0, 3]))


@st.composite
def streams(draw):
    alphabet = draw(st.integers(1, 300))
    n = draw(st.integers(0, 3000))
    chunk = draw(st.integers(1, 400))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    weights = rng.pareto(draw(st.floats(0.3, 3.0)), alphabet) + 1e-3
    symbols = rng.choice(alphabet, size=n, p=weights / weights.sum())
    return symbols, alphabet, chunk


@settings(max_examples=150, deadline=None)
@given(streams())
def test_encode_then_lockstep_decode_round_trip(case):
    symbols, alphabet, chunk = case
    counts = np.bincount(symbols, minlength=alphabet)
    if not counts.any():
        counts[0] = 1
    code = HuffmanCode.from_frequencies(counts)
    payload, n_bits = code.encode(symbols)
    assert n_bits == code.encoded_bits(np.bincount(symbols, minlength=alphabet))
    assert _reference_decode(code, payload, symbols.size) == symbols.tolist()
    chunked_payload, chunk_bits = code.encode_chunks(symbols, chunk)
    np.testing.assert_array_equal(chunked_payload, payload)
    assert chunk_bits.size == -(-symbols.size // chunk)
    assert int(chunk_bits.sum()) == n_bits
    np.testing.assert_array_equal(
        chunk_bits, [int(code.lengths[symbols[i : i + chunk]].sum()) for i in range(0, symbols.size, chunk)]
    )
    decoded = code.decode_chunks(payload, chunk_bits, symbols.size, chunk)
    np.testing.assert_array_equal(decoded, symbols)


def test_two_streams_in_one_lockstep_loop():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 5, 1000) ** 2  # alphabet 17, skewed
    b = rng.geometric(0.3, 1000) - 1
    code_a = HuffmanCode.from_frequencies(np.bincount(a))
    code_b = HuffmanCode.from_frequencies(np.bincount(b))
    chunk = 64
    pa, bits_a = code_a.encode_chunks(a, chunk)
    pb, bits_b = code_b.encode_chunks(b, chunk)
    buffer = np.concatenate([pa, pb])
    decoded = decode_chunked_streams(
        buffer,
        [ChunkedStream(code_a, 0, bits_a), ChunkedStream(code_b, 8 * pa.size, bits_b)],
        1000,
        chunk,
    )
    np.testing.assert_array_equal(decoded[0], a)
    np.testing.assert_array_equal(decoded[1], b)


def test_decoder_rejects_an_invalid_code_word():
    code = HuffmanCode.from_lengths(np.array([1, 0, 2]))  # words 0 and 10; 11 is invalid
    payload = np.array([0b01100000], dtype=np.uint8)  # 0, then 11
    with pytest.raises(ContainerError, match="invalid code word in chunk 0"):
        code.decode_chunks(payload, np.array([3]), 2, 2)


def test_decoder_rejects_chunks_of_the_wrong_length():
    code = HuffmanCode.from_lengths(np.array([1, 2, 2]))  # complete code: 0, 10, 11
    symbols = np.array([0, 1, 2, 0, 0, 1])
    payload, chunk_bits = code.encode_chunks(symbols, 3)
    shifted = chunk_bits + np.array([1, -1])
    with pytest.raises(ContainerError, match="chunk 0 decodes in 5 bits but its chunk_bits says 6"):
        code.decode_chunks(payload, shifted, 6, 3)


def test_decoder_never_reads_outside_a_corrupt_buffer():
    code = HuffmanCode.from_lengths(np.array([15, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]))
    # Claimed chunk sizes far beyond the one-byte payload: decoding must fail cleanly.
    with pytest.raises(ContainerError):
        code.decode_chunks(np.array([0xFF], dtype=np.uint8), np.array([15 * 100, 15 * 100]), 200, 100)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=0, max_size=40))
def test_from_lengths_accepts_exactly_the_prefix_codes(lengths):
    lengths = np.array(lengths, dtype=np.int64)
    valid = bool(np.any(lengths)) and _kraft(lengths) <= 1.0
    if not valid:
        with pytest.raises(ContainerError):
            HuffmanCode.from_lengths(lengths)
        return
    code = HuffmanCode.from_lengths(lengths)
    assert _is_prefix_free(code)
    np.testing.assert_array_equal(code.lengths, lengths)
    # The decoding table maps every code word (padded with any bits) back to its symbol.
    table, bits = code.decoding_table()
    for symbol in np.flatnonzero(lengths):
        shift = bits - int(lengths[symbol])
        assert table[int(code.codes[symbol]) << shift] >> 4 == symbol
        assert table[((int(code.codes[symbol]) + 1) << shift) - 1] & 15 == lengths[symbol]


# ------------------------------------------------------------------ the two decoding strategies


@st.composite
def long_chunk_streams(draw):
    """One or two streams with few, long chunks (the case pointer doubling is for), possibly corrupted."""
    n = draw(st.integers(1, 4000))
    chunk = draw(st.integers(max(1, n // 3), n))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    parts, streams_, first_bit = [], [], 0
    for name in ("codes", "gaps")[: draw(st.integers(1, 2))]:
        alphabet = int(rng.integers(1, 40))
        weights = rng.pareto(1.0, alphabet) + 1e-3
        symbols = rng.choice(alphabet, size=n, p=weights / weights.sum())
        lengths_from = np.bincount(symbols, minlength=alphabet)
        if rng.random() < 0.3:  # an incomplete code: some bit patterns are no code word
            lengths_from = np.append(lengths_from, [1, 1])
        code = HuffmanCode.from_frequencies(lengths_from)
        payload, chunk_bits = code.encode_chunks(symbols, chunk)
        parts.append(payload)
        streams_.append(ChunkedStream(code, first_bit, chunk_bits, name))
        first_bit += 8 * payload.size
    buffer = np.concatenate(parts)
    corrupt = draw(st.booleans())
    if corrupt and buffer.size:
        flips = rng.integers(0, buffer.size, size=int(rng.integers(1, 4)))
        buffer = buffer.copy()
        buffer[flips] ^= rng.integers(1, 256, size=flips.size).astype(np.uint8)
    return buffer, streams_, n, chunk


def _decode_with(strategy: str, monkeypatch, buffer, streams_, n, chunk):
    monkeypatch.setattr(huffman, "_prefer_doubling", lambda *args: strategy == "doubling")
    try:
        return [a.tolist() for a in decode_chunked_streams(buffer, streams_, n, chunk)]
    except ContainerError as exc:
        return f"ContainerError: {exc}"


@settings(max_examples=200, deadline=None)
@given(long_chunk_streams())
def test_pointer_doubling_decodes_exactly_like_the_lockstep_loop(case):
    with pytest.MonkeyPatch.context() as monkeypatch:
        by_doubling = _decode_with("doubling", monkeypatch, *case)
        in_lockstep = _decode_with("lockstep", monkeypatch, *case)
    assert by_doubling == in_lockstep


def test_few_long_chunks_take_pointer_doubling_and_many_short_ones_the_loop(monkeypatch):
    rng = np.random.default_rng(0)
    symbols = rng.integers(0, 32, 200_000)
    code = HuffmanCode.from_frequencies(np.bincount(symbols))
    calls = []
    real = huffman._decode_by_doubling
    monkeypatch.setattr(huffman, "_decode_by_doubling", lambda *a: calls.append(1) or real(*a))
    for chunk, doubled in ((200_000, True), (1024, False)):
        calls.clear()
        payload, chunk_bits = code.encode_chunks(symbols, chunk)
        np.testing.assert_array_equal(code.decode_chunks(payload, chunk_bits, symbols.size, chunk), symbols)
        assert bool(calls) == doubled, chunk
