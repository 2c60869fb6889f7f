"""Pruning and code assignment of float32 tensors in blocks, on the values' bit patterns.

The per-tensor pipeline (:mod:`onnx_dc.codec.tensor`) on a large float32 tensor
would otherwise copy it several times over in float64 and int64 temporaries.
The two functions here give exactly the results of their generic
counterparts while touching the tensor one block of :data:`BLOCK` values at a
time (it may be a read-only ``numpy.memmap``):

* :func:`magnitude_keep_mask` is :func:`onnx_dc.codec.pruning.prune_by_magnitude`:
  the threshold is the ``n_remove``-th smallest magnitude, found by a radix
  select on the 31 magnitude bits of the float32 patterns (for finite values
  their order as unsigned integers is the order of ``|w|``) instead of
  ``numpy.partition`` on a copy; ties are removed first in row-major order, as
  there.
* :class:`NearestValue` is :func:`onnx_dc.codec.clustering.assign_to_centroids`
  for float32 values and sorted float64 candidates: every float32 value's code
  comes from a table indexed by the top 16 bits of its pattern (a contiguous
  range of values), and only the values in the few ranges that hold a
  midpoint are placed by ``searchsorted`` (against the midpoints, in float64,
  as there).
"""

from __future__ import annotations

import numpy as np

from onnx_dc.codec.pruning import removed_count
from onnx_dc.codec.sorted_values import midpoints

__all__ = ["BLOCK", "NearestValue", "magnitude_keep_mask"]

#: Values handled per step (keeps every temporary a few MB).
BLOCK = 1 << 20

_MAGNITUDE_MASK = np.uint32(0x7FFFFFFF)
_HIGH_SHIFT = np.uint32(16)
_LOW_MASK = np.uint32(0xFFFF)


def _magnitude_bits(block: np.ndarray) -> np.ndarray:
    return block.view(np.uint32) & _MAGNITUDE_MASK


def magnitude_keep_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask of ``prune_by_magnitude(weights, sparsity)`` for finite float32 ``weights``, bit for bit.

    ``weights`` is read in blocks and never copied whole; the mask (flat, bool) is the only
    full-size allocation.
    """
    flat = weights.reshape(-1)
    n = flat.size
    n_remove = removed_count(n, sparsity)
    keep = np.ones(n, dtype=bool)
    if n_remove == 0:
        return keep
    if n_remove == n:
        keep[:] = False
        return keep
    # Radix select: the bin of the top 15 magnitude bits holding rank n_remove, then the low 16 bits.
    high_counts = np.zeros(1 << 15, dtype=np.int64)
    for start in range(0, n, BLOCK):
        high_counts += np.bincount(_magnitude_bits(flat[start : start + BLOCK]) >> _HIGH_SHIFT, minlength=1 << 15)
    cumulative = np.cumsum(high_counts)
    high = int(np.searchsorted(cumulative, n_remove))  # first bin whose cumulative count reaches n_remove
    rank_in_bin = n_remove - (int(cumulative[high - 1]) if high else 0)
    low_counts = np.zeros(1 << 16, dtype=np.int64)
    for start in range(0, n, BLOCK):
        bits = _magnitude_bits(flat[start : start + BLOCK])
        in_bin = bits[(bits >> _HIGH_SHIFT) == high]
        if in_bin.size:
            low_counts += np.bincount(in_bin & _LOW_MASK, minlength=1 << 16)
    low_cumulative = np.cumsum(low_counts)
    low = int(np.searchsorted(low_cumulative, rank_in_bin))
    threshold = np.uint32((high << 16) | low)
    n_below = n_remove - rank_in_bin + (int(low_cumulative[low - 1]) if low else 0)
    ties_to_remove = n_remove - n_below
    for start in range(0, n, BLOCK):
        bits = _magnitude_bits(flat[start : start + BLOCK])
        part = keep[start : start + BLOCK]
        part[bits < threshold] = False
        if ties_to_remove:
            ties = np.flatnonzero(bits == threshold)[:ties_to_remove]
            part[ties] = False
            ties_to_remove -= ties.size
    return keep


class NearestValue:
    """Index of the nearest of sorted float64 ``candidates`` for float32 values (ties to the smaller).

    The same codes as ``assign_to_centroids(values, candidates)`` for strictly
    increasing candidates, computed from a 65536-entry table.
    """

    def __init__(self, candidates: np.ndarray) -> None:
        candidates = np.asarray(candidates, dtype=np.float64)
        self.mid = midpoints(candidates)
        self.index_dtype = np.uint8 if candidates.size <= 256 else np.uint16
        # Every 16-bit prefix of a float32 pattern is a contiguous range of values: its
        # smallest and largest magnitude are the patterns with the low 16 bits 0 and 0xFFFF.
        prefixes = np.arange(1 << 16, dtype=np.uint32) << _HIGH_SHIFT
        ends = np.stack([prefixes, prefixes | _LOW_MASK]).view(np.float32)
        ends = np.where(np.isfinite(ends), ends, np.float32(0.0)).astype(np.float64)  # Inf/NaN patterns: never asked for
        codes = np.searchsorted(self.mid, ends, side="left")
        self.table = codes[0].astype(self.index_dtype)
        self.ambiguous = codes[0] != codes[1]

    def codes(self, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Codes of finite float32 ``values`` (any shape, flattened), ``uint8`` or ``uint16``
        (or into ``out``, a flat unsigned integer array wide enough)."""
        flat = values.reshape(-1)
        if out is None:
            out = np.empty(flat.size, dtype=self.index_dtype)
        for start in range(0, flat.size, BLOCK):
            block = flat[start : start + BLOCK]
            prefix = block.view(np.uint32) >> _HIGH_SHIFT
            part = out[start : start + BLOCK]
            if part.dtype == self.table.dtype:
                np.take(self.table, prefix, out=part)
            else:
                part[...] = np.take(self.table, prefix)
            unsure = np.flatnonzero(self.ambiguous[prefix])
            if unsure.size:
                part[unsure] = np.searchsorted(self.mid, block[unsure].astype(np.float64), side="left")
        return out
