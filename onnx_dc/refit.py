"""Layer-wise reconstruction fits: "trained quantization" done one-shot from calibration statistics.

The paper retrains the network after pruning and fine-tunes the shared
centroids by back-propagation. Without a training loop, each layer is fitted
instead to reproduce its own output on calibration data. For a layer computing
``Y = X W`` (``X``: ``[m, K]`` inputs, ``W``: ``[K, N]`` weights, one row per
input feature) the output error of a compressed ``W_q`` is::

    ||X (W_q - T)||^2 = tr((W_q - T)^T G (W_q - T)),   G = X^T X   (K x K)

where ``T`` is the weight the output should match (the original weight, or a
corrected target in sequential mode, see :mod:`onnx_dc.calibrated`). Only the
Gram matrix ``G`` is needed, never the activations, so the statistics of a
layer take ``K^2`` numbers whatever the number of calibration samples.

Every function minimises the *damped* objective::

    E(W) = tr((W - T)^T H (W - T)),   H = G + lambda I,   lambda = damping * mean(diag(G))

The damping (default 1 %) regularises the fits where the calibration data
do not determine a weight (an input feature that is always zero, or linearly
dependent features): such weights are pulled towards ``T`` instead of drifting
freely. :meth:`LayerProblem.error` is ``E``; :meth:`LayerProblem.output_error`
the undamped error.

A layer may have several independent *blocks* sharing one codebook (a grouped
convolution has one block per group: the output channels of group ``g`` see
only the input channels of group ``g``); ``E`` is then the sum over blocks.

The stages, all numpy:

* :func:`pruning_scores` / :func:`select_mask`: which weights to remove.
  ``magnitude`` scores ``|t|`` (the paper); ``activation`` scores
  ``|t| * ||x_j||`` with ``||x_j|| = sqrt(G_jj)`` the norm of the weight's input
  feature over the calibration set; ``obs`` scores ``t^2 / [H^-1]_jj``, the
  increase of ``E`` when one weight is removed and the others re-fitted
  (Optimal Brain Surgeon). With ``obs``, :func:`prune_iteratively` removes
  the weights in a few steps, re-fitting the survivors and re-scoring them with
  the exact per-column saliency in between. One mask is chosen for the whole
  layer (exact count, :func:`onnx_dc.pruning.prune_by_score`), so columns and
  input features end up with different densities.
* :func:`refit_weights`: the surviving weights that minimise ``E`` for a fixed
  mask: per output column ``n`` with kept inputs ``S``, ``w_S = H_SS^-1 (H t_n)_S``
  (pruned weights stay exactly zero).
* :func:`quantize_layer`: weight sharing with ``k`` centroids. Starts from
  1-D k-means of the kept weights (as :func:`onnx_dc.tensor.compress_tensor`),
  then alternates two steps, each of which can only lower ``E`` (a step that
  would raise it is rejected):

  - :func:`refit_centroids`: with the assignments fixed, ``W_q = sum_c mu_c A_c``
    (``A_c`` the 0/1 indicator of the weights of cluster ``c``) and ``E`` is a
    quadratic in the ``k`` centroids: ``M mu = r`` with
    ``M_cd = sum_g tr(A_c^T H A_d)`` and ``r_c = sum_g tr(A_c^T H T)``, a ``k x k``
    system (the gradient of centroid ``c`` is the sum of the gradients of its
    weights, as in the paper's fine-tuning, here solved exactly). Empty clusters
    are left out of the system.
  - :func:`reassign_codes`: coordinate descent over the assignments. The
    change of ``E`` when one weight moves by ``delta`` is
    ``2 delta R_jn + delta^2 H_jj`` (``R = H (W_q - T)``), so each weight moves to
    the centroid nearest to ``w - R_jn / H_jj``; the weights of one input row
    touch different columns and are updated together, then ``R`` is updated.
    Pruned weights stay pruned.

  Coordinate descent stops in the local minimum nearest its start, so the
  alternation is run from two starts and the lower ``E`` is kept: nearest-centroid
  assignment, and :func:`assign_with_error_feedback` (sequential rounding in
  which every rounding error is compensated on the weights not yet rounded, as in
  Optimal Brain Quantization / GPTQ, here onto the shared codebook), restarted
  from the improved codebook while that lowers ``E``.

* :func:`fit_layer`: the whole per-layer recipe; with ``criterion="auto"`` it
  prunes with every criterion and keeps the one with the lowest ``E`` after the
  weight refit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral

import numpy as np

from onnx_dc.clustering import INIT_METHODS, assign_to_centroids, kmeans_1d
from onnx_dc._checks import finite_real, fraction
from onnx_dc.errors import InvalidTensorError, SettingsError
from onnx_dc.pruning import prune_by_score

__all__ = [
    "CRITERIA",
    "DEFAULT_DAMPING",
    "LayerFit",
    "LayerProblem",
    "QuantizedLayer",
    "assign_with_error_feedback",
    "fit_layer",
    "prune_iteratively",
    "pruning_path",
    "pruning_scores",
    "quantize_layer",
    "reassign_codes",
    "refit_centroids",
    "refit_weights",
    "select_mask",
    "single_threaded_blas",
]

CRITERIA: tuple[str, ...] = ("magnitude", "activation", "obs")
"""Pruning criteria: the paper's ``|w|``, activation-aware ``|w| * ||x||``, Optimal Brain Surgeon."""

DEFAULT_DAMPING = 0.01
"""lambda = DEFAULT_DAMPING * mean(diag(G))."""

