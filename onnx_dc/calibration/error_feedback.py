"""Rounding onto a shared codebook with error feedback (Optimal Brain Quantization / GPTQ).

:func:`assign_with_error_feedback` rounds a layer's kept weights one input row
at a time and moves the rows not yet rounded to compensate each rounding
error; it is one of the starts of :func:`onnx_dc.calibration.sharing_fit.quantize_layer`.
A block's row orders and Cholesky factors (its *plan*) depend only on its
Hessian and mask, so the plans are cached (:data:`_FEEDBACK_PLANS`, safe to use
from several threads) and reused by every rounding of one mask.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Sequence

import numpy as np

from onnx_dc.calibration.layer_problem import (
    LayerProblem,
    _blocks,
    _check_masks,
    map_columns,
    single_threaded_blas,
)
from onnx_dc.calibration.pruning_fit import _column_groups, column_batches, padded_hessians
from onnx_dc.errors import SettingsError

__all__ = ["assign_with_error_feedback", "feedback_codes", "feedback_plans"]

_FEEDBACK_BATCH_BYTES = 1 << 25  # padded factors of single-column groups rounded together
_FACTOR_CHUNK_BYTES = 1 << 23  # ... and factorised together (see pruning_fit._REFIT_BATCH_BYTES)
_FEEDBACK_CACHE_BYTES = 1 << 29  # factors kept between roundings (restarts, bit widths of one mask), in total
_FEEDBACK_CACHE_PLANS = 16  # plans kept at most (each holds its layer's Hessian)
_FEEDBACK_CALL_BYTES = 1 << 31  # float32 factors of a plan too large for the cache, kept for one quantize_layer call
_FEEDBACK_BLOCK_ROWS = 64  # rows per lazy-update block of the error-feedback rounding


def assign_with_error_feedback(
    problem: LayerProblem, weights: Sequence[np.ndarray], masks: Sequence[np.ndarray], centroids: np.ndarray
) -> list[np.ndarray]:
    """Codes from rounding the kept weights one input row at a time, compensating each rounding error.

    Per output column ``n`` with kept rows ``S`` the rows are visited in
    decreasing order of ``H_jj``; each weight is rounded to its nearest centroid
    and the rows not yet rounded are moved by the change that minimises ``E``
    given the rounded ones (Optimal Brain Quantization; with ``U`` the upper
    Cholesky factor of ``H_SS^-1`` the update after row ``i`` is
    ``w_>i -= (w_i - q_i) / U_ii * U_i,>i``, as in GPTQ). Nearest rounding
    ignores that the rounding errors of correlated inputs can cancel; this
    assignment lets later weights absorb earlier errors. It is a start for the
    alternation of :func:`onnx_dc.calibration.sharing_fit.quantize_layer`, not a minimiser by itself. ``weights``
    should minimise ``E`` for ``masks`` (:func:`onnx_dc.calibration.pruning_fit.refit_weights`): the updates are
    exact only from that point. Columns whose ``H_SS`` is singular are rounded
    without compensation. ``centroids`` must be sorted increasing; pruned weights
    get code ``-1``.
    """
    centroids = np.asarray(centroids, dtype=np.float64).reshape(-1)
    if centroids.size == 0:
        raise SettingsError("assign_with_error_feedback needs at least one centroid")
    if np.any(np.diff(centroids) < 0):
        raise SettingsError("assign_with_error_feedback needs centroids sorted in increasing order")
    masks = _check_masks(masks, problem)
    weights = _blocks(weights, problem)
    with single_threaded_blas():
        plans = [_FeedbackPlan(h, m, 0) for h, m in zip(problem.hessians, masks)]
    return feedback_codes(plans, weights, centroids)


class _FeedbackPlan:
    """Row orders and Cholesky factors of one block's column groups, for rounding it repeatedly.

    Columns with the same mask form one group (one factor, all columns rounded
    together); single-column groups (sparse layers: every column its own mask)
    are batched, padded to a common size: padded rows have an identity factor
    and feed nothing back. The factors are kept between roundings when they take
    at most ``keep_bytes`` in float64 (``factor_bytes``), else in float32 (``compact``:
    half the memory, for a large layer whose factors cost more than its roundings)
    when that takes at most ``compact_bytes``, and are recomputed for every rounding otherwise.
    """

    def __init__(self, hessian: np.ndarray, mask: np.ndarray, keep_bytes: int, compact_bytes: int = 0) -> None:
        self.hessian: np.ndarray | None = hessian
        self.shape = mask.shape
        diag = np.diag(hessian)
        groups = []
        for columns in _column_groups(mask):
            rows = np.flatnonzero(mask[:, columns[0]])
            if rows.size:
                groups.append((rows[np.argsort(-diag[rows], kind="stable")], columns))
        self.batches = column_batches(groups, _FEEDBACK_BATCH_BYTES)
        self.factor_bytes = sum(len(b) * b[-1][0].size ** 2 * 8 for b in self.batches)
        self.compact = keep_bytes < self.factor_bytes <= 2 * compact_bytes
        kept = self.factor_bytes <= keep_bytes or self.compact
        self.factors = map_columns(self._factor, self.batches) if kept else None

    def _factor(self, batch: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """The padded factors of ``batch`` (rows by increasing count), factorised a few columns at a time."""
        assert self.hessian is not None, "a plan without its Hessian keeps its factors"
        size = max(rows.size for rows, _ in batch)
        dtype = np.float32 if self.compact else np.float64
        factors = np.broadcast_to(np.eye(size, dtype=dtype), (len(batch), size, size)).copy()
        begin = 0
        for chunk in column_batches(batch, _FACTOR_CHUNK_BYTES):  # the batch's order: its rows already increase
            part = _feedback_factor(padded_hessians(self.hessian, chunk, reverse=True))
            end = begin + len(chunk)
            factors[begin:end, size - part.shape[-1] :, size - part.shape[-1] :] = part  # more leading identity
            begin = end
        return factors

    def codes(self, weights: np.ndarray, centroids: np.ndarray, mid: np.ndarray) -> np.ndarray:
        """Codes of the block's kept ``weights`` (``-1`` where pruned)."""
        codes = np.full(self.shape, -1, dtype=np.int32)

        def round_batch(i: int) -> None:  # each batch writes its own columns
            batch = self.batches[i]
            factors = self.factors[i] if self.factors is not None else self._factor(batch)
            size = factors.shape[-1]
            width = max(columns.size for _, columns in batch)
            padded = np.zeros((len(batch), size, width))
            for b, (rows, columns) in enumerate(batch):
                padded[b, size - rows.size :, : columns.size] = weights[np.ix_(rows[::-1], columns)]
            rounded = _round_with_feedback(padded, factors, centroids, mid)
            for b, (rows, columns) in enumerate(batch):
                codes[np.ix_(rows[::-1], columns)] = rounded[b, size - rows.size :, : columns.size]

        map_columns(round_batch, range(len(self.batches)))
        return codes


