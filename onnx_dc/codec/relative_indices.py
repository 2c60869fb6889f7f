"""Relative indices: sparse positions as small gap symbols plus filler entries.

The paper stores each kept weight's position as the distance from the previous
one in a few bits, inserting a filler (zero) entry when the distance does not
fit. docs/FORMAT.md section 4.3 fixes the exact rule used here:

* entries advance the position: ``p[i] = p[i-1] + gap[i] + 1`` with ``p[-1] = -1``,
  so a gap symbol of ``index_bits`` bits advances ``1 .. 2**index_bits`` elements;
* a kept element at distance ``d`` from the previous one (``d > 2**index_bits``)
  is preceded by ``(d - 1) >> index_bits`` fillers, each with gap
  ``2**index_bits - 1``; the kept entry's gap is ``(d - 1) & (2**index_bits - 1)``.
"""

from __future__ import annotations

import numpy as np

from onnx_dc.errors import InvalidTensorError, SettingsError

MIN_INDEX_BITS = 1
MAX_INDEX_BITS = 16


def _check_index_bits(index_bits: int) -> int:
    if isinstance(index_bits, bool) or not isinstance(index_bits, (int, np.integer)):
        raise SettingsError(f"index_bits must be an integer, got {index_bits!r}")
    if not MIN_INDEX_BITS <= index_bits <= MAX_INDEX_BITS:
        raise SettingsError(f"index_bits {index_bits} is outside {MIN_INDEX_BITS}..{MAX_INDEX_BITS}")
    return int(index_bits)


def _distances(positions: np.ndarray) -> np.ndarray:
    """Distances ``q[i] - q[i-1]`` (``q[-1] = -1``) of strictly increasing positions."""
    positions = np.asarray(positions)
    if positions.ndim != 1 or not (np.issubdtype(positions.dtype, np.integer) or positions.size == 0):
        raise InvalidTensorError("positions must be a 1-D integer array")
    positions = positions.astype(np.int64)
    distances = np.diff(positions, prepend=-1)
    if distances.size and distances.min() < 1:
        raise InvalidTensorError("positions must be non-negative and strictly increasing")
    return distances


def fillers_per_position(positions: np.ndarray, index_bits: int) -> np.ndarray:
    """Number of filler entries inserted before each kept position (``int64``)."""
    index_bits = _check_index_bits(index_bits)
    return (_distances(positions) - 1) >> index_bits


def count_fillers(positions: np.ndarray, index_bits: int) -> int:
    """Total number of filler entries needed to store ``positions`` with ``index_bits``-bit gaps."""
    return int(fillers_per_position(positions, index_bits).sum())


def gap_symbol_counts(positions: np.ndarray, index_bits: int) -> np.ndarray:
    """Histogram (length ``2**index_bits``) of the gap stream, fillers included.

    Equal to ``np.bincount(relative_indices(positions, index_bits)[0], minlength=2**index_bits)``
    but computed without building the entry arrays.
    """
    index_bits = _check_index_bits(index_bits)
    distances = _distances(positions)
    counts = np.bincount((distances - 1) & ((1 << index_bits) - 1), minlength=1 << index_bits)
    counts[-1] += int(((distances - 1) >> index_bits).sum())
    return counts


def relative_indices(positions: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode strictly increasing element positions as gap symbols with fillers.

    Args:
        positions: 1-D strictly increasing non-negative integer positions (the
            kept elements of a flattened tensor).
        index_bits: width of the gap field, 1..16.

    Returns:
        ``(gaps, kept_entries)``: ``gaps`` (``int64``) is the gap symbol of every
        entry, fillers included (``len(gaps) == len(positions) + fillers``);
        ``kept_entries[i]`` is the entry index of ``positions[i]``, so entries not
        listed there are fillers.
    """
    index_bits = _check_index_bits(index_bits)
    distances = _distances(positions)
    fillers = (distances - 1) >> index_bits
    kept_entries = np.cumsum(fillers + 1) - 1
    n_entries = int(kept_entries[-1]) + 1 if kept_entries.size else 0
    gaps = np.full(n_entries, (1 << index_bits) - 1, dtype=np.int64)
    gaps[kept_entries] = (distances - 1) & ((1 << index_bits) - 1)
    return gaps, kept_entries


def absolute_positions(gaps: np.ndarray) -> np.ndarray:
    """Positions of all entries (fillers included) from their gap symbols: ``cumsum(gaps + 1) - 1``."""
    gaps = np.asarray(gaps)
    if gaps.ndim != 1 or not (np.issubdtype(gaps.dtype, np.integer) or gaps.size == 0):
        raise InvalidTensorError("gap symbols must be a 1-D integer array")
    if gaps.size and gaps.min() < 0:
        raise InvalidTensorError("gap symbols must be non-negative")
    positions = np.cumsum(gaps.astype(np.int64) + 1)
    positions -= 1
    return positions
