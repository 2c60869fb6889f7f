"""Tests of onnx_dc.codec.pruning: magnitude, std-rule and score pruning masks."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnx_dc.errors import InvalidTensorError, SettingsError
from onnx_dc.codec.pruning import prune_by_magnitude, prune_by_score, prune_by_std, removed_count


def _reference_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Independent statement of the rule: stable sort by score, remove the first round_half_up(s*n)."""
    flat = scores.reshape(-1)
    n_remove = math.floor(sparsity * flat.size + 0.5)
    order = np.argsort(flat, kind="stable")  # ties keep row-major order
    keep = np.ones(flat.size, dtype=bool)
    keep[order[:n_remove]] = False
    return keep.reshape(scores.shape)


# --- prune_by_magnitude / prune_by_score -------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    weights=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.float16]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
        elements=st.floats(-4, 4, width=16),  # few distinct values: many exact ties
    ),
    sparsity=st.floats(0.0, 1.0),
)
def test_magnitude_matches_stable_sort_reference(weights, sparsity):
    mask = prune_by_magnitude(weights, sparsity)
    assert mask.dtype == bool and mask.shape == weights.shape
    np.testing.assert_array_equal(mask, _reference_mask(np.abs(weights.astype(np.float64)), sparsity))
    assert np.count_nonzero(~mask) == removed_count(weights.size, sparsity)
    if mask.any() and (~mask).any():
        # Every kept weight is at least as large as every removed one.
        assert np.abs(weights[mask]).min() >= np.abs(weights[~mask]).max()


@settings(max_examples=100, deadline=None)
@given(
    scores=hnp.arrays(np.float64, st.integers(0, 50), elements=st.integers(-3, 3).map(float)),
    sparsity=st.floats(0.0, 1.0),
)
def test_score_removes_lowest_scores_first_in_row_major_order(scores, sparsity):
    mask = prune_by_score(scores, sparsity)
    np.testing.assert_array_equal(mask, _reference_mask(scores, sparsity))


def test_exact_count_uses_round_half_up():
    assert removed_count(10, 0.25) == 3  # 2.5 rounds up
    assert removed_count(2, 0.75) == 2  # 1.5 rounds up (not to even)
    assert removed_count(10, 0.24) == 2
    assert removed_count(4, 0.125) == 1  # 0.5 rounds up
    assert removed_count(3, 1.0) == 3
    assert removed_count(0, 0.7) == 0
    assert np.count_nonzero(~prune_by_magnitude(np.arange(1.0, 11.0), 0.25)) == 3


def test_ties_at_threshold_are_removed_in_row_major_order():
    weights = np.array([[0.5, -1.0, 1.0], [1.0, -0.1, 2.0]], dtype=np.float32)
    # Remove 3: -0.1 and 0.5 are below the tie value 1.0; one of the three |w| = 1.0 goes,
    # the first in row-major order, i.e. position (0, 1).
    mask = prune_by_magnitude(weights, 0.5)
    np.testing.assert_array_equal(mask, [[False, False, True], [True, False, True]])


def test_negative_zero_has_zero_magnitude():
    weights = np.array([3.0, -0.0, 1.0, 0.0, -2.0])
    np.testing.assert_array_equal(prune_by_magnitude(weights, 0.4), [True, False, True, False, True])


def test_all_zero_tensor_prunes_first_elements():
    mask = prune_by_magnitude(np.zeros((2, 3), dtype=np.float16), 0.5)
    np.testing.assert_array_equal(mask, [[False, False, False], [True, True, True]])


def test_sparsity_zero_and_one():
    weights = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    assert prune_by_magnitude(weights, 0.0).all()
    assert not prune_by_magnitude(weights, 1.0).any()
    assert prune_by_magnitude(weights, 1).shape == (5, 7)


def test_empty_and_scalar_tensors():
    empty = np.zeros((0, 4), dtype=np.float32)
    for sparsity in (0.0, 0.5, 1.0):
        assert prune_by_magnitude(empty, sparsity).shape == (0, 4)
    assert prune_by_std(empty, 1.0).shape == (0, 4)
    scalar = np.array(-3.0, dtype=np.float32)
    assert prune_by_magnitude(scalar, 0.4).shape == ()
    assert bool(prune_by_magnitude(scalar, 0.4)) is True  # round(0.4) = 0 removed
    assert bool(prune_by_magnitude(scalar, 0.5)) is False  # round(0.5) = 1 removed


