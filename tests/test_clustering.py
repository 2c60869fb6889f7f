"""Tests of onnx_dc.codec.clustering: exact 1-D Lloyd k-means, scikit-learn as the reference."""

from __future__ import annotations

import math
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from sklearn.cluster import KMeans

from onnx_dc.codec.clustering import INIT_METHODS, assign_to_centroids, initial_centroids, kmeans_1d
from onnx_dc.errors import InvalidTensorError, SettingsError


def _sklearn(values: np.ndarray, init: np.ndarray, *, max_iter: int = 300, tol: float = 1e-4) -> KMeans:
    model = KMeans(
        n_clusters=init.size, init=init.reshape(-1, 1), n_init=1, algorithm="lloyd", max_iter=max_iter, tol=tol
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(np.asarray(values, dtype=np.float64).reshape(-1, 1))


def _continuous_data(rng: np.random.Generator, family: str, n: int) -> np.ndarray:
    """Tie-free data (values drawn from continuous distributions)."""
    if family == "normal":
        return rng.normal(0.0, 0.05, n)
    if family == "uniform":
        return rng.uniform(-1.0, 3.0, n)
    if family == "laplace":
        return rng.laplace(0.0, 1.0, n)
    if family == "pruned":  # survivors of magnitude pruning: a gap around zero
        values = rng.normal(0.0, 1.0, 4 * n)
        return values[np.argsort(np.abs(values))[-n:]]
    if family == "mixture":
        third = n // 3
        return np.concatenate([rng.normal(-5, 0.1, third), rng.normal(0, 1, n - 2 * third), rng.normal(7, 0.5, third)])
    raise AssertionError(family)


def _check_is_lloyd_fixed_point(values: np.ndarray, result) -> None:
    """Labels are nearest centroids, centroids are the members' means, counts and inertia agree."""
    c = result.centroids
    assert np.all(np.diff(c) > 0)
    assert result.counts.min() >= 1 and result.counts.sum() == values.size
    np.testing.assert_array_equal(np.bincount(result.labels, minlength=c.size), result.counts)
    distances = (values[:, None] - c[None, :]) ** 2
    own = distances[np.arange(values.size), result.labels]
    assert np.all(own <= distances.min(axis=1) * (1 + 1e-12) + 1e-300)
    means = np.bincount(result.labels, weights=values, minlength=c.size) / result.counts
    scale = np.abs(values).max()
    np.testing.assert_allclose(c, means, rtol=0, atol=1e-12 * scale)
    direct = float(np.sum((values - c[result.labels]) ** 2))
    assert result.inertia == pytest.approx(direct, rel=1e-10, abs=1e-300)


# --- scikit-learn as the reference ---------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    family=st.sampled_from(["normal", "uniform", "laplace", "pruned", "mixture"]),
    bits=st.integers(0, 5),
    extra=st.integers(1, 300),
    init=st.sampled_from(INIT_METHODS),
)
def test_same_or_lower_inertia_than_sklearn_from_the_same_start(seed, family, bits, extra, init):
    rng = np.random.default_rng(seed)
    k = 2**bits
    values = _continuous_data(rng, family, k + extra)
    start = initial_centroids(values, k, init, seed=seed % 1000)
    ours = kmeans_1d(values, k, init=start)
    reference = _sklearn(values, start)
    if ours.converged:
        _check_is_lloyd_fixed_point(values, ours)
    if ours.n_reseeded == 0:
        # Plain Lloyd from the same start, tie-free data: the same iterations as scikit-learn,
        # which may stop earlier on its tolerance. So never worse.
        event("plain Lloyd")
        assert ours.inertia <= reference.inertia_ * (1 + 1e-9) + 1e-12 * np.abs(values).max() ** 2
    else:
        event("empty clusters re-seeded")