DEFAULT_OBS_RATE = 0.15
"""Fraction of the kept weights :func:`pruning_path` removes per step after the first."""

_IMPROVEMENT_RTOL = 1e-9  # a step must lower E by more than this (relative) to count
_ONEHOT_MAX_ELEMENTS = 1 << 18  # _centroid_system builds the one-hot matrix of blocks up to this size
_ROUND_RTOL = 1e-3  # quantize_layer stops when a whole round gains less than this (relative)
_FEEDBACK_RESTARTS = 3  # error-feedback starts quantize_layer tries at most (each from the best codebook so far)
_FEEDBACK_BATCH_BYTES = 1 << 25  # padded factors of single-column groups processed together
_FEEDBACK_KEEP_BYTES = 1 << 28  # quantize_layer keeps the factors between its restarts up to this size
_FEEDBACK_BLOCK_ROWS = 64  # rows per lazy-update block of the error-feedback rounding


class LayerProblem:
    """The reconstruction problem of one layer: blocks of (Gram matrix, target weights).

    Args:
        grams: one ``[K_g, K_g]`` symmetric positive semi-definite matrix per
            block (``X_g^T X_g`` over the calibration set, float64).
        targets: one ``[K_g, N_g]`` array per block: the weights whose output
            the compressed layer should reproduce.
        damping: ``lambda_g = damping * mean(diag(G_g))`` (1.0 when ``G_g`` is all zero).
        column_weights: optional, per block, one weight ``s_n >= 0`` per output column: the
            objective becomes ``sum_n s_n (w_n - t_n)^T H (w_n - t_n)`` (how much an error in
            output ``n`` matters downstream, see :func:`onnx_dc.calibrated.downstream_column_weights`).
            ``None`` (default): every column counts the same. :meth:`output_error` and
            :meth:`relative_error` stay unweighted (the layer's own output).

    Raises:
        InvalidTensorError: shapes that do not match, or values that are not finite.
        SettingsError: a negative or non-finite damping.
    """

    def __init__(
        self,
        grams: Sequence[np.ndarray],
        targets: Sequence[np.ndarray],
        *,
        damping: float = DEFAULT_DAMPING,
        column_weights: Sequence[np.ndarray | None] | np.ndarray | None = None,
    ) -> None:
        if isinstance(grams, np.ndarray):
            grams = [grams]
        if isinstance(targets, np.ndarray):
            targets = [targets]
        if len(grams) != len(targets) or not grams:
            raise InvalidTensorError(f"need one target per Gram matrix, got {len(grams)} and {len(targets)}")
        damping = finite_real(damping, "damping")
        if damping < 0:
            raise SettingsError(f"damping must be >= 0, got {damping}")
        self.damping = damping
        self.grams: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.hessians: list[np.ndarray] = []
        self.column_weights: list[np.ndarray | None] = []
        self._output_energy: float | None = None
        if column_weights is None:
            column_weights = [None] * len(grams)
        elif isinstance(column_weights, np.ndarray):
            column_weights = [column_weights]
        if len(column_weights) != len(grams):
            raise InvalidTensorError(f"need one column-weight array per block, got {len(column_weights)} for {len(grams)}")
        for g, (gram, target) in enumerate(zip(grams, targets)):
            gram = np.asarray(gram, dtype=np.float64)
            target = np.asarray(target, dtype=np.float64)
            if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
                raise InvalidTensorError(f"block {g}: Gram matrix must be square, got shape {gram.shape}")
            if target.ndim != 2 or target.shape[0] != gram.shape[0]:
                raise InvalidTensorError(
                    f"block {g}: target of shape {target.shape} does not match Gram matrix {gram.shape}"
                )
            if not (np.all(np.isfinite(gram)) and np.all(np.isfinite(target))):
                raise InvalidTensorError(f"block {g}: Gram matrix or target is not finite")
            gram = 0.5 * (gram + gram.T)
            mean_diag = float(np.mean(np.diag(gram))) if gram.size else 0.0
            lam = damping * mean_diag if mean_diag > 0 else (1.0 if damping > 0 else 0.0)
            hessian = gram.copy()
            hessian[np.diag_indices_from(hessian)] += lam
            self.grams.append(gram)
            self.targets.append(target)
            self.hessians.append(hessian)
            self.column_weights.append(_check_column_weights(column_weights[g], target.shape[1], g))

    @property
    def n_blocks(self) -> int:
        """Number of independent blocks (groups)."""
        return len(self.grams)

    @property
    def n_weights(self) -> int:
        """Total number of weights over all blocks."""
        return sum(t.size for t in self.targets)

    def error(self, weights: Sequence[np.ndarray]) -> float:
        """The damped objective ``E`` that every fit here minimises."""
        return math.fsum(
            _quadratic(h, w - t, c)
            for h, w, t, c in zip(self.hessians, _blocks(weights, self), self.targets, self.column_weights)
        )

    def output_error(self, weights: Sequence[np.ndarray]) -> float:
        """Undamped output error ``sum_g ||X_g (W_g - T_g)||^2`` (from the Gram matrices)."""
        return math.fsum(_quadratic(g, w - t) for g, w, t in zip(self.grams, _blocks(weights, self), self.targets))

    def output_energy(self) -> float:
        """``sum_g ||X_g T_g||^2``: the scale for :meth:`relative_error` (computed once)."""
        if self._output_energy is None:
            self._output_energy = math.fsum(_quadratic(g, t) for g, t in zip(self.grams, self.targets))
        return self._output_energy

    def relative_error(self, weights: Sequence[np.ndarray]) -> float:
        """:meth:`output_error` divided by :meth:`output_energy` (0 when the energy is 0)."""
        energy = self.output_energy()
        return self.output_error(weights) / energy if energy > 0 else 0.0