class _FeedbackPlanCache:
    """The most recently used :class:`_FeedbackPlan` s with their factors, bounded in bytes and in number.

    A plan depends only on a block's Hessian and mask, so every rounding of one
    pruning mask (the restarts of :func:`~onnx_dc.calibration.sharing_fit.quantize_layer`, and its calls at the
    other bit widths of one sparsity) reuses the factors instead of computing
    them again. An entry is found by the identity of the Hessian array (held by a
    weak reference: an entry goes when its Hessian is freed, so a later array
    with the same identity never finds it; Hessians are never modified) and the
    mask's contents. Plans whose factors exceed ``max_bytes`` are not kept: up to
    ``call_bytes`` in float32 they hold their factors for their caller (the restarts
    of one :func:`~onnx_dc.calibration.sharing_fit.quantize_layer`), beyond it they
    recompute them per rounding.
    """

    def __init__(self, max_bytes: int, max_plans: int, call_bytes: int = 0) -> None:
        self.max_bytes = max_bytes
        self.max_plans = max_plans
        self.call_bytes = call_bytes
        self._plans: collections.OrderedDict[_PlanKey, tuple[weakref.ref, _FeedbackPlan]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()  # layers are fitted in threads; a weakref callback may run inside

    def plan(self, hessian: np.ndarray, mask: np.ndarray, *, one_rounding: bool = False) -> _FeedbackPlan:
        """The plan of ``(hessian, mask)``: cached, or built (and cached when its factors fit).

        With ``one_rounding`` (the caller rounds once) a plan too large for the cache
        computes its factors during the rounding instead of holding them all at once.
        """
        key = (id(hessian), mask.shape, np.packbits(mask).tobytes())
        with self._lock:
            entry = self._plans.get(key)
            if entry is not None and entry[0]() is hessian:
                self._plans.move_to_end(key)
                return entry[1]
        with single_threaded_blas():
            plan = _FeedbackPlan(hessian, mask, self.max_bytes, 0 if one_rounding else self.call_bytes)
        if plan.factors is not None and not plan.compact:
            plan.hessian = None  # the factors are all it needs; the cache must not keep the Hessian alive
            with self._lock:
                self._remove(key)
                self._plans[key] = (weakref.ref(hessian, lambda _, key=key: self._remove(key)), plan)
                self._bytes += plan.factor_bytes
                while self._plans and (self._bytes > self.max_bytes or len(self._plans) > self.max_plans):
                    self._remove(next(iter(self._plans)))
        return plan

    def clear(self) -> None:
        """Forget every plan."""
        with self._lock:
            self._plans.clear()
            self._bytes = 0

    def _remove(self, key: _PlanKey) -> None:
        with self._lock:
            entry = self._plans.pop(key, None)
            if entry is not None:
                self._bytes -= entry[1].factor_bytes


_PlanKey = tuple[int, tuple[int, ...], bytes]  # (id of the Hessian, mask shape, packed mask)
_FEEDBACK_PLANS = _FeedbackPlanCache(_FEEDBACK_CACHE_BYTES, _FEEDBACK_CACHE_PLANS, _FEEDBACK_CALL_BYTES)


def feedback_plans(
    problem: LayerProblem, masks: Sequence[np.ndarray], *, one_rounding: bool = False
) -> list[_FeedbackPlan]:
    """The error-feedback plans of ``problem``'s blocks for ``masks`` (shared through :data:`_FEEDBACK_PLANS`).

    ``one_rounding``: the caller rounds once (see :meth:`_FeedbackPlanCache.plan`).
    """
    return [_FEEDBACK_PLANS.plan(h, m, one_rounding=one_rounding) for h, m in zip(problem.hessians, masks)]


def feedback_codes(
    plans: Sequence[_FeedbackPlan], weights: Sequence[np.ndarray], centroids: np.ndarray
) -> list[np.ndarray]:
    """Codes of every block's kept ``weights`` rounded with error feedback onto ``centroids`` (sorted increasing)."""
    mid = 0.5 * centroids[:-1] + 0.5 * centroids[1:]
    with single_threaded_blas():
        return [plan.codes(w, centroids, mid) for plan, w in zip(plans, weights)]


def _feedback_factor(stack: np.ndarray) -> np.ndarray:
    """Lower Cholesky factors ``L`` (``J H J = L L^T``) of a stack ``[B, s, s]`` of reversed matrices ``J H J``.

    ``V = J L J`` is upper triangular with ``H = V V^T``, and ``V^-1`` is the upper Cholesky
    factor ``U`` of ``H^-1`` that GPTQ's updates use; the rounding (:func:`_round_with_feedback`)
    works with ``L`` itself, so one factorisation serves and no triangular inverse is needed.
    A matrix that is not positive definite gets the identity: its weights are rounded
    without compensation.
    """
    try:
        factors = np.linalg.cholesky(stack)
        ok = np.ones(len(stack), dtype=bool)
    except np.linalg.LinAlgError:
        factors = np.empty_like(stack)
        ok = np.zeros(len(stack), dtype=bool)
        for b in range(len(stack)):
            try:
                factors[b] = np.linalg.cholesky(stack[b])
                ok[b] = True
            except np.linalg.LinAlgError:
                pass
    ok &= np.all(np.isfinite(factors), axis=(1, 2)) & np.all(np.diagonal(factors, axis1=1, axis2=2) > 0, axis=1)
    if not np.all(ok):
        factors[~ok] = np.eye(stack.shape[-1])
    return factors


def _round_with_feedback(weights: np.ndarray, factors: np.ndarray, centroids: np.ndarray, mid: np.ndarray) -> np.ndarray:
    """Codes of ``weights`` ``[B, s, c]`` (rows in reverse visiting order) rounded with the factors ``L`` ``[B, s, s]``.

    In visiting order GPTQ moves the rows after ``i`` by ``-(w_i - q_i) / U_ii * U_i,>i``
    (``U = V^-1``, ``V = J L J``); summed up, row ``i`` is rounded from
    ``w_i + V_<i,i . d_<i / V_ii``, where ``d_j = w_j - q_j`` is the rounding error of an
    earlier row: Babai's nearest plane on ``V``, the same arithmetic in another order. Here
    row ``r`` (visited ``s - 1 - r``-th) is rounded from ``w_r + L_>r,r . d_>r / L_rr``, the rows
    from the last to the first, in blocks: inside a block each error is added to the block's
    remaining rows at once; a block receives the errors of the rows after it in one matrix product.
    """
    codes = np.empty(weights.shape, dtype=np.int32)
    errors = np.empty(weights.shape)
    n_rows = weights.shape[1]
    for stop in range(n_rows, 0, -_FEEDBACK_BLOCK_ROWS):
        start = max(0, stop - _FEEDBACK_BLOCK_ROWS)
        block = np.asarray(factors[:, start:, start:stop], dtype=np.float64)  # L_{>=start, start:stop}; compact: float32
        if stop < n_rows:
            shift = np.matmul(np.swapaxes(block[:, stop - start :, :], 1, 2), errors[:, stop:, :])
        else:
            shift = np.zeros((weights.shape[0], stop - start, weights.shape[2]))
        for i in range(stop - start - 1, -1, -1):  # row start + i
            row = weights[:, start + i, :]
            moved = row + shift[:, i, :] / block[:, i, i][:, None]
            q = np.searchsorted(mid, moved, side="left")
            codes[:, start + i, :] = q
            errors[:, start + i, :] = row - centroids[q]
            if i > 0:
                shift[:, :i, :] += block[:, i, :i][:, :, None] * errors[:, start + i, None, :]
    return codes
