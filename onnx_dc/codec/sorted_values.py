"""Sorted values for 1-D k-means, held in full or compactly, and the Lloyd iterations on them.

:func:`onnx_dc.codec.clustering.kmeans_1d` runs Lloyd's algorithm on the
*sorted* values, centred on their mean (the "work space"): a cluster is a run
of consecutive sorted values, found by ``searchsorted`` of the midpoints, and
its mean comes from two prefix sums. Those are the only three things an
iteration reads, so this module states them as an interface, :class:`SortedValues`:

* :class:`InMemorySorted` holds the float64 work-space values and their prefix
  sums (``16`` bytes per value): what ``kmeans_1d`` has always used.
* :class:`CompactSorted` holds the sorted values in their float32 form
  (``4`` bytes per value) plus one prefix sum per block of
  :data:`CHECKPOINT_EVERY` values, and recomputes anything else on demand with
  exactly the same float64 operations, in the same order: the work-space value
  ``float64(x) - mean``, prefix sums as the sequential ``cumsum`` computes them,
  the mean as numpy's pairwise sum does. Every query therefore returns what
  the in-memory arrays hold, bit for bit, and the iterations (and the
  centroids) are identical; the converter uses it for large float32 tensors
  (``onnx_dc.codec.tensor``), where the in-memory form would take four times
  the tensor's size.

:func:`lloyd` is the iteration both share (empty clusters re-seeded by the
split rule of ``kmeans_1d``'s documentation), :func:`final_bounds` the last
assignment step that drops clusters left empty.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "CHECKPOINT_EVERY",
    "CompactSorted",
    "InMemorySorted",
    "SortedValues",
    "final_bounds",
    "lloyd",
    "midpoints",
    "pairwise_sum",
]

#: Values per stored prefix sum in :class:`CompactSorted`; a prefix sum elsewhere costs one short ``cumsum``.
CHECKPOINT_EVERY = 1024
_BLOCK = 1 << 20  # values converted to float64 at a time
_PAIRWISE_LEAF = 1 << 16  # numpy's pairwise sum reproduced down to leaves of this size


class SortedValues:
    """Sorted work-space values (non-decreasing) and their prefix sums, by index.

    ``prefix(i)`` is the sum of the first ``i`` values accumulated left to
    right (``prefix(0) = 0``), as ``numpy.cumsum`` computes it.
    """

    size: int

    def values(self, index: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        """The work-space values at ``index`` (float64)."""
        raise NotImplementedError

    def prefix(self, index: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        """Prefix sums at ``index`` (``0 <= index <= size``), float64."""
        raise NotImplementedError

    def searchsorted(self, v: np.ndarray, side: str) -> np.ndarray:  # pragma: no cover - interface
        """``numpy.searchsorted`` of ``v`` in the work-space values."""
        raise NotImplementedError


class InMemorySorted(SortedValues):
    """The work-space values and their prefix sums as float64 arrays."""

    def __init__(self, xs: np.ndarray, prefix: np.ndarray | None) -> None:
        self.xs = xs
        self.prefix_sums = prefix
        self.size = int(xs.size)

    def values(self, index: np.ndarray) -> np.ndarray:
        """The work-space values at ``index``."""
        return self.xs[index]

    def prefix(self, index: np.ndarray) -> np.ndarray:
        """Prefix sums at ``index``."""
        assert self.prefix_sums is not None
        return self.prefix_sums[index]

    def searchsorted(self, v: np.ndarray, side: str) -> np.ndarray:
        """``numpy.searchsorted(xs, v, side)``."""
        return np.searchsorted(self.xs, v, side=side)


class CompactSorted(SortedValues):
    """Sorted float32 values read as ``float64(x) - mean``, with a prefix sum every :data:`CHECKPOINT_EVERY`.

    ``sorted32`` is kept (not copied). ``mean`` is ``numpy.mean`` of the values
    in float64, computed here by :func:`pairwise_sum` without a float64 copy.
    """

    def __init__(self, sorted32: np.ndarray) -> None:
        self.sorted32 = sorted32
        self.size = n = int(sorted32.size)
        self.mean = pairwise_sum(sorted32) / n if n else 0.0
        self.checkpoints = np.empty(n // CHECKPOINT_EVERY + 1)
        self.checkpoints[0] = 0.0
        carry = 0.0
        stored = 1
        for start in range(0, n, _BLOCK):  # _BLOCK is a multiple of CHECKPOINT_EVERY
            sums = self._work(start, min(start + _BLOCK, n))
            if start:
                sums[0] += carry
            np.cumsum(sums, out=sums)
            marks = sums[CHECKPOINT_EVERY - 1 :: CHECKPOINT_EVERY]
            self.checkpoints[stored : stored + marks.size] = marks
            stored += marks.size
            carry = float(sums[-1])
        self._cache: dict[int, float] = {}

    def _work(self, start: int, stop: int) -> np.ndarray:
        work = self.sorted32[start:stop].astype(np.float64)
        work -= self.mean
        return work

    def values(self, index: np.ndarray) -> np.ndarray:
        """The work-space values at ``index``: ``float64(x) - mean``."""
        return self.sorted32[index].astype(np.float64) - self.mean

    def prefix(self, index: np.ndarray) -> np.ndarray:
        """Prefix sums at ``index``, from the checkpoint before each plus one short cumsum."""
        index = np.asarray(index)
        out = np.empty(index.shape)
        flat = out.reshape(-1)
        for k, i in enumerate(index.reshape(-1).tolist()):
            flat[k] = self._prefix_at(i)
        return out

    def _prefix_at(self, i: int) -> float:
        cached = self._cache.get(i)
        if cached is not None:
            return cached
        block, offset = divmod(i, CHECKPOINT_EVERY)
        if offset == 0:
            value = float(self.checkpoints[block])
        else:
            start = block * CHECKPOINT_EVERY
            sums = self._work(start, i)
            if start:
                sums[0] += self.checkpoints[block]
            value = float(np.cumsum(sums)[-1])
        if len(self._cache) > 1 << 16:
            self._cache.clear()
        self._cache[i] = value
        return value

    def searchsorted(self, v: np.ndarray, side: str) -> np.ndarray:
        """Vectorised binary search on indices: the work-space values are never materialised."""
        v = np.asarray(v, dtype=np.float64)
        lo = np.zeros(v.shape, dtype=np.intp)
        hi = np.full(v.shape, self.size, dtype=np.intp)
        # Invariant: every index < lo satisfies the predicate, every index >= hi does not.
        while True:
            open_ = lo < hi
            if not open_.any():
                return lo
            mid = (lo + hi) >> 1
            probe = self.values(np.minimum(mid, self.size - 1))
            below = (probe <= v) if side == "right" else (probe < v)
            below &= open_
            lo = np.where(below, mid + 1, lo)
            hi = np.where(open_ & ~below, mid, hi)


def pairwise_sum(values32: np.ndarray) -> float:
    """``numpy.add.reduce(values32.astype(float64))`` without the float64 copy, bit for bit.

    numpy sums a contiguous float64 array pairwise: halves (the first rounded down to a
    multiple of 8) recursively, blocks of up to 128 values with 8 accumulators. The
    recursion is reproduced here down to leaves of ``_PAIRWISE_LEAF`` values, which
    numpy then sums itself on a float64 copy of just that leaf.
    """

    return float(_pairwise_node(values32, 0, int(values32.size))) if values32.size else 0.0


def _pairwise_node(values32: np.ndarray, start: int, n: int) -> float:
    # A module-level function, not a closure: a recursive closure is a reference cycle that
    # would keep the values alive until the garbage collector runs.
    if n <= _PAIRWISE_LEAF:
        return np.add.reduce(values32[start : start + n].astype(np.float64))
    half = n // 2
    half -= half % 8
    return _pairwise_node(values32, start, half) + _pairwise_node(values32, start + half, n - half)


# ---------------------------------------------------------------------------
# Lloyd iterations


def midpoints(sorted_centroids: np.ndarray) -> np.ndarray:
    """Midpoints between consecutive sorted centroids (``0.5*a + 0.5*b``: no overflow, monotone)."""
    return 0.5 * sorted_centroids[:-1] + 0.5 * sorted_centroids[1:]


def bounds_of(data: SortedValues, sorted_centroids: np.ndarray) -> np.ndarray:
    """Cluster j is values ``bounds[j]:bounds[j+1]``: values <= midpoint j go left."""
    bounds = np.empty(sorted_centroids.size + 1, dtype=np.intp)
    bounds[0] = 0
    bounds[-1] = data.size
    bounds[1:-1] = data.searchsorted(midpoints(sorted_centroids), "right")
    return bounds


def lloyd(
    data: SortedValues, centroids: np.ndarray, n_clusters: int, max_iter: int
) -> tuple[np.ndarray, int, bool, int]:
    """Lloyd iterations from sorted ``centroids`` until no assignment changes or ``max_iter``.

    Returns ``(centroids, n_iter, converged, n_reseeded)`` (work space, sorted).
    """
    bounds_old = None
    converged = False
    n_reseeded = 0
    n_iter = max_iter
    for iteration in range(1, max_iter + 1):
        bounds = bounds_of(data, centroids)
        if bounds_old is not None and np.array_equal(bounds, bounds_old):
            converged = True
            n_iter = iteration
            break
        centroids, n_new = _update_centroids(data, bounds, n_clusters)
        n_reseeded += n_new
        bounds_old = bounds
    return centroids, n_iter, converged, n_reseeded


def final_bounds(data: SortedValues, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The final assignment step: ``(centroids, bounds)`` with the clusters left empty dropped."""
    bounds = bounds_of(data, centroids)
    while np.any(bounds[1:] == bounds[:-1]):
        centroids = centroids[bounds[1:] > bounds[:-1]]
        bounds = bounds_of(data, centroids)
    return centroids, bounds