@dataclass
class QuantizedLayer:
    """Shared-weight result: ``codes`` (``-1`` pruned) per block index ``centroids``.

    Attributes:
        codes: per block, int array of the target's shape, ``-1`` = pruned.
        centroids: float64, 1-D, sorted increasing (some may be unused).
        error: the damped objective ``E`` of :attr:`weights`.
        history: ``E`` after the k-means start and after every accepted step.
    """

    codes: list[np.ndarray]
    centroids: np.ndarray
    error: float
    history: list[float] = field(default_factory=list)

    @property
    def weights(self) -> list[np.ndarray]:
        """The quantized weights per block (``centroids[codes]``, zero where pruned)."""
        return [_dequantize(c, self.centroids) for c in self.codes]


@dataclass
class LayerFit:
    """Outcome of :func:`fit_layer`.

    Attributes:
        criterion: the pruning criterion used.
        masks: per block, bool, ``True`` = kept.
        quantized: the :class:`QuantizedLayer`.
        error: ``E`` of the final weights.
        relative_error: undamped output error / output energy.
        errors_by_criterion: ``E`` after pruning (and weight refit) of every criterion tried.
    """

    criterion: str
    masks: list[np.ndarray]
    quantized: QuantizedLayer
    error: float
    relative_error: float
    errors_by_criterion: dict[str, float] = field(default_factory=dict)

    @property
    def weights(self) -> list[np.ndarray]:
        """The final (pruned and quantized) weights per block."""
        return self.quantized.weights


# ---------------------------------------------------------------------------
# Pruning


