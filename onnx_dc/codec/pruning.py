"""Magnitude pruning of one tensor (stage 1 of Deep Compression).

Every function here returns a boolean *keep-mask* of the tensor's shape:
``True`` where the weight survives, ``False`` where it is pruned (set to zero).
Masks compose with ``&`` and ``|``, and ``weights * mask`` is the pruned tensor.

Two rules from the papers and one generic building block:

* :func:`prune_by_magnitude` removes a given *fraction* of the weights, those of
  smallest ``|w|``.
* :func:`prune_by_std` is the rule of Han et al.: remove every weight with
  ``|w| < quality * std(w)``.
* :func:`prune_by_score` removes the given fraction of elements with the
  lowest score, for any per-element importance score (activation-aware pruning
  uses ``|w| * ||x_j||``). :func:`prune_by_magnitude` is this function with
  ``scores = |w|``.

Exact count and tie rule (``prune_by_score`` / ``prune_by_magnitude``): with
``n`` elements, exactly ``round_half_up(sparsity * n)`` of them are removed,
where ``round_half_up(v) = floor(v + 1/2)``. The removed elements are the ones
with the smallest scores; among elements whose score equals the threshold
score (exact ties), those that come *first in row-major (C) order* are removed
first. The result therefore depends only on the values and their positions,
never on the sorting algorithm.
"""

from __future__ import annotations

import math

import numpy as np

from onnx_dc.codec._checks import finite_real, fraction
from onnx_dc.errors import InvalidTensorError, SettingsError

__all__ = ["prune_by_magnitude", "prune_by_score", "prune_by_std", "removed_count"]


def removed_count(n_elements: int, sparsity: float) -> int:
    """Number of elements :func:`prune_by_score` removes from ``n_elements`` at ``sparsity``.

    It is ``floor(sparsity * n_elements + 0.5)`` (round half up), clipped to
    ``[0, n_elements]``.
    """
    sparsity = fraction(sparsity, "sparsity")
    if n_elements < 0:
        raise SettingsError(f"n_elements must be >= 0, got {n_elements}")
    return min(n_elements, max(0, math.floor(sparsity * n_elements + 0.5)))


def prune_by_score(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask that removes the fraction ``sparsity`` of elements with the lowest score.

    Args:
        scores: real-valued array of any shape (higher = more important),
            e.g. ``|w|`` or ``|w| * activation_norm``. Must be finite.
        sparsity: fraction of elements removed, in ``[0, 1]``.

    Returns:
        Boolean array of ``scores.shape``, ``True`` = kept. Exactly
        :func:`removed_count` ``(scores.size, sparsity)`` entries are ``False``;
        ties at the threshold are removed in row-major order (see the module
        docstring).

    Raises:
        InvalidTensorError: scores are not real numbers, or contain NaN/Inf.
        SettingsError: sparsity is not a number in ``[0, 1]``.
    """
    flat = _as_real_flat(scores, "scores")
    n_remove = removed_count(flat.size, sparsity)
    keep = np.ones(flat.size, dtype=bool)
    if n_remove == flat.size:
        keep[:] = False
    elif n_remove > 0:
        # The n_remove-th smallest score is the threshold; everything strictly
        # below it goes, then just enough of the ties (first in row-major order).
        threshold = np.partition(flat, n_remove - 1)[n_remove - 1]
        below = flat < threshold
        keep[below] = False
        n_ties_removed = n_remove - int(np.count_nonzero(below))
        ties = np.flatnonzero(flat == threshold)
        keep[ties[:n_ties_removed]] = False
    return keep.reshape(np.shape(scores))


def prune_by_magnitude(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask that removes the fraction ``sparsity`` of weights with smallest ``|w|``.

    ``-0.0`` and ``+0.0`` have the same magnitude. Counting and tie rule as in
    :func:`prune_by_score`: e.g. an all-zero tensor at sparsity 0.5 loses its
    first half in row-major order.

    Args:
        weights: array of any shape and real dtype (including bfloat16). Must be finite.
        sparsity: fraction of weights removed, in ``[0, 1]``.

    Returns:
        Boolean array of ``weights.shape``, ``True`` = kept.

    Raises:
        InvalidTensorError: weights are not real numbers, or contain NaN/Inf.
        SettingsError: sparsity is not a number in ``[0, 1]``.
    """
    flat = _as_real_flat(weights, "weights")
    if flat.dtype.kind == "i":
        flat = flat.astype(np.float64)  # np.abs(int8(-128)) would wrap around
    return prune_by_score(np.abs(flat), sparsity).reshape(np.shape(weights))


def prune_by_std(weights: np.ndarray, quality: float) -> np.ndarray:
    """Keep-mask of the paper's rule: remove every weight with ``|w| < quality * std(w)``.

    ``std`` is the population standard deviation (``ddof=0``) of all elements
    of the tensor, computed in float64. The comparison is strict, so
    ``quality = 0`` removes nothing, and a tensor whose standard deviation is 0
    (constant, e.g. all zeros) loses nothing either: no magnitude is below a
    threshold of 0. An empty tensor gives an empty mask.

    Args:
        weights: array of any shape and real dtype (including bfloat16). Must be finite.
        quality: the quality parameter, a finite number ``>= 0``.

    Returns:
        Boolean array of ``weights.shape``, ``True`` = kept.

    Raises:
        InvalidTensorError: weights are not real numbers, or contain NaN/Inf.
        SettingsError: quality is negative, not finite, or not a number.
    """
    quality = finite_real(quality, "quality")
    if quality < 0:
        raise SettingsError(f"quality must be >= 0, got {quality}")
    flat = _as_real_flat(weights, "weights")
    if flat.size == 0:
        return np.ones(np.shape(weights), dtype=bool)
    values = flat.astype(np.float64)
    threshold = quality * _std(values)
    return (np.abs(values) >= threshold).reshape(np.shape(weights))


def _std(values: np.ndarray) -> float:
    """Population standard deviation without overflow for huge float64 values."""
    peak = float(np.max(np.abs(values)))
    if peak == 0.0:
        return 0.0
    # Dividing by a power of two is exact, and keeps the squares finite.
    exponent = math.frexp(peak)[1]
    return math.ldexp(float(np.std(np.ldexp(values, -exponent))), exponent)


def _as_real_flat(array: np.ndarray, name: str) -> np.ndarray:
    """Flattened view (or copy) of ``array``; bfloat16 widened to float32 (exact)."""
    array = np.asarray(array)
    dtype = array.dtype
    if dtype.kind in "iuf":
        flat = array.reshape(-1)
    elif dtype.name == "bfloat16":
        flat = array.reshape(-1).astype(np.float32)
    else:
        raise InvalidTensorError(f"{name} must hold real numbers, got dtype {dtype}")
    if flat.dtype.kind == "f" and not np.all(np.isfinite(flat)):
        n_bad = int(np.count_nonzero(~np.isfinite(flat)))
        raise InvalidTensorError(f"{name} contain {n_bad} NaN or Inf value(s)")
    return flat