def test_bfloat16_and_integer_weights():
    values = np.array([0.25, -3.0, 1.5, -0.5], dtype=np.float32)
    np.testing.assert_array_equal(
        prune_by_magnitude(values.astype(ml_dtypes.bfloat16), 0.5), [False, True, True, False]
    )
    np.testing.assert_array_equal(
        prune_by_magnitude(np.array([-128, 5, 127, -1], dtype=np.int8), 0.5), [True, False, True, False]
    )


def test_magnitude_pruning_of_a_large_tensor_matches_reference():
    weights = np.random.default_rng(1).standard_normal(200_000).astype(np.float16)  # many ties
    mask = prune_by_magnitude(weights, 0.9)
    np.testing.assert_array_equal(mask, _reference_mask(np.abs(weights.astype(np.float64)), 0.9))


# --- prune_by_std ---------------------------------------------------------------------------


def test_std_rule_removes_below_quality_times_std():
    weights = np.random.default_rng(2).standard_normal((30, 40)).astype(np.float32)
    quality = 0.7
    threshold = quality * np.std(weights.astype(np.float64))
    mask = prune_by_std(weights, quality)
    np.testing.assert_array_equal(mask, np.abs(weights) >= threshold)
    # Roughly the Gaussian fraction below 0.7 sigma (0.516), a sanity check of the std used.
    assert 0.45 < np.mean(~mask) < 0.58


def test_std_rule_comparison_is_strict():
    # std([2, -2, 2, -2]) = 2 exactly: with quality 1 the threshold equals |w|, nothing is below it.
    np.testing.assert_array_equal(prune_by_std(np.array([2.0, -2.0, 2.0, -2.0]), 1.0), [True] * 4)
    weights = np.array([-1.0, 1.0, -1.0, 1.0, 0.0])  # std = sqrt(0.8) ~ 0.894
    np.testing.assert_array_equal(prune_by_std(weights, 1.0), [True, True, True, True, False])
    np.testing.assert_array_equal(prune_by_std(weights, 1.2), [False] * 5)  # threshold 1.07


def test_std_rule_zero_quality_and_constant_tensors():
    weights = np.random.default_rng(3).standard_normal(100)
    assert prune_by_std(weights, 0.0).all()
    assert prune_by_std(np.zeros((3, 3)), 2.0).all()  # std 0: nothing below a threshold of 0
    assert prune_by_std(np.full(5, -7.0), 2.0).all()


def test_std_rule_handles_huge_float64_values():
    weights = np.array([1e300, -1e300, 1e299, 0.0])
    mask = prune_by_std(weights, 0.5)  # np.std would overflow to inf here and keep nothing
    np.testing.assert_array_equal(mask, [True, True, False, False])


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_weights_are_rejected(bad):
    weights = np.array([1.0, bad, 2.0], dtype=np.float32)
    for call in (
        lambda: prune_by_magnitude(weights, 0.5),
        lambda: prune_by_std(weights, 1.0),
        lambda: prune_by_score(weights, 0.5),
    ):
        with pytest.raises(InvalidTensorError, match="NaN or Inf"):
            call()


@pytest.mark.parametrize("sparsity", [-0.1, 1.5, np.nan, "0.5", None, True])
def test_bad_sparsity_is_rejected(sparsity):
    with pytest.raises(SettingsError, match="sparsity"):
        prune_by_magnitude(np.ones(4), sparsity)


@pytest.mark.parametrize("quality", [-1.0, np.inf, np.nan, "1"])
def test_bad_quality_is_rejected(quality):
    with pytest.raises(SettingsError, match="quality"):
        prune_by_std(np.ones(4), quality)


def test_non_real_weights_are_rejected():
    with pytest.raises(InvalidTensorError, match="real numbers"):
        prune_by_magnitude(np.array([1 + 2j, 3]), 0.5)
    with pytest.raises(InvalidTensorError, match="real numbers"):
        prune_by_std(np.array(["a", "b"]), 0.5)
