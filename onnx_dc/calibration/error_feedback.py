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
    inverse_cholesky,
    single_threaded_blas,
)
from onnx_dc.calibration.pruning_fit import _column_groups, column_batches, padded_hessians
from onnx_dc.errors import SettingsError

__all__ = ["assign_with_error_feedback", "feedback_codes", "feedback_plans"]

_FEEDBACK_BATCH_BYTES = 1 << 25  # padded factors of single-column groups processed together
_FEEDBACK_CACHE_BYTES = 1 << 29  # factors kept between roundings (restarts, bit widths of one mask), in total
_FEEDBACK_CACHE_PLANS = 16  # plans kept at most (each holds its layer's Hessian)
_FEEDBACK_CALL_BYTES = 1 << 30  # factors of a plan too large for the cache, kept for one quantize_layer call
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
    at most ``keep_bytes``, and recomputed for every rounding otherwise.
    """

    def __init__(self, hessian: np.ndarray, mask: np.ndarray, keep_bytes: int) -> None:
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
        self.factors = [self._factor(b) for b in self.batches] if self.factor_bytes <= keep_bytes else None

    def _factor(self, batch: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        assert self.hessian is not None, "a plan without its Hessian keeps its factors"
        return _feedback_factor(padded_hessians(self.hessian, batch))

    def codes(self, weights: np.ndarray, centroids: np.ndarray, mid: np.ndarray) -> np.ndarray:
        """Codes of the block's kept ``weights`` (``-1`` where pruned)."""
        codes = np.full(self.shape, -1, dtype=np.int32)
        for i, batch in enumerate(self.batches):
            factors = self.factors[i] if self.factors is not None else self._factor(batch)
            width = max(columns.size for _, columns in batch)
            padded = np.zeros((len(batch), factors.shape[-1], width))
            for b, (rows, columns) in enumerate(batch):
                padded[b, : rows.size, : columns.size] = weights[np.ix_(rows, columns)]
            rounded = _round_with_feedback(padded, factors, centroids, mid)
            for b, (rows, columns) in enumerate(batch):
                codes[np.ix_(rows, columns)] = rounded[b, : rows.size, : columns.size]
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
    ``call_bytes`` they hold their factors for their caller (the restarts of one
    :func:`~onnx_dc.calibration.sharing_fit.quantize_layer`), beyond it they
    recompute them per rounding.
    """

    def __init__(self, max_bytes: int, max_plans: int, call_bytes: int = 0) -> None:
        self.max_bytes = max_bytes
        self.max_plans = max_plans
        self.call_bytes = call_bytes
        self._plans: collections.OrderedDict[_PlanKey, tuple[weakref.ref, _FeedbackPlan]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()  # layers are fitted in threads; a weakref callback may run inside

    def plan(self, hessian: np.ndarray, mask: np.ndarray) -> _FeedbackPlan:
        """The plan of ``(hessian, mask)``: cached, or built (and cached when its factors fit)."""
        key = (id(hessian), mask.shape, np.packbits(mask).tobytes())
        with self._lock:
            entry = self._plans.get(key)
            if entry is not None and entry[0]() is hessian:
                self._plans.move_to_end(key)
                return entry[1]
        with single_threaded_blas():
            plan = _FeedbackPlan(hessian, mask, max(self.max_bytes, self.call_bytes))
        if plan.factors is not None and plan.factor_bytes <= self.max_bytes:
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


def feedback_plans(problem: LayerProblem, masks: Sequence[np.ndarray]) -> list[_FeedbackPlan]:
    """The error-feedback plans of ``problem``'s blocks for ``masks`` (shared through :data:`_FEEDBACK_PLANS`)."""
    return [_FEEDBACK_PLANS.plan(h, m) for h, m in zip(problem.hessians, masks)]


def feedback_codes(
    plans: Sequence[_FeedbackPlan], weights: Sequence[np.ndarray], centroids: np.ndarray
) -> list[np.ndarray]:
    """Codes of every block's kept ``weights`` rounded with error feedback onto ``centroids`` (sorted increasing)."""
    mid = 0.5 * centroids[:-1] + 0.5 * centroids[1:]
    with single_threaded_blas():
        return [plan.codes(w, centroids, mid) for plan, w in zip(plans, weights)]


def _feedback_factor(stack: np.ndarray) -> np.ndarray:
    """Upper Cholesky factors ``U`` of ``H^-1`` (``H^-1 = U^T U``) of a stack of matrices ``[B, s, s]``.

    With ``J`` the reversal of the rows and ``J H J = L L^T``, ``U = J L^-1 J``:
    one Cholesky factorisation and one triangular inverse, by halves in matrix
    products (:func:`~onnx_dc.calibration.layer_problem.inverse_cholesky`), instead of inverting ``H`` and
    factoring the inverse. A matrix that is not positive definite gets the
    identity: its weights are rounded without compensation.
    """
    reversed_stack = np.ascontiguousarray(stack[:, ::-1, ::-1])
    try:
        inverse = inverse_cholesky(reversed_stack)
        ok = np.ones(len(stack), dtype=bool)
    except np.linalg.LinAlgError:
        inverse = np.empty_like(reversed_stack)
        ok = np.zeros(len(stack), dtype=bool)
        for b in range(len(stack)):
            try:
                inverse[b] = inverse_cholesky(reversed_stack[b : b + 1])[0]
                ok[b] = True
            except np.linalg.LinAlgError:
                pass
    factors = np.ascontiguousarray(inverse[:, ::-1, ::-1])
    ok &= np.all(np.isfinite(factors), axis=(1, 2))
    if not np.all(ok):
        factors[~ok] = np.eye(stack.shape[-1])
    return factors


def _round_with_feedback(weights: np.ndarray, factors: np.ndarray, centroids: np.ndarray, mid: np.ndarray) -> np.ndarray:
    """Codes of ``weights`` ``[B, s, c]`` rounded row by row with the factors ``[B, s, s]``.

    Rows are taken in blocks: inside a block every rounding error updates the
    block's remaining rows at once; the rows after the block receive the whole
    block's errors in one matrix product (GPTQ's lazy batch updates, the same
    arithmetic in a different order).
    """
    w = weights.copy()
    codes = np.empty(w.shape, dtype=np.int32)
    n_rows = w.shape[1]
    for begin in range(0, n_rows, _FEEDBACK_BLOCK_ROWS):
        end = min(n_rows, begin + _FEEDBACK_BLOCK_ROWS)
        errors = np.empty((w.shape[0], end - begin, w.shape[2]))
        for i in range(begin, end):
            q = np.searchsorted(mid, w[:, i, :], side="left")
            codes[:, i, :] = q
            err = (w[:, i, :] - centroids[q]) / factors[:, i, i][:, None]
            errors[:, i - begin, :] = err
            if i + 1 < end:
                w[:, i + 1 : end, :] -= factors[:, i, i + 1 : end][:, :, None] * err[:, None, :]
        if end < n_rows:
            w[:, end:, :] -= np.matmul(np.swapaxes(factors[:, begin:end, end:], 1, 2), errors)
    return codes