@pytest.mark.parametrize(
    ("family", "n", "k", "init"),
    [
        ("normal", 20_000, 16, "density"),
        ("laplace", 5_000, 32, "kmeans++"),
        ("uniform", 3_000, 4, "linear"),
        ("mixture", 10_000, 8, "random"),
        ("normal", 50_000, 32, "linear"),
    ],
)
def test_fixed_cases_match_or_beat_sklearn(family, n, k, init):
    values = _continuous_data(np.random.default_rng(n + k), family, n)
    start = initial_centroids(values, k, init, seed=7)
    ours = kmeans_1d(values, k, init=start, max_iter=10_000)
    reference = _sklearn(values, start)
    assert ours.converged
    assert ours.inertia <= reference.inertia_ * (1 + 1e-9)
    _check_is_lloyd_fixed_point(values, ours)


def test_realistic_pruned_float32_weights_beat_sklearn():
    # What weight sharing sees: float32 survivors of 90 % pruning, linear init, 5 bits.
    weights = np.random.default_rng(11).normal(0, 0.05, 200_000).astype(np.float32)
    survivors = weights[np.abs(weights) >= np.quantile(np.abs(weights), 0.9)]
    start = initial_centroids(survivors, 32, "linear")
    ours = kmeans_1d(survivors, 32, init=start)
    reference = _sklearn(survivors, start)
    assert ours.n_reseeded > 0  # linear init puts centroids in the pruned gap
    assert ours.inertia <= reference.inertia_


@pytest.mark.parametrize("max_iter", [1, 2, 3, 8])
def test_iterations_are_exactly_sklearns_lloyd_iterations(max_iter):
    values = _continuous_data(np.random.default_rng(5), "laplace", 2_000)
    start = initial_centroids(values, 8, "density")
    ours = kmeans_1d(values, 8, init=start, max_iter=max_iter)
    reference = _sklearn(values, start, max_iter=max_iter, tol=0.0)
    assert ours.n_reseeded == 0 and ours.n_iter == reference.n_iter_ == max_iter
    np.testing.assert_allclose(ours.centroids, np.sort(reference.cluster_centers_.ravel()), rtol=0, atol=1e-12)
    order = np.argsort(np.argsort(reference.cluster_centers_.ravel()))  # sklearn label -> sorted index
    np.testing.assert_array_equal(ours.labels, order[reference.labels_])
    assert ours.inertia == pytest.approx(reference.inertia_, rel=1e-10)


def test_empty_cluster_reseeding_is_no_worse_than_sklearn_on_average():
    # With empty clusters both implementations apply an arbitrary rule and may reach different
    # local optima; over many such problems ours is better on average (geometric mean ratio).
    rng = np.random.default_rng(2024)
    ratios = []
    while len(ratios) < 40:
        family = rng.choice(["normal", "pruned", "mixture"])
        k = int(rng.choice([8, 16, 32]))
        values = _continuous_data(rng, family, int(rng.integers(k + 5, 300)))
        start = rng.choice(values, k)  # duplicates and far-apart picks leave clusters empty
        ours = kmeans_1d(values, k, init=start)
        if ours.n_reseeded == 0:
            continue
        _check_is_lloyd_fixed_point(values, ours)
        ratios.append(ours.inertia / _sklearn(values, start).inertia_)
    assert math.exp(np.mean(np.log(ratios))) < 1.0


# --- the algorithm's own guarantees --------------------------------------------------------


def test_converged_result_is_a_fixed_point_and_labels_follow_input_order():
    values = _continuous_data(np.random.default_rng(3), "mixture", 30_021).reshape(3, 10_007)
    result = kmeans_1d(values, 16, init="kmeans++", max_iter=10_000, seed=3)
    assert result.converged and result.labels.shape == (values.size,) and result.labels.dtype == np.int16
    _check_is_lloyd_fixed_point(values.reshape(-1), result)
    np.testing.assert_array_equal(assign_to_centroids(values, result.centroids).reshape(-1), result.labels)


def test_max_iter_stops_early_without_convergence():
    values = _continuous_data(np.random.default_rng(4), "normal", 50_000)
    result = kmeans_1d(values, 32, max_iter=2)
    assert result.n_iter == 2 and not result.converged
    longer = kmeans_1d(values, 32, max_iter=5_000)
    assert longer.converged and longer.inertia <= result.inertia