def _update_centroids(data: SortedValues, bounds: np.ndarray, n_clusters: int) -> tuple[np.ndarray, int]:
    """The M-step: sorted means of the clusters, missing clusters re-seeded by splits.

    Returns the centroids and the number of clusters re-seeded.
    """
    lo = bounds[:-1]
    hi = bounds[1:]
    nonempty = hi > lo
    n_reseeded = 0
    if lo.size < n_clusters or not np.all(nonempty):
        lo, hi = lo[nonempty], hi[nonempty]
        n_nonempty = lo.size
        lo, hi = _split_for_empty(data, lo, hi, n_clusters)
        n_reseeded = lo.size - n_nonempty
    # Means of ordered disjoint runs are sorted in exact arithmetic; the sort
    # guards against rounding of the prefix sums for nearly equal means.
    return np.sort((data.prefix(hi) - data.prefix(lo)) / (hi - lo)), n_reseeded


def _split_for_empty(
    data: SortedValues, lo: np.ndarray, hi: np.ndarray, n_clusters: int
) -> tuple[np.ndarray, np.ndarray]:
    """Re-seed empty clusters: split the runs whose split lowers the inertia most.

    One split per empty cluster, greedily. A run can be cut after its first run
    of equal values, before its last one (these two moves include
    scikit-learn's "move the farthest point to the empty cluster"), or at its
    mean; the cut with the largest inertia decrease over all runs wins.
    Returns the new ordered run bounds (fewer than ``n_clusters`` runs only if
    no run holds two distinct values).
    """
    while lo.size < n_clusters:
        count = hi - lo
        first = data.values(lo)
        last = data.values(hi - 1)
        prefix_lo, prefix_hi = data.prefix(lo), data.prefix(hi)
        mean = (prefix_hi - prefix_lo) / count
        best_gain = np.full(lo.size, -1.0)
        best_cut = lo.copy()
        for cut in (
            data.searchsorted(first, "right"),
            data.searchsorted(last, "left"),
            data.searchsorted(mean, "right"),
        ):
            valid = (cut > lo) & (cut < hi) & (first != last)
            cut = np.where(valid, cut, lo + 1)
            n_left = (cut - lo).astype(np.float64)
            n_right = (hi - cut).astype(np.float64)
            prefix_cut = data.prefix(cut)
            mean_left = (prefix_cut - prefix_lo) / n_left
            mean_right = (prefix_hi - prefix_cut) / np.maximum(n_right, 1.0)
            # Inertia decrease of splitting a run in two: nL*nR/n * (meanL - meanR)^2.
            gain = np.where(valid, n_left * n_right / count * (mean_left - mean_right) ** 2, -1.0)
            better = gain > best_gain
            best_gain = np.where(better, gain, best_gain)
            best_cut = np.where(better, cut, best_cut)
        j = int(np.argmax(best_gain))
        if best_gain[j] < 0.0:
            break
        cut = best_cut[j]
        lo = np.insert(lo, j + 1, cut)
        hi = np.insert(hi, j, cut)
    return lo, hi
