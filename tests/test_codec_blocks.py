"""The blockwise float32 pipeline gives exactly the whole-array pipeline's results.

onnx_dc.codec.tensor compresses float32/float16/bfloat16 tensors with
magnitude_keep_mask (radix select), kmeans_centroids_of_sorted32 (CompactSorted),
NearestValue (table) and encode_symbols (two passes in blocks); every one is
checked here against its whole-array counterpart, bit for bit.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from onnx_dc.codec import bitstream, container_stream, float32_ops
from onnx_dc.codec.clustering import assign_to_centroids, kmeans_1d, kmeans_centroids_of_sorted32
from onnx_dc.codec.container import encode_container
from onnx_dc.codec.container_stream import encode_symbols
from onnx_dc.codec.float32_ops import NearestValue, magnitude_keep_mask
from onnx_dc.codec.pruning import prune_by_magnitude, prune_by_std
from onnx_dc.codec.sorted_values import CompactSorted, pairwise_sum
from onnx_dc.codec.tensor import (
    TensorSettings,
    codebook_in_dtype,
    compress_tensor,
    compressed_tensor_from_codes,
    encode_tensor,
)


def _values(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        return (rng.standard_normal(n) * 0.02).astype(np.float32)
    if kind == "integers":  # many exact ties
        return rng.integers(-40, 40, n).astype(np.float32)
    if kind == "few":  # fewer distinct values than clusters, signed zeros
        return rng.choice(np.array([0.5, -1.0, 2.0, 0.0, -0.0], np.float32), n)
    return rng.standard_t(1.5, n).astype(np.float32)  # heavy tails: empty clusters get re-seeded


@pytest.mark.parametrize("kind", ["normal", "integers", "few", "heavy"])
@pytest.mark.parametrize("n", [1, 2, 33, 1025, 70_001, 1_100_000])
def test_compact_kmeans_equals_kmeans_1d(kind: str, n: int) -> None:
    rng = np.random.default_rng(n)
    values = _values(kind, n, rng)
    for bits, init in [(5, "linear"), (2, "density"), (8, "random"), (1, "linear")]:
        expected = kmeans_1d(values, 2**bits, init=init, seed=3).centroids
        got = kmeans_centroids_of_sorted32(np.sort(values), 2**bits, init=init, seed=3)
        np.testing.assert_array_equal(got, expected)


def test_compact_sorted_answers_like_the_arrays() -> None:
    rng = np.random.default_rng(1)
    values = np.sort(_values("heavy", 300_001, rng))
    xs = values.astype(np.float64)
    mean = float(np.mean(xs))
    assert pairwise_sum(values) == float(np.add.reduce(xs))
    xs -= mean
    prefix = np.concatenate([[0.0], np.cumsum(xs)])
    compact = CompactSorted(values)
    index = rng.integers(0, values.size + 1, 500)
    np.testing.assert_array_equal(compact.prefix(index), prefix[index])
    probes = np.concatenate([xs[rng.integers(0, xs.size, 200)], rng.standard_normal(50) * 3])
    for side in ("left", "right"):
        np.testing.assert_array_equal(compact.searchsorted(probes, side), np.searchsorted(xs, probes, side=side))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.97, 1.0])
def test_radix_select_mask_equals_prune_by_magnitude(sparsity: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(float32_ops, "BLOCK", 4096)  # several blocks, ties across blocks
    rng = np.random.default_rng(2)
    for values in (_values("normal", 50_000, rng), _values("integers", 50_000, rng), np.zeros(10_000, np.float32)):
        np.testing.assert_array_equal(magnitude_keep_mask(values, sparsity), prune_by_magnitude(values, sparsity))


def test_nearest_value_equals_assign_to_centroids() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([_values("heavy", 100_000, rng), np.array([0.0, -0.0, 1e-45, -1e-45], np.float32)])
    for k in (1, 2, 31, 256, 300):
        candidates = np.unique(rng.standard_normal(k).astype(np.float32).astype(np.float64))
        candidates = np.unique(np.concatenate([candidates, values[:3].astype(np.float64)]))  # midpoints on values
        expected = assign_to_centroids(values, candidates)
        np.testing.assert_array_equal(NearestValue(candidates).codes(values), expected)


@pytest.mark.parametrize("block", [64, 1 << 20])
def test_encode_symbols_equals_encode_container(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(container_stream, "BLOCK", block)
    rng = np.random.default_rng(4)
    for trial in range(24):
        shape = [(7,), (33, 65), (1000, 37), (3, 5, 7), (0,), (300, 300)][trial % 6]
        codebook = np.unique(rng.standard_normal(int(rng.integers(1, 257))).astype(np.float32))
        n = int(np.prod(shape))
        codes = rng.integers(0, codebook.size, n)
        codes[rng.random(n) < [0.0, 0.3, 0.9, 0.999][trial % 4]] = -1
        if trial % 5 == 0:
            codes[: n // 2] = -1  # a long pruned run: fillers
        bits = max(1, int(np.ceil(np.log2(codebook.size))))
        symbols = np.where(codes < 0, codebook.size, codes).astype(np.uint16 if codebook.size >= 256 else np.uint8)
        for index_bits, layout, chunk in [(1 + trial % 16, "auto", 1024), (5, "sparse", 7), (3, "dense", 64)]:
            expected = encode_container(codes.reshape(shape), codebook, bits=bits, index_bits=index_bits,
                                        layout=layout, chunk_symbols=chunk)
            got = encode_symbols(symbols, shape, codebook, bits=bits, index_bits=index_bits, layout=layout,
                                 chunk_symbols=chunk)
            assert got == expected, (shape, codebook.size, index_bits, layout, chunk)


def test_pair_packing_gives_the_same_bits() -> None:
    rng = np.random.default_rng(5)
    for trial in range(200):
        size = int(rng.integers(1, 60))
        widths = rng.integers(1, 13, size)
        widths[rng.random(size) < 0.1] = 0
        widths[0] = max(widths[0], 1)
        codes = np.array([rng.integers(0, 1 << w) if w else 0 for w in widths], dtype=np.uint64)
        symbols = rng.choice(np.flatnonzero(widths), int(rng.integers(0, 3000))).astype(np.uint16)
        chunk = [2, 4, 64, 1024][trial % 4]
        single = bitstream._pack(symbols, widths.astype(np.int64), 0, codes, chunk)
        paired = bitstream._pack_symbols(symbols, codes, widths, chunk)
        assert single[1] == paired[1]
        np.testing.assert_array_equal(single[0], paired[0])
        np.testing.assert_array_equal(single[2], paired[2])
    with pytest.raises(ValueError, match="width 0"):
        bitstream.pack_symbols(np.array([0, 1, 1], np.uint8), np.array([1, 0], np.uint64), np.array([1, 0]))


def _whole_array_pipeline(weights: np.ndarray, settings: TensorSettings):
    """compress_tensor as it was before the blockwise path: the reference."""
    if settings.sparsity is not None:
        keep = prune_by_magnitude(weights, settings.sparsity)
    elif settings.quality is not None:
        keep = prune_by_std(weights, settings.quality)
    else:
        keep = np.ones(weights.shape, bool)
    kept = weights.reshape(-1)[keep.reshape(-1)].astype(np.float64)
    clusters = kmeans_1d(kept, 2**settings.bits, init=settings.init, max_iter=settings.max_iter, seed=settings.seed)
    codebook, kept_codes = codebook_in_dtype(kept, clusters.centroids, weights.dtype)
    codes = np.full(keep.size, -1, np.int16)
    codes[keep.reshape(-1)] = kept_codes
    return compressed_tensor_from_codes(codes.reshape(weights.shape), codebook, settings)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16], ids=["float32", "float16", "bfloat16"])
def test_compress_tensor_and_encode_tensor_equal_the_whole_array_pipeline(dtype) -> None:
    rng = np.random.default_rng(6)
    settings = [
        TensorSettings(sparsity=0.3),
        TensorSettings(sparsity=0.9, bits=8, index_bits=3),
        TensorSettings(quality=0.5, bits=3),
        TensorSettings(bits=1),
        TensorSettings(sparsity=1.0),
        TensorSettings(sparsity=0.5, init="density", layout="sparse"),
        TensorSettings(sparsity=0.4, init="kmeans++", bits=4),
    ]
    for shape, values in [((300, 200), rng.standard_normal((300, 200)) * 0.05), ((5, 3, 3, 3), rng.integers(-3, 4, (5, 3, 3, 3))),
                          ((), np.asarray(0.5)), ((64, 64), rng.standard_t(1.5, (64, 64)))]:
        weights = np.asarray(values).astype(dtype).reshape(shape)
        for s in settings:
            expected = _whole_array_pipeline(weights, s)
            full = compress_tensor(weights, s)
            light = encode_tensor(weights, s)
            assert full.container == light.container == expected.container
            assert full.quantized.tobytes() == expected.quantized.tobytes()
            np.testing.assert_array_equal(full.codes, expected.codes)
            assert light.n_kept == expected.n_kept and light.n_weights == expected.n_weights
            np.testing.assert_array_equal(light.codes, expected.codes)


def test_encode_tensor_reads_a_read_only_memory_map(tmp_path) -> None:
    rng = np.random.default_rng(7)
    weights = (rng.standard_normal((256, 300)) * 0.1).astype(np.float32)
    path = tmp_path / "w.bin"
    weights.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=weights.shape)
    assert encode_tensor(mapped, TensorSettings(sparsity=0.6)).container == compress_tensor(
        weights, TensorSettings(sparsity=0.6)).container