def test_named_init_equals_explicit_initial_centroids():
    values = _continuous_data(np.random.default_rng(6), "laplace", 5_000).astype(np.float32)
    for init in INIT_METHODS:
        named = kmeans_1d(values, 8, init=init, seed=4)
        explicit = kmeans_1d(values, 8, init=initial_centroids(values, 8, init, seed=4))
        np.testing.assert_allclose(named.centroids, explicit.centroids, rtol=1e-12, atol=1e-15)
        assert named.inertia == pytest.approx(explicit.inertia, rel=1e-9)


def test_fewer_distinct_values_than_clusters_is_exact():
    values = np.array([2.0, 1.0, 2.0, 5.0, 2.0, 1.0])
    result = kmeans_1d(values, 4)
    np.testing.assert_array_equal(result.centroids, [1.0, 2.0, 5.0])
    np.testing.assert_array_equal(result.labels, [1, 0, 1, 2, 1, 0])
    np.testing.assert_array_equal(result.counts, [2, 3, 1])
    assert result.inertia == 0.0 and result.n_iter == 0 and result.converged
    exact = kmeans_1d(np.array([0.1, 0.7, 0.3]), 3)
    np.testing.assert_array_equal(exact.centroids, [0.1, 0.3, 0.7])  # the values themselves, unrounded


def test_duplicates_and_constant_data():
    constant = kmeans_1d(np.full(1000, -0.25, dtype=np.float32), 32)
    np.testing.assert_array_equal(constant.centroids, [-0.25])
    assert constant.inertia == 0.0
    values = np.repeat([0.0, 1.0, 2.0, 3.0, 10.0], [500, 1, 1, 1, 500])
    result = kmeans_1d(values, 2)
    np.testing.assert_array_equal(result.counts, [503, 500])
    # Equal values always share a cluster.
    for v in np.unique(values):
        assert np.unique(result.labels[values == v]).size == 1


def test_one_cluster_is_the_mean():
    values = np.random.default_rng(8).standard_normal(1000)
    result = kmeans_1d(values, 1)
    assert result.centroids[0] == pytest.approx(values.mean(), abs=1e-12)
    assert result.inertia == pytest.approx(np.sum((values - values.mean()) ** 2), rel=1e-12)


def test_duplicate_initial_centroids_are_reseeded():
    values = _continuous_data(np.random.default_rng(9), "normal", 1_000)
    result = kmeans_1d(values, 4, init=np.array([0.0, 0.0, 0.0, 0.01]))
    assert result.n_reseeded >= 2 and result.n_clusters == 4
    _check_is_lloyd_fixed_point(values, result)


def test_empty_input():
    result = kmeans_1d(np.zeros((0, 3), dtype=np.float32), 8)
    assert result.centroids.size == 0 and result.labels.size == 0 and result.inertia == 0.0
    assert result.n_iter == 0


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ml_dtypes.bfloat16, np.int32])
def test_input_dtypes(dtype):
    values = np.random.default_rng(10).normal(0, 20, 2_000).astype(dtype)
    result = kmeans_1d(values, 8, init="density")
    assert result.centroids.dtype == np.float64
    _check_is_lloyd_fixed_point(values.astype(np.float64), result)


def test_extreme_float64_magnitudes_do_not_overflow():
    rng = np.random.default_rng(12)
    for scale in (1e300, 1e-310):
        values = rng.standard_normal(5_000) * scale
        result = kmeans_1d(values, 4, init="density")
        assert np.all(np.isfinite(result.centroids)) and np.all(np.diff(result.centroids) > 0)
        unit = kmeans_1d(values / scale, 4, init="density")
        np.testing.assert_allclose(result.centroids / scale, unit.centroids, rtol=1e-6)
        # The inertia itself (~1e600 or ~1e-616) is beyond float64: it overflows or underflows.
        assert result.inertia == (math.inf if scale > 1 else 0.0)


# --- initialisations -------------------------------------------------------------------------


def test_linear_and_density_initialisations():
    values = np.random.default_rng(13).exponential(1.0, 10_001)
    linear = initial_centroids(values, 5, "linear")
    assert linear[0] == values.min() and linear[-1] == values.max()
    np.testing.assert_allclose(linear, np.linspace(values.min(), values.max(), 5), rtol=0, atol=1e-14)
    np.testing.assert_allclose(
        initial_centroids(values, 5, "density"),
        np.quantile(values, (np.arange(5) + 0.5) / 5),
        rtol=0,
        atol=1e-14,
    )


