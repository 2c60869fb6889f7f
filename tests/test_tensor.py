"""Tests of onnx_dc.codec.tensor: the per-tensor pipeline (prune -> k-means -> container)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_dc.codec.clustering import initial_centroids, kmeans_1d
from onnx_dc.codec.container_reader import decode_container, decode_container_codes, read_container_info
from onnx_dc.errors import InvalidTensorError, SettingsError
from onnx_dc.codec.pruning import prune_by_magnitude, prune_by_std, removed_count
from onnx_dc.codec.tensor import CompressedTensor, TensorSettings, codebook_in_dtype, compress_tensor, compressed_tensor_from_codes

DTYPES = [np.float32, np.float16, np.float64, ml_dtypes.bfloat16]


def _bits(array: np.ndarray) -> np.ndarray:
    """The raw bit patterns (so +0.0 and -0.0 differ, and the comparison is bit for bit)."""
    return array.view(np.dtype(f"u{array.dtype.itemsize}"))


def _check_consistent(result: CompressedTensor, weights: np.ndarray) -> None:
    decoded = decode_container(result.container)
    assert decoded.dtype == weights.dtype and decoded.shape == weights.shape
    np.testing.assert_array_equal(_bits(decoded), _bits(result.quantized))
    codes, codebook = decode_container_codes(result.container)
    np.testing.assert_array_equal(codes, result.codes)
    np.testing.assert_array_equal(_bits(codebook), _bits(result.codebook))
    assert result.codes.dtype == np.int16 and result.codes.shape == weights.shape
    assert result.mask.dtype == np.bool_ and result.mask.shape == weights.shape
    np.testing.assert_array_equal(result.mask, result.codes >= 0)
    assert result.codebook.dtype == weights.dtype
    assert result.codebook.size <= 2**result.settings.bits
    assert np.all(np.diff(result.codebook.astype(np.float64)) > 0)  # strictly increasing
    if result.n_kept:
        assert np.all(np.bincount(result.codes[result.mask], minlength=result.codebook.size) > 0)  # all used
    assert np.all(_bits(result.quantized[~result.mask]) == 0)  # pruned: exactly +0.0
    # Every kept weight sits on its nearest codebook value.
    kept = weights[result.mask].astype(np.float64)
    if kept.size:
        book = result.codebook.astype(np.float64)
        error = np.abs(kept - book[result.codes[result.mask]])
        assert np.all(error <= np.abs(kept[:, None] - book[None, :]).min(axis=1))
    assert result.size_bytes == len(result.container)
    assert result.n_weights == weights.size
    assert result.original_size_bytes == weights.size * weights.dtype.itemsize


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 7), min_size=0, max_size=4).map(tuple),
    pruning=st.sampled_from(["none", "sparsity", "quality"]),
    fraction=st.floats(0.0, 1.0),
    bits=st.integers(1, 8),
    index_bits=st.integers(1, 16),
    layout=st.sampled_from(["auto", "sparse", "dense"]),
    init=st.sampled_from(["linear", "density", "random", "kmeans++"]),
    discrete=st.booleans(),
)
def test_round_trip_is_bit_exact(seed, dtype, shape, pruning, fraction, bits, index_bits, layout, init, discrete):
    rng = np.random.default_rng(seed)
    weights = rng.normal(0.0, 0.1, shape)
    if discrete:  # few distinct values: fewer than 2**bits, exact ties
        weights = np.round(weights * 20) / 20
    weights = weights.astype(dtype)
    options = {"none": {}, "sparsity": {"sparsity": fraction}, "quality": {"quality": 2 * fraction}}[pruning]
    tensor_settings = TensorSettings(
        bits=bits, index_bits=index_bits, layout=layout, init=init, seed=seed % 100, **options
    )
    result = compress_tensor(weights, tensor_settings)
    _check_consistent(result, weights)
    if pruning == "sparsity":
        np.testing.assert_array_equal(result.mask, prune_by_magnitude(weights, fraction))
    elif pruning == "quality":
        np.testing.assert_array_equal(result.mask, prune_by_std(weights, 2 * fraction))
    else:
        assert result.mask.all()
    info = read_container_info(result.container)
    assert info.shape == weights.shape and info.bits == bits


@pytest.mark.parametrize("dtype", DTYPES)
def test_fc_layer_like_tensor(dtype):
    weights = np.random.default_rng(1).normal(0, 0.05, (300, 784)).astype(dtype)
    result = compress_tensor(weights, TensorSettings(sparsity=0.92, bits=5, index_bits=5))
    _check_consistent(result, weights)
    assert result.n_kept == weights.size - removed_count(weights.size, 0.92)
    assert result.codebook.size == 32
    assert read_container_info(result.container).layout == "sparse"
    assert result.ratio > 10  # 8 % kept, ~5-bit codes and ~5-bit gaps
    # The codebook is the k-means solution rounded to the dtype.
    kept = weights[result.mask].astype(np.float64)
    reference = kmeans_1d(kept, 32)
    np.testing.assert_allclose(
        result.codebook.astype(np.float64), reference.centroids, rtol=float(ml_dtypes.finfo(dtype).eps), atol=0
    )


def test_quantized_error_matches_kmeans_inertia():
    weights = np.random.default_rng(2).normal(0, 1, 50_000)  # float64: no rounding of the codebook
    result = compress_tensor(weights, TensorSettings(bits=4, init="density"))
    reference = kmeans_1d(weights, 16, init="density")
    error = float(np.sum((result.quantized - weights) ** 2))
    assert error == pytest.approx(reference.inertia, rel=1e-9)
    assert read_container_info(result.container).layout == "dense"


def test_given_mask_replaces_pruning():
    weights = np.random.default_rng(3).normal(0, 1, (20, 30)).astype(np.float32)
    mask = np.zeros(weights.shape, dtype=bool)
    mask[::3, 1::2] = True
    result = compress_tensor(weights, TensorSettings(sparsity=0.99), mask=mask)
    np.testing.assert_array_equal(result.mask, mask)
    _check_consistent(result, weights)


def test_edge_tensors():
    s = TensorSettings(sparsity=0.5, bits=3)
    for weights in (
        np.zeros((0, 5), dtype=np.float32),  # empty
        np.array(1.5, dtype=np.float16),  # 0-d
        np.zeros((4, 4), dtype=np.float32),  # all zero
        np.full((3, 3), -2.0, dtype=ml_dtypes.bfloat16),  # constant
    ):
        result = compress_tensor(weights, s)
        _check_consistent(result, weights)
    all_pruned = compress_tensor(np.ones((8, 8), np.float32), TensorSettings(sparsity=1.0))
    assert all_pruned.n_kept == 0 and all_pruned.codebook.size == 0
    assert not np.any(_bits(decode_container(all_pruned.container)))
    zeros_kept = compress_tensor(np.array([0.0, -0.0, 0.0], np.float32), TensorSettings())
    np.testing.assert_array_equal(_bits(zeros_kept.codebook), [0])  # -0.0 stored as +0.0
    few = compress_tensor(np.array([1.0, 2.0, 1.0, 3.0], np.float32), TensorSettings(bits=8))
    np.testing.assert_array_equal(few.codebook, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(few.quantized, [1.0, 2.0, 1.0, 3.0])


def test_rounding_merges_centroids_and_reassigns():
    values = np.array([1.0, 1.0 + 2**-12, 1.0 + 2**-11, 5.0])
    codebook, codes = codebook_in_dtype(values, np.array([1.0, 1.0 + 2**-12, 1.0 + 2**-11, 5.0]), np.float16)
    # float16 near 1 has a step of 2**-10: the three small centroids round to 1.0 (ties to even).
    np.testing.assert_array_equal(codebook, np.array([1.0, 5.0], np.float16))
    np.testing.assert_array_equal(codes, [0, 0, 0, 1])
    codebook, codes = codebook_in_dtype(np.array([0.1, 0.9]), np.array([0.9, 0.5, 0.1]), np.float32)
    np.testing.assert_array_equal(codebook, np.array([0.1, 0.9], np.float32))  # 0.5 unused: dropped
    np.testing.assert_array_equal(codes, [0, 1])


def test_composable_halves_for_refitted_centroids():
    weights = np.random.default_rng(4).laplace(0, 0.1, (64, 64)).astype(np.float32)
    s = TensorSettings(sparsity=0.7, bits=4)
    mask = prune_by_magnitude(weights, s.sparsity)
    kept = weights[mask].astype(np.float64)
    centroids = initial_centroids(kept, 16, "linear") * 0.9  # e.g. centroids refitted elsewhere
    codebook, kept_codes = codebook_in_dtype(kept, centroids, weights.dtype)
    codes = np.full(weights.shape, -1, dtype=np.int16)
    codes[mask] = kept_codes
    result = compressed_tensor_from_codes(codes, codebook, s)
    _check_consistent(result, weights)
    np.testing.assert_array_equal(result.codes, codes)


def test_big_endian_weights_are_accepted():
    weights = np.random.default_rng(5).normal(0, 1, 100).astype(">f4")
    result = compress_tensor(weights, TensorSettings(bits=3))
    assert result.quantized.dtype == np.float32
    _check_consistent(result, weights.astype(np.float32))


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_weights_are_rejected(bad, dtype):
    weights = np.array([0.5, bad, -1.0], dtype=np.float64).astype(dtype)
    with pytest.raises(InvalidTensorError, match="1 NaN or Inf"):
        compress_tensor(weights, TensorSettings())


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.complex64, np.bool_, np.uint8])
def test_unsupported_dtypes_are_rejected(dtype):
    with pytest.raises(InvalidTensorError, match="unsupported tensor dtype"):
        compress_tensor(np.ones(4, dtype=dtype), TensorSettings())


def test_non_array_weights_are_rejected():
    with pytest.raises(InvalidTensorError, match="numpy array"):
        compress_tensor([1.0, 2.0], TensorSettings())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 0.5, "quality": 1.0}, "at most one"),
        ({"sparsity": 1.5}, "sparsity"),
        ({"sparsity": float("nan")}, "sparsity"),
        ({"sparsity": "0.5"}, "sparsity"),
        ({"quality": -1.0}, "quality"),
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": 5.0}, "bits"),
        ({"bits": True}, "bits"),
        ({"index_bits": 0}, "index_bits"),
        ({"index_bits": 17}, "index_bits"),
        ({"init": "forgy"}, "init"),
        ({"seed": -1}, "seed"),
        ({"layout": "csr"}, "layout"),
        ({"max_iter": 0}, "max_iter"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(SettingsError, match=message):
        TensorSettings(**kwargs)


def test_bad_mask_and_settings_type_are_rejected():
    weights = np.ones((3, 4), np.float32)
    with pytest.raises(SettingsError, match="shape"):
        compress_tensor(weights, TensorSettings(), mask=np.ones((4, 3), bool))
    with pytest.raises(SettingsError, match="bool"):
        compress_tensor(weights, TensorSettings(), mask=np.ones((3, 4), np.int8))
    with pytest.raises(SettingsError, match="TensorSettings"):
        compress_tensor(weights, {"bits": 5})


def test_codebook_in_dtype_rejects_overflowing_centroids():
    with pytest.raises(InvalidTensorError, match="not finite"):
        codebook_in_dtype(np.array([1.0]), np.array([1e6]), np.float16)
    with pytest.raises(InvalidTensorError, match="unsupported"):
        codebook_in_dtype(np.array([1.0]), np.array([1.0]), np.int16)
