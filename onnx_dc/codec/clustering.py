"""Exact 1-D k-means for weight sharing (stage 3 of Deep Compression).

The surviving weights of one tensor are grouped into ``k = 2**bits`` clusters;
each weight is then stored as the index of its cluster and the tensor keeps a
small codebook of centroids.

Why this is fast. In one dimension the clusters of a Lloyd iteration are
contiguous runs of the *sorted* values, separated by the midpoints between
consecutive sorted centroids. So the values are sorted once and their prefix
sums computed once; after that an iteration is ``searchsorted`` of the
``k - 1`` midpoints into the sorted values (``O(k log n)``) and one
subtraction of prefix sums per cluster for the new means (``O(k)``). Only the
final labelling of the ``n`` inputs is ``O(n log k)``. The iterations are the
exact Lloyd iterations (same assignments and means as the generic
algorithm, e.g. scikit-learn's ``KMeans(algorithm="lloyd")``), just computed
without visiting every point.

Conventions (all functions):

* Computation is in float64 on data centred on its mean (as scikit-learn does,
  which keeps the prefix sums accurate); float64 values beyond ``2**±500`` are
  first scaled by an exact power of two so nothing overflows.
* Centroids are returned sorted in increasing order; labels index them.
* Assignment tie rule: a value exactly halfway between two consecutive
  centroids goes to the *smaller* centroid.
* Convergence: Lloyd stops when an assignment step changes no label (strict
  convergence, no tolerance) or after ``max_iter`` iterations.
* Empty clusters: equal initial centroids are merged, and each missing or
  empty cluster is re-seeded in the update step by splitting one non-empty
  cluster in two: among all clusters and three cuts per cluster (after its
  smallest value, before its largest value, at its mean) the split that
  lowers the inertia most. The first two cuts include scikit-learn's remedy
  (the value farthest from its centroid becomes a cluster of its own). A
  split never separates equal values and never increases the inertia.
  ``KMeansResult.n_reseeded`` counts the re-seeded clusters.
* Fewer distinct values than clusters: when the data holds at most
  ``n_clusters`` distinct values, the exact optimum is one centroid per
  distinct value (inertia 0); it is returned directly, with fewer than
  ``n_clusters`` centroids and ``n_iter = 0``.
* Returned clusters are never empty: a cluster still empty when the
  iterations end is dropped, so ``len(centroids) <= n_clusters``, the
  centroids are strictly increasing and every one has at least one member.

Relation to scikit-learn: as long as no cluster is empty and no value lies
exactly on a midpoint, the iterations are those of
``KMeans(algorithm="lloyd", n_init=1, init=<same centroids>)``; scikit-learn
also stops when the centres move less than a tolerance, this module only on
strict convergence, so the final inertia is the same or lower (tested).
After an empty cluster or an exact tie the two implementations follow
different (equally arbitrary) rules and may reach different local optima.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from numbers import Integral

import numpy as np

from onnx_dc.codec.sorted_values import (
    CompactSorted,
    InMemorySorted,
    SortedValues,
    bounds_of,
    final_bounds,
    lloyd,
    midpoints,
)
from onnx_dc.errors import InvalidTensorError, SettingsError

__all__ = [
    "INIT_METHODS",
    "KMeansResult",
    "assign_to_centroids",
    "initial_centroids",
    "kmeans_1d",
    "kmeans_centroids_of_sorted32",
]

INIT_METHODS = ("linear", "density", "random", "kmeans++")
"""Names accepted by ``init``: evenly spaced from min to max (the paper's best),
CDF quantiles, Forgy (distinct random data points), greedy k-means++."""

_MAX_CLUSTERS = 2**15 - 1  # labels are int16
_LABEL_CHUNK = 1 << 20  # elements labelled per searchsorted call (bounds temporaries)
_SCALE_LIMIT_EXPONENT = 500  # values beyond 2**±500 are rescaled by a power of two


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of :func:`kmeans_1d` (scikit-learn's ``cluster_centers_``, ``labels_``, ...).

    Attributes:
        centroids: float64, shape ``(m,)``, strictly increasing, ``m <= n_clusters``.
        labels: int16, the input's flattened shape ``(n,)``; ``labels[i]`` indexes
            the centroid of value ``i`` (the nearest one; ties go to the smaller).
        counts: int64, shape ``(m,)``, members per centroid (all ``>= 1``).
        inertia: sum of squared distances of the values to their centroids.
        n_iter: Lloyd iterations run (assignment steps; 0 when the data has at most
            ``n_clusters`` distinct values and the exact solution was returned).
        converged: True if the last assignment step changed no label.
        n_reseeded: how many times an empty cluster (or a duplicate initial
            centroid) was re-seeded by a split; 0 means the iterations were
            plain Lloyd iterations, identical to scikit-learn's on tie-free data.
    """

    centroids: np.ndarray
    labels: np.ndarray
    counts: np.ndarray
    inertia: float
    n_iter: int
    converged: bool
    n_reseeded: int = 0

    @property
    def n_clusters(self) -> int:
        """Number of (non-empty) clusters returned."""
        return int(self.centroids.size)


def kmeans_1d(
    values: np.ndarray,
    n_clusters: int,
    *,
    init: str | np.ndarray = "linear",
    max_iter: int = 300,
    seed: int = 0,
) -> KMeansResult:
    """Cluster real values into at most ``n_clusters`` groups by exact 1-D Lloyd k-means.

    Args:
        values: array of any shape (flattened in row-major order) and real dtype,
            finite. Weight sharing passes the surviving weights of one tensor.
        n_clusters: k, ``1 <= k <= 32767`` (``2**bits`` for weight sharing).
        init: one of :data:`INIT_METHODS`, or an array of ``n_clusters``
            finite initial centroids (any order, duplicates allowed), e.g. from
            :func:`initial_centroids`. Ignored when the data has at most
            ``n_clusters`` distinct values.
        max_iter: maximum number of Lloyd iterations, ``>= 1``. An iteration costs
            ``O(k log n)``, so large values are cheap.
        seed: seed of the ``random`` and ``kmeans++`` initialisations.

    Returns:
        :class:`KMeansResult`. See the module docstring for the policies on ties,
        empty clusters and duplicate values.

    Raises:
        InvalidTensorError: values are not real or contain NaN/Inf.
        SettingsError: a bad ``n_clusters``, ``init``, ``max_iter`` or ``seed``.
    """
    x = _as_float64_flat(values, "values")
    n_clusters = _check_int(n_clusters, "n_clusters", 1, _MAX_CLUSTERS)
    max_iter = _check_int(max_iter, "max_iter", 1, None)
    seed = _check_int(seed, "seed", 0, None)
    explicit_init = _check_init(init, n_clusters)
    n = x.size
    if n == 0:
        return KMeansResult(
            centroids=np.empty(0),
            labels=np.empty(0, dtype=np.int16),
            counts=np.empty(0, dtype=np.int64),
            inertia=0.0,
            n_iter=0,
            converged=True,
        )

    xs = np.sort(x)
    is_new_value = np.empty(n, dtype=bool)
    is_new_value[0] = True
    np.not_equal(xs[1:], xs[:-1], out=is_new_value[1:])
    if np.count_nonzero(is_new_value) <= n_clusters:
        return _exact_few_values(x, xs[is_new_value])
    del is_new_value

    exponent, mean = _prepare_in_place(xs)
    prefix = _prefix_sums(xs)
    if explicit_init is not None:
        # Equal initial centroids count as empty clusters (re-seeded below).
        centroids = np.unique(_to_work_space(explicit_init, exponent, mean))
    else:
        centroids = np.unique(_initial_sorted(InMemorySorted(xs, prefix), n_clusters, init, seed))

    data = InMemorySorted(xs, prefix)
    centroids, n_iter, converged, n_reseeded = lloyd(data, centroids, n_clusters, max_iter)
    data.prefix_sums = None
    del prefix

    # Final assignment step with the final centroids (as scikit-learn does after
    # a non-strict stop), dropping clusters left empty.
    centroids, bounds = final_bounds(data, centroids)
    counts = np.diff(bounds)
    inertia = math.fsum(_segment_squared_errors(xs, bounds, centroids))
    del xs
    labels = _labels(x, midpoints(centroids), exponent, mean)
    return KMeansResult(
        centroids=_from_work_space(centroids, exponent, mean),
        labels=labels,
        counts=counts.astype(np.int64),
        inertia=_unscale_inertia(inertia, exponent),
        n_iter=n_iter,
        converged=converged,
        n_reseeded=n_reseeded,
    )


def kmeans_centroids_of_sorted32(
    sorted32: np.ndarray, n_clusters: int, *, init: str = "linear", max_iter: int = 300, seed: int = 0
) -> np.ndarray:
    """``kmeans_1d(values, ...).centroids`` for sorted finite float32 values, without float64 copies.

    Bit-identical to :func:`kmeans_1d` on the same values (in any order), holding
    only the sorted float32 values and a prefix sum per 1024 of them
    (:class:`onnx_dc.codec.sorted_values.CompactSorted`) instead of two float64
    arrays: 4 instead of 24 bytes per value. ``init="kmeans++"`` and explicit
    initial centroids take :func:`kmeans_1d` itself. Labels are not computed.
    """
    sorted32 = np.asarray(sorted32)
    if sorted32.dtype != np.float32 or sorted32.ndim != 1:
        raise InvalidTensorError(f"expected sorted 1-D float32 values, got {sorted32.dtype} of shape {sorted32.shape}")
    n_clusters = _check_int(n_clusters, "n_clusters", 1, _MAX_CLUSTERS)
    max_iter = _check_int(max_iter, "max_iter", 1, None)
    seed = _check_int(seed, "seed", 0, None)
    if _check_init(init, n_clusters) is not None or init == "kmeans++":
        return kmeans_1d(sorted32, n_clusters, init=init, max_iter=max_iter, seed=seed).centroids
    n = sorted32.size
    if n == 0:
        return np.empty(0)
    n_distinct = 1
    for start in range(1, n, _LABEL_CHUNK):
        stop = min(start + _LABEL_CHUNK, n)
        n_distinct += int(np.count_nonzero(sorted32[start:stop] != sorted32[start - 1 : stop - 1]))
    if n_distinct <= n_clusters:
        return np.unique(sorted32).astype(np.float64)
    data = CompactSorted(sorted32)
    centroids = np.unique(_initial_sorted(data, n_clusters, init, seed))
    centroids, _, _, _ = lloyd(data, centroids, n_clusters, max_iter)
    centroids, _ = final_bounds(data, centroids)
    return centroids + data.mean


def initial_centroids(
    values: np.ndarray, n_clusters: int, init: str = "linear", *, seed: int = 0
) -> np.ndarray:
    """The ``n_clusters`` initial centroids :func:`kmeans_1d` starts from (up to rounding), sorted.

    * ``linear``: evenly spaced from ``min(values)`` to ``max(values)`` (inclusive).
    * ``density``: quantiles of the values at probabilities ``(i + 0.5) / k``
      (linear interpolation between order statistics), i.e. evenly spaced on
      the empirical CDF.
    * ``random``: Forgy, values at ``k`` distinct random positions (with
      replacement only if there are fewer than ``k`` values).
    * ``kmeans++``: greedy k-means++ (D^2 sampling, the best of
      ``2 + floor(ln k)`` candidates per step, as in scikit-learn), computed
      in ``O(k^2 log n)`` with prefix sums.

    ``random`` and ``kmeans++`` depend on ``seed`` (numpy ``default_rng``).
    Pass the result as ``init=`` to :func:`kmeans_1d` or to scikit-learn.

    Raises:
        InvalidTensorError: values are empty, not real, or contain NaN/Inf.
        SettingsError: a bad ``n_clusters``, ``init`` or ``seed``.
    """
    x = _as_float64_flat(values, "values")
    n_clusters = _check_int(n_clusters, "n_clusters", 1, _MAX_CLUSTERS)
    seed = _check_int(seed, "seed", 0, None)
    if not isinstance(init, str) or init not in INIT_METHODS:
        raise SettingsError(f"init must be one of {', '.join(INIT_METHODS)}; got {init!r}")
    if x.size == 0:
        raise InvalidTensorError("cannot choose initial centroids for an empty array")
    xs = np.sort(x)
    work = xs.copy()
    exponent, mean = _prepare_in_place(work)
    prefix = _prefix_sums(work) if init == "kmeans++" else None
    centroids = _initial_sorted(InMemorySorted(work, prefix), n_clusters, init, seed)
    if init in ("random", "kmeans++"):
        # Data points: return the exact original values, not a shifted round trip.
        return xs[np.minimum(np.searchsorted(work, centroids), xs.size - 1)]
    centroids = _from_work_space(centroids, exponent, mean)
    if init == "linear":
        centroids[0], centroids[-1] = xs[0], xs[-1]
    return centroids


def assign_to_centroids(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for every value (the k-means assignment step).

    Args:
        values: real array of any shape, finite.
        centroids: 1-D real array of at least one finite centroid, in any order
            (e.g. refitted centroids).

    Returns:
        int16 array of ``values.shape`` (int32 for more than 32767 centroids)
        indexing ``centroids``. A value exactly halfway between two centroids
        goes to the smaller one; among equal centroids, to the first in
        ``centroids``.

    Raises:
        InvalidTensorError: values or centroids are not real or not finite.
        SettingsError: centroids is not 1-D or is empty.
    """
    x = _as_float64_flat(values, "values")
    c = np.asarray(centroids)
    if c.ndim != 1 or c.size == 0:
        raise SettingsError(f"centroids must be a non-empty 1-D array, got shape {c.shape}")
    c = _as_float64_flat(c, "centroids")
    order = np.argsort(c, kind="stable")
    sorted_c = c[order]
    # Equal centroids: keep the first of each (stable sort keeps input order).
    is_first = np.empty(c.size, dtype=bool)
    is_first[0] = True
    np.not_equal(sorted_c[1:], sorted_c[:-1], out=is_first[1:])
    index_of = order[is_first]
    mid = midpoints(sorted_c[is_first])
    index_dtype = np.int16 if c.size <= _MAX_CLUSTERS else np.int32
    labels = np.empty(x.size, dtype=index_dtype)
    for start in range(0, x.size, _LABEL_CHUNK):
        chunk = x[start : start + _LABEL_CHUNK]
        labels[start : start + chunk.size] = index_of[np.searchsorted(mid, chunk, side="left")]
    return labels.reshape(np.shape(values))


# ---------------------------------------------------------------------------
# Lloyd iteration on sorted data


def _segment_squared_errors(
    xs: np.ndarray, bounds: np.ndarray, centroids: np.ndarray
) -> list[float]:
    errors = []
    for j, centroid in enumerate(centroids):
        segment = xs[bounds[j] : bounds[j + 1]] - centroid
        # Not np.dot: BLAS threads cost more than they save here.
        np.square(segment, out=segment)
        errors.append(float(segment.sum()))
    return errors


def _labels(x: np.ndarray, mid: np.ndarray, exponent: int, mean: float) -> np.ndarray:
    """Labels in input order, transforming chunks exactly as the sorted copy was."""
    labels = np.empty(x.size, dtype=np.int16)
    for start in range(0, x.size, _LABEL_CHUNK):
        chunk = x[start : start + _LABEL_CHUNK]
        if exponent:
            chunk = np.ldexp(chunk, -exponent)
        labels[start : start + chunk.size] = np.searchsorted(mid, chunk - mean, side="left")
    return labels


def _exact_few_values(x: np.ndarray, distinct: np.ndarray) -> KMeansResult:
    """At most k distinct values: one centroid per value is the exact optimum."""
    labels = np.empty(x.size, dtype=np.int16)
    for start in range(0, x.size, _LABEL_CHUNK):
        chunk = x[start : start + _LABEL_CHUNK]
        labels[start : start + chunk.size] = np.searchsorted(distinct, chunk, side="left")
    counts = np.bincount(labels, minlength=distinct.size).astype(np.int64)
    return KMeansResult(
        centroids=distinct.copy(), labels=labels, counts=counts, inertia=0.0, n_iter=0,
        converged=True,
    )


# ---------------------------------------------------------------------------
# Work space: sorted, scaled by 2**-exponent, centred on the mean


def _prepare_in_place(xs: np.ndarray) -> tuple[int, float]:
    """Scale (exactly, by a power of two, only if extreme) and centre ``xs`` in place."""
    peak = max(abs(float(xs[0])), abs(float(xs[-1])))
    exponent = 0
    if peak > 0.0:
        peak_exponent = math.frexp(peak)[1]
        if abs(peak_exponent) > _SCALE_LIMIT_EXPONENT:
            exponent = peak_exponent
            np.ldexp(xs, -exponent, out=xs)
    mean = float(np.mean(xs))
    xs -= mean
    return exponent, mean


def _to_work_space(values: np.ndarray, exponent: int, mean: float) -> np.ndarray:
    work = np.ldexp(values, -exponent) if exponent else values.copy()
    return work - mean


def _from_work_space(values: np.ndarray, exponent: int, mean: float) -> np.ndarray:
    values = values + mean
    return np.ldexp(values, exponent) if exponent else values


def _unscale_inertia(inertia: float, exponent: int) -> float:
    try:
        return math.ldexp(inertia, 2 * exponent)
    except OverflowError:  # the true inertia exceeds float64
        return math.inf


def _prefix_sums(xs: np.ndarray) -> np.ndarray:
    prefix = np.empty(xs.size + 1)
    prefix[0] = 0.0
    np.cumsum(xs, out=prefix[1:])
    return prefix


# ---------------------------------------------------------------------------
# Initialisation on sorted work-space data


def _initial_sorted(data: SortedValues, n_clusters: int, init: str, seed: int) -> np.ndarray:
    """Initial centroids (sorted) on sorted work-space data; kmeans++ needs the in-memory form with prefix sums."""
    n = data.size
    if init == "linear":
        first, last = data.values(np.array([0, n - 1]))
        return np.linspace(first, last, n_clusters)
    if init == "density":
        positions = (np.arange(n_clusters) + 0.5) / n_clusters * (n - 1)
        below = np.floor(positions).astype(np.intp)
        above = np.minimum(below + 1, n - 1)
        fraction = positions - below
        return data.values(below) * (1.0 - fraction) + data.values(above) * fraction
    rng = np.random.default_rng(seed)
    if init == "random":
        picks = rng.choice(n, size=n_clusters, replace=n < n_clusters)
        return np.sort(data.values(picks))
    assert isinstance(data, InMemorySorted) and data.prefix_sums is not None
    return _kmeans_plus_plus(data.xs, data.prefix_sums, n_clusters, rng)


def _kmeans_plus_plus(
    xs: np.ndarray, prefix: np.ndarray, n_clusters: int, rng: np.random.Generator
) -> np.ndarray:
    """Greedy k-means++ with segment costs from prefix sums of x and x**2."""
    n = xs.size
    prefix_sq = np.empty(n + 1)
    prefix_sq[0] = 0.0
    np.cumsum(xs * xs, out=prefix_sq[1:])
    n_trials = 2 + int(math.log(n_clusters))

    def segment_costs(centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bounds = bounds_of(InMemorySorted(xs, None), centers)
        lo, hi = bounds[:-1], bounds[1:]
        sums = prefix[hi] - prefix[lo]
        costs = (prefix_sq[hi] - prefix_sq[lo]) - 2.0 * centers * sums + centers**2 * (hi - lo)
        return np.maximum(costs, 0.0), bounds

    def sample(centers: np.ndarray, costs: np.ndarray, bounds: np.ndarray, r: float) -> float:
        """The value where the cumulative D^2 weight first exceeds r."""
        cumulative = np.cumsum(costs)
        j = min(int(np.searchsorted(cumulative, r, side="right")), costs.size - 1)
        r_local = r - (cumulative[j] - costs[j])
        lo, hi, c = int(bounds[j]), int(bounds[j + 1]), float(centers[j])
        if hi <= lo:
            return float(xs[rng.integers(n)])
        base_sq, base = prefix_sq[lo], prefix[lo]

        def cost_through(i: int) -> float:
            count = i + 1 - lo
            return float(
                (prefix_sq[i + 1] - base_sq) - 2.0 * c * (prefix[i + 1] - base) + c * c * count
            )

        i = bisect.bisect_right(range(lo, hi), r_local, key=cost_through)
        return float(xs[lo + min(i, hi - lo - 1)])

    centers = np.array([xs[rng.integers(n)]])
    costs, bounds = segment_costs(centers)
    for _ in range(1, n_clusters):
        potential = float(costs.sum())
        if potential <= 0.0:
            # Every value sits on a center already; any further choice is equally good.
            extra = xs[rng.choice(n, size=n_clusters - centers.size, replace=True)]
            return np.sort(np.concatenate([centers, extra]))
        best = None
        for r in rng.random(n_trials) * potential:
            candidate = sample(centers, costs, bounds, float(r))
            trial = np.insert(centers, np.searchsorted(centers, candidate), candidate)
            trial_costs, trial_bounds = segment_costs(trial)
            trial_potential = float(trial_costs.sum())
            if best is None or trial_potential < best[0]:
                best = (trial_potential, trial, trial_costs, trial_bounds)
        _, centers, costs, bounds = best
    return centers


# ---------------------------------------------------------------------------
# Validation


def _as_float64_flat(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    dtype = array.dtype
    if dtype.kind not in "iuf" and dtype.name != "bfloat16":
        raise InvalidTensorError(f"{name} must hold real numbers, got dtype {dtype}")
    flat = array.reshape(-1).astype(np.float64, copy=False)
    if not np.all(np.isfinite(flat)):
        n_bad = int(np.count_nonzero(~np.isfinite(flat)))
        raise InvalidTensorError(f"{name} contain {n_bad} NaN or Inf value(s)")
    return flat


def _check_int(value: object, name: str, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise SettingsError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise SettingsError(f"{name} must be {bound}, got {value}")
    return value


def _check_init(init: object, n_clusters: int) -> np.ndarray | None:
    """None for a named method (validated), else the explicit centroids as float64."""
    if isinstance(init, str):
        if init not in INIT_METHODS:
            raise SettingsError(f"init must be one of {', '.join(INIT_METHODS)}; got {init!r}")
        return None
    try:
        centers = np.asarray(init)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"init must be a method name or an array of centroids: {exc}") from None
    if centers.dtype.kind not in "iuf" and centers.dtype.name != "bfloat16":
        raise SettingsError(f"init must be a method name or a real array, got dtype {centers.dtype}")
    centers = centers.reshape(-1) if centers.ndim == 2 and centers.shape[1:] == (1,) else centers
    if centers.shape != (n_clusters,):
        raise SettingsError(
            f"init array must hold n_clusters={n_clusters} centroids, got shape {centers.shape}"
        )
    centers = centers.astype(np.float64)
    if not np.all(np.isfinite(centers)):
        raise SettingsError("init centroids must be finite")
    return centers