def test_random_initialisation_is_seeded_forgy():
    values = np.random.default_rng(14).standard_normal(500)
    a = initial_centroids(values, 16, "random", seed=1)
    assert np.array_equal(a, initial_centroids(values, 16, "random", seed=1))
    assert not np.array_equal(a, initial_centroids(values, 16, "random", seed=2))
    assert np.unique(a).size == 16 and np.all(np.isin(a, values))
    assert initial_centroids(values[:3], 5, "random").size == 5  # fewer values than k: with replacement


def test_kmeans_plus_plus_is_seeded_and_spreads_out():
    rng = np.random.default_rng(15)
    values = np.concatenate([rng.normal(c, 0.01, 300) for c in (-10.0, 0.0, 3.0, 50.0)])
    a = initial_centroids(values, 4, "kmeans++", seed=5)
    assert np.array_equal(a, initial_centroids(values, 4, "kmeans++", seed=5))
    assert np.all(np.isin(a, values))
    # D^2 sampling picks one point near each of the four well separated groups.
    np.testing.assert_allclose(a, [-10.0, 0.0, 3.0, 50.0], atol=0.1)
    few = initial_centroids(np.array([1.0, 1.0, 2.0]), 4, "kmeans++")
    assert few.size == 4 and set(few) <= {1.0, 2.0}


# --- assign_to_centroids ---------------------------------------------------------------------


def test_assign_matches_brute_force_for_unsorted_centroids():
    rng = np.random.default_rng(16)
    values = rng.standard_normal((40, 50)).astype(np.float32)
    centroids = rng.standard_normal(13)
    labels = assign_to_centroids(values, centroids)
    assert labels.shape == values.shape and labels.dtype == np.int16
    brute = np.argmin((values.astype(np.float64)[..., None] - centroids) ** 2, axis=-1)
    np.testing.assert_array_equal(labels, brute)


def test_assign_tie_rules():
    # 1.0 is halfway between 0.0 and 2.0: the smaller centroid wins. Equal centroids: the first.
    np.testing.assert_array_equal(assign_to_centroids(np.array([1.0, 3.0]), np.array([2.0, 0.0])), [1, 0])
    np.testing.assert_array_equal(
        assign_to_centroids(np.array([0.9, 1.0, 1.2, 5.0]), np.array([4.0, 1.0, 1.0])), [1, 1, 1, 0]
    )


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_rejected(bad):
    with pytest.raises(InvalidTensorError, match="NaN or Inf"):
        kmeans_1d(np.array([1.0, bad]), 2)
    with pytest.raises(InvalidTensorError, match="NaN or Inf"):
        assign_to_centroids(np.array([1.0, bad]), np.array([0.0]))
    with pytest.raises(InvalidTensorError, match="NaN or Inf"):
        assign_to_centroids(np.array([1.0]), np.array([0.0, bad]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_clusters": 0}, "n_clusters"),
        ({"n_clusters": 40_000}, "n_clusters"),
        ({"n_clusters": 2.0}, "n_clusters"),
        ({"n_clusters": 4, "init": "forgy"}, "init"),
        ({"n_clusters": 4, "init": np.zeros(3)}, "init"),
        ({"n_clusters": 2, "init": np.array([0.0, np.nan])}, "init"),
        ({"n_clusters": 4, "max_iter": 0}, "max_iter"),
        ({"n_clusters": 4, "seed": -1}, "seed"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(SettingsError, match=message):
        kmeans_1d(np.arange(10.0), **kwargs)


def test_other_bad_input():
    with pytest.raises(InvalidTensorError, match="real numbers"):
        kmeans_1d(np.array(["a"]), 2)
    with pytest.raises(InvalidTensorError, match="empty"):
        initial_centroids(np.zeros(0), 2)
    with pytest.raises(SettingsError, match="init"):
        initial_centroids(np.ones(3), 2, "forgy")
    with pytest.raises(SettingsError, match="centroids"):
        assign_to_centroids(np.ones(3), np.zeros(0))