def pruning_scores(problem: LayerProblem, criterion: str, weights: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """Per-weight importance (higher = keep) under ``criterion`` (one of :data:`CRITERIA`).

    ``weights`` default to the targets. ``activation``: ``|w_jn| * sqrt(G_jj)``;
    ``obs``: ``w_jn^2 / [H^-1]_jj``.
    """
    _check_criterion(criterion)
    weights = problem.targets if weights is None else _blocks(weights, problem)
    scores = []
    for gram, hessian, w, cw in zip(problem.grams, problem.hessians, weights, problem.column_weights):
        if criterion == "magnitude":
            score = np.abs(w)
        elif criterion == "activation":
            norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
            score = np.abs(w) * norms[:, None]
        else:
            inv_diag = np.diag(_inverse_spd(hessian))
            score = w * w / inv_diag[:, None]
        if cw is not None and criterion != "magnitude":
            # The paper's criterion stays |w|; the data-driven ones follow the weighted objective
            # (the squared-error saliency scales with s_n, the activation-aware score with sqrt(s_n)).
            score = score * (cw[None, :] if criterion == "obs" else np.sqrt(cw)[None, :])
        scores.append(score)
    return scores


def select_mask(problem: LayerProblem, sparsity: float, criterion: str) -> list[np.ndarray]:
    """Keep-masks removing the fraction ``sparsity`` of the layer's weights with the lowest scores.

    One threshold for the whole layer (all blocks), exact count and tie rule of
    :func:`onnx_dc.pruning.prune_by_score`.
    """
    return _mask_from_scores(pruning_scores(problem, criterion), sparsity)


def refit_weights(problem: LayerProblem, masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The weights minimising ``E`` with every pruned weight fixed at zero.

    Per block and output column ``n`` with kept rows ``S``:
    ``w_S = H_SS^-1 (H t_n)_S``; columns with the same mask share one
    factorisation. Never increases ``E`` over ``target * mask`` (it is the
    exact minimiser over all weights with that mask).
    """
    masks = _check_masks(masks, problem)
    return [_refit_block(h, t, m) for h, t, m in zip(problem.hessians, problem.targets, masks)]


def prune_iteratively(
    problem: LayerProblem, sparsity: float, *, rate: float = DEFAULT_OBS_RATE
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """OBS pruning to ``sparsity``: one-shot to 50 %, then small steps, re-fitting in between.

    See :func:`pruning_path`; returns ``(masks, weights)`` at ``sparsity``.
    """
    (result,) = pruning_path(problem, [sparsity], rate=rate)
    return result


def pruning_path(
    problem: LayerProblem, sparsities: Sequence[float], *, rate: float = DEFAULT_OBS_RATE
) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """Iterative OBS pruning through increasing sparsities; ``(masks, weights)`` at each one asked for.

    The first step removes up to half of the weights at once, scored by the
    one-shot OBS saliency ``t^2 / [H^-1]_jj`` (all columns share ``H``). Every
    later step removes the fraction ``rate`` of the weights still kept, scored by
    their exact saliency given the current mask, ``w_j^2 / [H_SS^-1]_jj`` (per
    column ``n`` with kept rows ``S``: the increase of ``E`` when ``w_j`` is removed
    and the rest of the column re-fitted), the lowest over the whole layer first;
    the survivors are then re-fitted exactly (:func:`refit_weights`). Removing
    many weights at once from scores computed before the removal is what makes
    one-shot pruning poor at high sparsity; ``rate`` bounds how many go at once
    (smaller: better and slower; a step costs about ``sum_n |S_n|^3``, so the
    steps at high sparsity are cheap). The path stops exactly at every requested
    sparsity, so the result at a sparsity does not depend on the others asked for
    except through the step positions.

    Args:
        problem: the layer's :class:`LayerProblem`.
        sparsities: fractions in ``[0, 1]``, any order.
        rate: fraction of the kept weights removed per step, in ``(0, 1)``.

    Returns:
        One ``(masks, weights)`` per entry of ``sparsities``, in the order given.
    """
    with _blas_threads_for(problem):
        rate = finite_real(rate, "rate")
        if not 0.0 < rate < 1.0:
            raise SettingsError(f"rate must be in (0, 1), got {rate}")
        wanted = [fraction(s, "sparsity") for s in sparsities]
        results: dict[float, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        full = [np.ones(t.shape, dtype=bool) for t in problem.targets]
        for s in wanted:
            if s == 0.0 or problem.n_weights == 0:
                results[s] = (full, [t.copy() for t in problem.targets])
            elif s == 1.0:
                results[s] = ([~m for m in full], [np.zeros(t.shape) for t in problem.targets])
        todo = sorted({s for s in wanted if s not in results})
        if todo:
            keep = max(0.5, 1.0 - todo[0])
            masks = select_mask(problem, 1.0 - keep, "obs")
            fitted = _refit_all_with_saliency(problem, masks)
            for s in todo:
                goal = 1.0 - s
                while keep > goal * (1 + 1e-12):
                    keep = max(goal, keep * (1.0 - rate))
                    # Pruned weights score -inf: they stay pruned and count towards the removed fraction.
                    masks = _mask_from_scores([sal for _, sal in fitted], 1.0 - keep)
                    fitted = _refit_all_with_saliency(problem, masks)
                results[s] = (masks, [w.copy() for w, _ in fitted])
        return [results[s] for s in wanted]


# ---------------------------------------------------------------------------
# Weight sharing


def quantize_layer(
    problem: LayerProblem,
    weights: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    n_clusters: int,
    *,
    refit: bool = True,
    rounds: int = 8,
    init: str = "linear",
    seed: int = 0,
    error_feedback: bool = True,
) -> QuantizedLayer:
    """Share the kept weights among ``n_clusters`` centroids, minimising ``E``.

    Starts from 1-D k-means of the kept values of ``weights`` (nearest-centroid
    assignment). With ``refit`` it then alternates :func:`refit_centroids` and
    :func:`reassign_codes` for at most ``rounds`` rounds, each step accepted only
    if it lowers ``E``; it stops early when a round gains nothing. With
    ``error_feedback`` as well, the alternation is repeated from the assignment
    of :func:`assign_with_error_feedback` (first with the k-means centroids, then
    with the best centroids found, while that lowers ``E``) and the result with
    the lowest ``E`` is returned. ``weights`` should be the unquantized weights
    that minimise ``E`` for ``masks`` (:func:`refit_weights`), which the
    error-feedback start assumes. Pruned weights (``masks`` False) stay exactly zero.

    ``history`` lists ``E`` after the k-means start and after every accepted step
    of the nearest-centroid run, then every lower ``E`` an error-feedback run ended
    with; it never increases.
    """
    masks = _check_masks(masks, problem)
    weights = _blocks(weights, problem)
    n_clusters = _int(n_clusters, "n_clusters", 1)
    rounds = _int(rounds, "rounds", 0)
    if init not in INIT_METHODS:
        raise SettingsError(f"unknown init {init!r}: expected one of {', '.join(INIT_METHODS)}")
    kept_values = np.concatenate([w[m] for w, m in zip(weights, masks)]) if masks else np.empty(0)
    if kept_values.size == 0:
        codes = [np.full(m.shape, -1, dtype=np.int32) for m in masks]
        centroids = np.empty(0)
        error = problem.error([_dequantize(c, centroids) for c in codes])
        return QuantizedLayer(codes, centroids, error, [error])
    clusters = kmeans_1d(kept_values, n_clusters, init=init, seed=seed)
    start_centroids = np.sort(np.asarray(clusters.centroids, dtype=np.float64))
    codes = []
    for w, m in zip(weights, masks):
        c = np.full(m.shape, -1, dtype=np.int32)
        c[m] = assign_to_centroids(w[m], start_centroids)
        codes.append(c)
    error = problem.error([_dequantize(c, start_centroids) for c in codes])
    history = [error]
    if not refit:
        return QuantizedLayer(codes, start_centroids, error, history)
    codes, centroids, error = _alternate(problem, codes, start_centroids, error, rounds, history)
    if error_feedback:
        with single_threaded_blas():
            plans = [_FeedbackPlan(h, m, _FEEDBACK_KEEP_BYTES) for h, m in zip(problem.hessians, masks)]
        feedback_centroids = start_centroids
        for _ in range(_FEEDBACK_RESTARTS):
            trial_codes = _feedback_codes(plans, weights, feedback_centroids)
            trial_error = problem.error([_dequantize(c, feedback_centroids) for c in trial_codes])
            trial_codes, trial_centroids, trial_error = _alternate(
                problem, trial_codes, feedback_centroids, trial_error, rounds, []
            )
            if not _improves(trial_error, error):
                break
            codes, centroids, error = trial_codes, trial_centroids, trial_error
            history.append(error)
            feedback_centroids = centroids
    return QuantizedLayer(codes, centroids, error, history)


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
    alternation of :func:`quantize_layer`, not a minimiser by itself. ``weights``
    should minimise ``E`` for ``masks`` (:func:`refit_weights`): the updates are
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
    return _feedback_codes(plans, weights, centroids)


def refit_centroids(problem: LayerProblem, codes: Sequence[np.ndarray], centroids: np.ndarray) -> np.ndarray:
    """Centroids minimising ``E`` for fixed assignments (the ``k x k`` system ``M mu = r``).

    Clusters no weight is assigned to keep their value. Returns the new
    centroids in the same order (callers re-sort). If the system is singular the
    minimum-norm least-squares solution is used; :func:`quantize_layer` still
    checks that ``E`` went down.
    """
    centroids = np.asarray(centroids, dtype=np.float64).reshape(-1)
    k = centroids.size
    codes = _check_codes(codes, problem, k)
    system = np.zeros((k, k))
    rhs = np.zeros(k)
    for hessian, target, c, cw in zip(problem.hessians, problem.targets, codes, problem.column_weights):
        m_block, r_block = _centroid_system(hessian, target, c, k, cw)
        system += m_block
        rhs += r_block
    used = np.flatnonzero(np.diag(system) > 0)
    result = centroids.copy()
    if used.size == 0:
        return result
    sub = system[np.ix_(used, used)]
    sub = 0.5 * (sub + sub.T)
    try:
        solution = np.linalg.solve(sub, rhs[used])
    except np.linalg.LinAlgError:
        solution = np.linalg.lstsq(sub, rhs[used], rcond=None)[0]
    if np.all(np.isfinite(solution)):
        result[used] = solution
    return result


def reassign_codes(
    problem: LayerProblem, codes: Sequence[np.ndarray], centroids: np.ndarray, *, sweeps: int = 1
) -> list[np.ndarray]:
    """Coordinate descent over the assignments: never increases ``E``.

    Input rows are visited in order; every kept weight of the row moves to the
    centroid that lowers ``E`` most given all other weights (the centroid
    nearest to ``w - R_jn / H_jj``), then the residual ``R = H (W_q - T)`` is
    updated. ``centroids`` must be sorted increasing. Pruned weights stay pruned.
    """
    centroids = np.asarray(centroids, dtype=np.float64).reshape(-1)
    codes = _check_codes(codes, problem, centroids.size)
    sweeps = _int(sweeps, "sweeps", 1)
    if np.any(np.diff(centroids) < 0):
        raise SettingsError("reassign_codes needs centroids sorted in increasing order")
    result = []
    for hessian, target, c in zip(problem.hessians, problem.targets, codes):
        result.append(_reassign_block(hessian, target, c.copy(), centroids, sweeps))
    return result


def fit_layer(
    problem: LayerProblem,
    *,
    sparsity: float,
    bits: int,
    criterion: str = "auto",
    refit_weights_first: bool = True,
    refit_centroids_rounds: int = 8,
    obs_rate: float = DEFAULT_OBS_RATE,
    init: str = "linear",
    seed: int = 0,
    pruned: Mapping[str, tuple[Sequence[np.ndarray], Sequence[np.ndarray]]] | None = None,
) -> LayerFit:
    """Prune, refit and quantize one layer; the whole one-shot recipe.

    Args:
        problem: the layer's :class:`LayerProblem`.
        sparsity: fraction of the layer's weights removed, ``[0, 1]``.
        bits: at most ``2**bits`` shared values (1..8).
        criterion: one of :data:`CRITERIA`, or ``"auto"``: prune with each, re-fit,
            and quantize the one whose pruned weights have the lowest ``E``.
        refit_weights_first: re-fit the surviving weights (:func:`refit_weights`)
            before clustering; ``obs`` always re-fits.
        refit_centroids_rounds: rounds of centroid refit + re-assignment
            (0: plain k-means, as without calibration).
        obs_rate: step size of :func:`pruning_path` for ``obs``.
        init, seed: the k-means initialisation (see :mod:`onnx_dc.clustering`).
        pruned: optional precomputed ``(masks, weights)`` per criterion at this
            sparsity (e.g. from one :func:`pruning_path` for several sparsities);
            criteria not in it are computed.
    """
    with _blas_threads_for(problem):
        sparsity = fraction(sparsity, "sparsity")
        bits = _int(bits, "bits", 1)
        if bits > 8:
            raise SettingsError(f"bits must be in [1, 8], got {bits}")
        candidates = CRITERIA if criterion == "auto" else (criterion,)
        for name in candidates:
            _check_criterion(name)
        # Every criterion gives a mask and re-fitted weights; the one with the lowest E
        # after pruning is quantized (identical masks, e.g. at sparsity 0, count once).
        best_pruned: tuple[float, str, list[np.ndarray], list[np.ndarray]] | None = None
        errors: dict[str, float] = {}
        seen: list[list[np.ndarray]] = []
        for name in candidates:
            if pruned is not None and name in pruned:
                masks, weights = (list(x) for x in pruned[name])
            elif name == "obs":
                masks, weights = prune_iteratively(problem, sparsity, rate=obs_rate)
            else:
                masks = select_mask(problem, sparsity, name)
                if any(all(np.array_equal(a, b) for a, b in zip(masks, other)) for other in seen):
                    continue
                weights = refit_weights(problem, masks) if refit_weights_first else [
                    t * m for t, m in zip(problem.targets, masks)
                ]
            seen.append(masks)
            errors[name] = problem.error(weights)
            if best_pruned is None or errors[name] < best_pruned[0]:
                best_pruned = (errors[name], name, masks, weights)
        assert best_pruned is not None
        _, name, masks, weights = best_pruned
        quantized = quantize_layer(
            problem, weights, masks, 2**bits, refit=refit_centroids_rounds > 0,
            rounds=refit_centroids_rounds, init=init, seed=seed,
        )
        return LayerFit(name, masks, quantized, quantized.error, problem.relative_error(quantized.weights), errors)


# ---------------------------------------------------------------------------
# Internals


def _quadratic(matrix: np.ndarray, d: np.ndarray, column_weights: np.ndarray | None = None) -> float:
    """tr(d^T matrix d), or sum_n s_n d_n^T matrix d_n with column weights ``s``."""
    if d.size == 0:
        return 0.0
    if column_weights is None:
        return float(np.sum(d * (matrix @ d)))
    return float(np.sum(d * (matrix @ d) * column_weights[None, :]))


def _check_column_weights(weights: np.ndarray | None, n_columns: int, block: int) -> np.ndarray | None:
    if weights is None:
        return None
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    if weights.size != n_columns:
        raise InvalidTensorError(f"block {block}: {weights.size} column weights for {n_columns} columns")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise InvalidTensorError(f"block {block}: column weights must be finite and >= 0")
    return weights


def _blocks(weights: Sequence[np.ndarray], problem: LayerProblem) -> list[np.ndarray]:
    if isinstance(weights, np.ndarray):
        weights = [weights]
    if len(weights) != problem.n_blocks:
        raise InvalidTensorError(f"expected {problem.n_blocks} weight block(s), got {len(weights)}")
    result = []
    for g, (w, t) in enumerate(zip(weights, problem.targets)):
        w = np.asarray(w, dtype=np.float64)
        if w.shape != t.shape:
            raise InvalidTensorError(f"block {g}: weights of shape {w.shape}, expected {t.shape}")
        result.append(w)
    return result


def _check_masks(masks: Sequence[np.ndarray], problem: LayerProblem) -> list[np.ndarray]:
    if isinstance(masks, np.ndarray):
        masks = [masks]
    if len(masks) != problem.n_blocks:
        raise SettingsError(f"expected {problem.n_blocks} mask(s), got {len(masks)}")
    result = []
    for g, (m, t) in enumerate(zip(masks, problem.targets)):
        m = np.asarray(m)
        if m.dtype != np.bool_ or m.shape != t.shape:
            raise SettingsError(f"block {g}: mask must be bool of shape {t.shape}, got {m.dtype} {m.shape}")
        result.append(m)
    return result


def _check_codes(codes: Sequence[np.ndarray], problem: LayerProblem, k: int) -> list[np.ndarray]:
    if isinstance(codes, np.ndarray):
        codes = [codes]
    if len(codes) != problem.n_blocks:
        raise SettingsError(f"expected {problem.n_blocks} code block(s), got {len(codes)}")
    result = []
    for g, (c, t) in enumerate(zip(codes, problem.targets)):
        c = np.asarray(c)
        if c.shape != t.shape or c.dtype.kind not in "iu":
            raise SettingsError(f"block {g}: codes must be integers of shape {t.shape}")
        if c.size and (c.min() < -1 or c.max() >= k):
            raise SettingsError(f"block {g}: codes must be in [-1, {k})")
        result.append(c.astype(np.int32, copy=False))
    return result


def _check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise SettingsError(f"unknown pruning criterion {criterion!r}: expected one of {', '.join(CRITERIA)} or auto")


def _mask_from_scores(scores: Sequence[np.ndarray], sparsity: float) -> list[np.ndarray]:
    sparsity = fraction(sparsity, "sparsity")
    sizes = [s.size for s in scores]
    if sum(sizes) == 0:
        return [np.ones(s.shape, dtype=bool) for s in scores]
    flat = np.concatenate([s.reshape(-1) for s in scores])
    # prune_by_score wants finite scores: map -inf (already pruned) below everything else.
    finite = np.isfinite(flat)
    if not np.all(finite):
        floor = (np.min(flat[finite]) if np.any(finite) else 0.0) - 1.0
        flat = np.where(finite, flat, floor)
    keep = prune_by_score(flat, sparsity)
    masks, start = [], 0
    for s in scores:
        masks.append(keep[start : start + s.size].reshape(s.shape))
        start += s.size
    return masks


def _inverse_spd(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive-definite matrix (pseudo-inverse if it is singular)."""
    if matrix.size == 0:
        return matrix.copy()
    try:
        np.linalg.cholesky(matrix)  # cheap check of positive definiteness
        inverse = np.linalg.inv(matrix)
        return 0.5 * (inverse + inverse.T)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(matrix, hermitian=True)


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limit BLAS to one thread inside the block (loops of small matrix operations).

    Many small products and factorisations are slower multi-threaded (thread
    start-up and, on a busy machine, threads spinning for a core): on 2 shared
    cores the Gram updates of depthwise convolutions ran 10x slower with two
    BLAS threads. threadpoolctl comes with scikit-learn; without it this does nothing.
    """
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


_SMALL_BLOCK_INPUTS = 512  # below this block width, one BLAS thread is faster (many small operations)


def _blas_threads_for(problem: LayerProblem) -> contextlib.AbstractContextManager:
    """One BLAS thread for layers whose blocks are all narrow; the default threading otherwise."""
    if max(g.shape[0] for g in problem.grams) < _SMALL_BLOCK_INPUTS:
        return single_threaded_blas()
    return contextlib.nullcontext()


_BLAS_CONTROLLERS: list = []


def _blas_controller():
    """threadpoolctl's controller, found once (its scan of the loaded libraries costs milliseconds)."""
    if not _BLAS_CONTROLLERS:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - scikit-learn depends on it
            _BLAS_CONTROLLERS.append(None)
        else:
            _BLAS_CONTROLLERS.append(ThreadpoolController())
    return _BLAS_CONTROLLERS[0]


def _solve_spd(matrix: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        lower = np.linalg.cholesky(matrix)
        return np.linalg.solve(lower.T, np.linalg.solve(lower, rhs))
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(matrix, rhs, rcond=None)[0]


def _column_groups(mask: np.ndarray) -> list[np.ndarray]:
    """Indices of the columns of ``mask``, grouped by identical column masks."""
    if mask.shape[1] == 0:
        return []
    packed = np.packbits(mask, axis=0)  # [ceil(K/8), N]
    _, inverse = np.unique(packed.T, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    return np.split(order, bounds)


def _refit_block(hessian: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    result = np.zeros(target.shape)
    if target.size == 0:
        return result
    ht = hessian @ target
    with single_threaded_blas():
        for columns in _column_groups(mask):
            rows = np.flatnonzero(mask[:, columns[0]])
            if rows.size == 0:
                continue
            sub = hessian[np.ix_(rows, rows)]
            result[np.ix_(rows, columns)] = _solve_spd(sub, ht[np.ix_(rows, columns)])
    return result


def _refit_with_saliency(hessian: np.ndarray, target: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_refit_block` plus the exact OBS saliency of every kept weight (``-inf`` where pruned).

    One inverse of ``H_SS`` per distinct column mask serves both: ``w_S = H_SS^-1 (H t)_S``
    and saliency ``w_j^2 / [H_SS^-1]_jj``.
    """
    weights = np.zeros(target.shape)
    scores = np.full(target.shape, -np.inf)
    if target.size == 0:
        return weights, scores
    ht = hessian @ target
    with single_threaded_blas():
        for columns in _column_groups(mask):
            rows = np.flatnonzero(mask[:, columns[0]])
            if rows.size == 0:
                continue
            inverse = _inverse_spd(hessian[np.ix_(rows, rows)])
            w = inverse @ ht[np.ix_(rows, columns)]
            weights[np.ix_(rows, columns)] = w
            scores[np.ix_(rows, columns)] = w * w / np.diag(inverse)[:, None]
    return weights, scores


def _refit_all_with_saliency(problem: LayerProblem, masks: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`_refit_with_saliency` of every block, saliencies scaled by the column weights."""
    fitted = []
    for h, t, m, cw in zip(problem.hessians, problem.targets, masks, problem.column_weights):
        weights, scores = _refit_with_saliency(h, t, m)
        if cw is not None:
            scores = np.where(np.isfinite(scores), scores * cw[None, :], scores)
        fitted.append((weights, scores))
    return fitted


def _dequantize(codes: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    result = np.zeros(codes.shape)
    kept = codes >= 0
    if np.any(kept):
        result[kept] = centroids[codes[kept]]
    return result


def _sorted_codebook(codes: list[np.ndarray], centroids: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    order = np.argsort(centroids, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    new_codes = []
    for c in codes:
        n = c.copy()
        kept = c >= 0
        n[kept] = rank[c[kept]]
        new_codes.append(n)
    return new_codes, centroids[order]


def _alternate(
    problem: LayerProblem, codes: list[np.ndarray], centroids: np.ndarray, error: float, rounds: int,
    history: list[float],
) -> tuple[list[np.ndarray], np.ndarray, float]:
    """Alternate centroid refit and re-assignment from ``codes``; accepted errors appended to ``history``."""
    for _ in range(rounds):
        start = error
        new_centroids = refit_centroids(problem, codes, centroids)
        new_error = problem.error([_dequantize(c, new_centroids) for c in codes])
        if _improves(new_error, error):
            centroids, error = new_centroids, new_error
            codes, centroids = _sorted_codebook(codes, centroids)
            history.append(error)
        new_codes = reassign_codes(problem, codes, centroids)
        new_error = problem.error([_dequantize(c, centroids) for c in new_codes])
        if _improves(new_error, error):
            codes, error = new_codes, new_error
            history.append(error)
        if not error < start * (1.0 - _ROUND_RTOL):
            break
    return codes, centroids, error


class _FeedbackPlan:
    """Row orders and Cholesky factors of one block's column groups, for rounding it repeatedly.

    Columns with the same mask form one group (one factor, all columns rounded
    together); single-column groups (sparse layers: every column its own mask)
    are batched, padded to a common size: padded rows have an identity factor
    and feed nothing back. The factors are kept between roundings when they take
    at most ``keep_bytes``, and recomputed for every rounding otherwise.
    """

    def __init__(self, hessian: np.ndarray, mask: np.ndarray, keep_bytes: int) -> None:
        self.hessian = hessian
        self.shape = mask.shape
        diag = np.diag(hessian)
        groups = []
        for columns in _column_groups(mask):
            rows = np.flatnonzero(mask[:, columns[0]])
            if rows.size:
                groups.append((rows[np.argsort(-diag[rows], kind="stable")], columns))
        self.batches: list[list[tuple[np.ndarray, np.ndarray]]] = [[g] for g in groups if g[1].size > 1]
        singles = sorted((g for g in groups if g[1].size == 1), key=lambda g: g[0].size)
        start = 0
        while start < len(singles):
            stop = start + 1
            while stop < len(singles) and (stop - start + 1) * singles[stop][0].size ** 2 * 8 <= _FEEDBACK_BATCH_BYTES:
                stop += 1
            self.batches.append(singles[start:stop])
            start = stop
        factor_bytes = sum(len(b) * b[-1][0].size ** 2 * 8 for b in self.batches)
        self.factors = [self._factor(b) for b in self.batches] if factor_bytes <= keep_bytes else None

    def _factor(self, batch: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        size = max(rows.size for rows, _ in batch)
        padded = np.broadcast_to(np.eye(size), (len(batch), size, size)).copy()
        for b, (rows, _) in enumerate(batch):
            padded[b, : rows.size, : rows.size] = self.hessian[np.ix_(rows, rows)]
        return _feedback_factor(padded)

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


def _feedback_codes(
    plans: Sequence[_FeedbackPlan], weights: Sequence[np.ndarray], centroids: np.ndarray
) -> list[np.ndarray]:
    mid = 0.5 * centroids[:-1] + 0.5 * centroids[1:]
    with single_threaded_blas():
        return [plan.codes(w, centroids, mid) for plan, w in zip(plans, weights)]


def _feedback_factor(stack: np.ndarray) -> np.ndarray:
    """Upper Cholesky factors ``U`` of ``H^-1`` (``H^-1 = U^T U``) of a stack of matrices ``[B, s, s]``.

    A matrix that is not positive definite gets the identity: its weights are
    rounded without compensation.
    """
    try:
        factors = np.swapaxes(np.linalg.cholesky(np.linalg.inv(stack)), -1, -2)
        ok = np.all(np.isfinite(factors), axis=(1, 2))
    except np.linalg.LinAlgError:
        factors = np.empty_like(stack)
        ok = np.zeros(len(stack), dtype=bool)
        for b, h in enumerate(stack):
            try:
                factors[b] = np.linalg.cholesky(np.linalg.inv(h)).T
                ok[b] = np.all(np.isfinite(factors[b]))
            except np.linalg.LinAlgError:
                pass
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


def _improves(new: float, old: float) -> bool:
    return new < old - _IMPROVEMENT_RTOL * max(abs(old), 1e-300)


def _centroid_system(
    hessian: np.ndarray, target: np.ndarray, codes: np.ndarray, k: int, column_weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(M, r)`` of one block: ``M_cd = tr(A_c^T H A_d S)``, ``r_c = tr(A_c^T H T S)`` (``S`` = diag(column weights))."""
    kept = codes >= 0
    system = np.zeros((k, k))
    if not np.any(kept):
        return system, np.zeros(k)
    ht = hessian @ target
    if column_weights is not None:
        ht = ht * column_weights[None, :]
    rhs = np.bincount(codes[kept], weights=ht[kept], minlength=k)[:k]
    n_rows, n_cols = codes.shape
    per_column = np.count_nonzero(kept, axis=0).astype(np.float64)
    # Measured costs: k products H @ A_d (BLAS) against one gather of H_SS and a
    # small product per column (dominated by the gather and per-column overhead).
    dense_seconds = 1.5e-10 * k * n_rows * n_rows * n_cols
    sparse_seconds = 1.5e-8 * float(np.sum(per_column**2)) + 2e-4 * n_cols
    if dense_seconds <= sparse_seconds:
        flat_codes = codes[kept]
        if codes.size * k <= _ONEHOT_MAX_ELEMENTS:
            # Small blocks (e.g. depthwise convolutions): all centroids in one product.
            onehot = np.zeros((codes.size, k))
            onehot[np.flatnonzero(kept.reshape(-1)), flat_codes] = 1.0  # rows (j, n) in C order
            product = (hessian @ onehot.reshape(n_rows, n_cols * k)).reshape(n_rows * n_cols, k)
            if column_weights is not None:
                product *= np.tile(column_weights, n_rows)[:, None]  # rows (j, n) in C order
            system = onehot.T @ product
        else:
            for d in np.unique(flat_codes):
                product = hessian @ (codes == d).astype(np.float64)
                if column_weights is not None:
                    product *= column_weights[None, :]
                system[:, d] = np.bincount(flat_codes, weights=product[kept], minlength=k)[:k]
    else:
        with single_threaded_blas():
            for n in range(n_cols):
                rows = np.flatnonzero(kept[:, n])
                if rows.size == 0:
                    continue
                onehot = np.zeros((rows.size, k))
                onehot[np.arange(rows.size), codes[rows, n]] = 1.0
                scale = 1.0 if column_weights is None else column_weights[n]
                system += scale * (onehot.T @ (hessian[np.ix_(rows, rows)] @ onehot))
    return 0.5 * (system + system.T), rhs


def _reassign_block(
    hessian: np.ndarray, target: np.ndarray, codes: np.ndarray, centroids: np.ndarray, sweeps: int
) -> np.ndarray:
    if centroids.size == 0 or not np.any(codes >= 0):
        return codes
    values = _dequantize(codes, centroids)
    residual = hessian @ (values - target)
    mid = 0.5 * centroids[:-1] + 0.5 * centroids[1:]
    diag = np.diag(hessian)
    for _ in range(sweeps):
        changed_any = False
        for j in range(codes.shape[0]):
            h_jj = diag[j]
            if h_jj <= 0:
                continue
            cols = np.flatnonzero(codes[j] >= 0)
            if cols.size == 0:
                continue
            current = values[j, cols]
            optimum = current - residual[j, cols] / h_jj
            new = np.searchsorted(mid, optimum, side="left")
            delta = centroids[new] - current
            gain = 2.0 * delta * residual[j, cols] + delta * delta * h_jj  # change of E, <= 0 up to rounding
            move = (delta != 0) & (gain < 0)
            if not np.any(move):
                continue
            cols, new, delta = cols[move], new[move], delta[move]
            codes[j, cols] = new
            values[j, cols] += delta
            residual[:, cols] += np.outer(hessian[:, j], delta)
            changed_any = True
        if not changed_any:
            break
    return codes


def _int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (Integral, np.integer)):
        raise SettingsError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise SettingsError(f"{name} must be >= {low}, got {value}")
    return int(value)
