"""Size accounting and the weight-sharing rate (onnx_dc/codec/accounting.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_dc.codec.accounting import container_size_breakdown, shannon_entropy_bits, weight_sharing_rate
from onnx_dc.codec.container import encode_container
from onnx_dc.codec.container_reader import read_container_info
from onnx_dc.errors import SettingsError
from onnx_dc.codec.relative_indices import count_fillers


def test_paper_weight_sharing_examples():
    assert weight_sharing_rate(16, 32, 4) == pytest.approx(3.2)
    assert weight_sharing_rate(8, 32, 2) == pytest.approx(256 / 72)
    assert round(weight_sharing_rate(8, 32, 2), 2) == 3.56


def test_weight_sharing_rate_formula_and_errors():
    n, b, k = 1000, 32, 32
    assert weight_sharing_rate(n, b, k) == pytest.approx(n * b / (n * math.log2(k) + k * b))
    assert weight_sharing_rate(5, 16, 1) == pytest.approx(5.0)  # one cluster: indices cost nothing
    for args in ((0, 32, 4), (16, 0, 4), (16, 32, 0)):
        with pytest.raises(SettingsError):
            weight_sharing_rate(*args)


def test_shannon_entropy():
    assert shannon_entropy_bits(np.array([5, 5, 5, 5])) == pytest.approx(20 * 2.0)
    assert shannon_entropy_bits(np.array([7, 0, 0])) == 0.0
    assert shannon_entropy_bits(np.array([], dtype=np.int64)) == 0.0
    assert shannon_entropy_bits(np.array([1, 3])) == pytest.approx(-(math.log2(0.25) + 3 * math.log2(0.75)))


@settings(max_examples=60, deadline=None)
@given(
    st.floats(0.0, 1.0),
    st.integers(1, 8),
    st.integers(1, 16),
    st.sampled_from(["auto", "sparse", "dense"]),
    st.integers(0, 2**32 - 1),
)
def test_breakdown_parts_add_up(density, bits, index_bits, layout, seed):
    rng = np.random.default_rng(seed)
    k = 1 << bits
    codes = np.where(rng.random((30, 40)) < density, rng.integers(0, k, (30, 40)), -1).astype(np.int16)
    codebook = np.linspace(-1, 1, k).astype(np.float32)
    data = encode_container(codes, codebook, bits=bits, index_bits=index_bits, layout=layout, chunk_symbols=100)
    breakdown = container_size_breakdown(data)
    info = read_container_info(data)
    assert sum(breakdown.parts.values()) == breakdown.total_bytes == len(data)
    assert breakdown.layout == info.layout and breakdown.n_entries == info.entries
    assert breakdown.n_kept == int((codes >= 0).sum())
    positions = np.flatnonzero(codes.reshape(-1) >= 0)
    assert breakdown.n_fillers == (count_fillers(positions, index_bits) if info.layout == "sparse" else 0)
    assert 0 <= breakdown.filler_bytes <= breakdown.code_payload_bytes + breakdown.gap_payload_bytes
    for stream in (breakdown.code_stream, breakdown.gap_stream):
        if stream is not None:
            assert stream.entropy_bits <= stream.bits_used + 1e-6  # no prefix code beats the entropy
    assert "entropy bound" in breakdown.format_table()


def test_filler_bytes_for_raw_streams():
    codes = np.full(100, -1, dtype=np.int16)
    codes[[0, 99]] = 0
    data = encode_container(codes, np.array([1.0], dtype=np.float32), bits=1, index_bits=2, layout="sparse")
    breakdown = container_size_breakdown(data)
    info = read_container_info(data)
    assert breakdown.n_fillers == (99 - 1) >> 2
    if info.code_stream.mode == "raw" and info.gap_stream.mode == "raw":
        assert breakdown.filler_bytes == breakdown.n_fillers * (1 + 2) / 8


def _quantize_inline(weights: np.ndarray, keep_fraction: float, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude pruning + 1-D k-means (linear init, Lloyd iterations): stands in for the pipeline modules."""
    threshold = np.quantile(np.abs(weights), 1 - keep_fraction)
    keep = np.abs(weights) > threshold
    kept = weights[keep].astype(np.float64)
    k = 1 << bits
    centroids = np.linspace(kept.min(), kept.max(), k)
    for _ in range(30):
        assignment = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, kept)
        counts = np.bincount(assignment, minlength=k)
        sums = np.bincount(assignment, weights=kept, minlength=k)
        centroids = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centroids))
    codes = np.full(weights.shape, -1, dtype=np.int16)
    codes[keep] = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, kept)
    return codes, centroids.astype(np.float32)


@pytest.mark.parametrize("index_bits", [4, 5, 8])
def test_lenet_like_layer_is_within_three_percent_of_entropy(index_bits, capsys):
    """Issue 2 acceptance: 300x784 Gaussian, 8 % kept, 5-bit codes: container <= 1.03 x entropy bound."""
    weights = np.random.default_rng(0).standard_normal((300, 784)).astype(np.float32)
    codes, codebook = _quantize_inline(weights, 0.08, 5)
    data = encode_container(codes, codebook, bits=5, index_bits=index_bits)
    breakdown = container_size_breakdown(data)
    with capsys.disabled():
        print(f"\n300x784 Gaussian, 8 % kept, 5-bit codes, index_bits {index_bits}")
        print(breakdown.format_table())
    assert breakdown.layout == "sparse"
    assert breakdown.n_kept == int(round(0.08 * weights.size))
    assert breakdown.total_bytes <= 1.03 * breakdown.entropy_bound_bytes
    assert breakdown.overhead_vs_entropy > 0
