"""Calibrated weight sharing: a layer's codebook and assignments fitted to its outputs.

:func:`quantize_layer` starts from 1-D k-means of the kept weights and
alternates :func:`refit_centroids` (the ``k x k`` least-squares system of the
centroids, assignments fixed) and :func:`reassign_codes` (coordinate descent
over the assignments), from two starts: nearest-centroid assignment and
:func:`assign_with_error_feedback` (sequential rounding with error feedback,
as Optimal Brain Quantization / GPTQ, onto the shared codebook). Each step is
accepted only when it lowers the layer's error. :func:`fit_layer` is the whole
per-layer recipe: pruning (:mod:`onnx_dc.calibration.pruning_fit`), then this.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from onnx_dc.calibration import error_feedback as feedback_rounding  # (quantize_layer has an error_feedback flag)
from onnx_dc.calibration.error_feedback import assign_with_error_feedback
from onnx_dc.calibration.layer_problem import (
    CRITERIA,
    LayerFit,
    LayerProblem,
    QuantizedLayer,
    _blas_threads_for,
    _blocks,
    _check_codes,
    _check_criterion,
    _check_masks,
    _dequantize,
    _int,
    map_columns,
    single_threaded_blas,
)
from onnx_dc.calibration.pruning_fit import (
    DEFAULT_OBS_RATE,
    prune_iteratively,
    refit_weights,
    select_mask,
)
from onnx_dc.codec._checks import fraction
from onnx_dc.codec.clustering import INIT_METHODS, assign_to_centroids, kmeans_1d
from onnx_dc.errors import SettingsError

__all__ = [
    "assign_with_error_feedback",
    "fit_layer",
    "quantize_layer",
    "reassign_codes",
    "refit_centroids",
]


_IMPROVEMENT_RTOL = 1e-9  # a step must lower E by more than this (relative) to count
_ONEHOT_MAX_ELEMENTS = 1 << 18  # _centroid_system builds the one-hot matrix of blocks up to this size
_SYSTEM_CHUNK_COLUMNS = 8  # columns summed per piece of the per-column centroid system (a fixed order)
_PAIR_SUMS_MAX_ENTRIES = 1 << 22  # _small_blocks_system's pairs (G K^2 N) at most; larger layers go block by block
_UPDATE_MAX_CHANGED = 0.25  # _CentroidSystems updates M when at most this fraction of a block's codes changed
_REASSIGN_ROWS = 32  # rows whose coordinate moves reassign_codes computes together
_ROUND_RTOL = 1e-3  # quantize_layer stops when a whole round gains less than this (relative)
_FEEDBACK_RESTARTS = 3  # error-feedback starts quantize_layer tries at most (each from the best codebook so far)
_FEEDBACK_ONLY_CLUSTERS = 128  # from this many: one error-feedback rounding, then re-assignments (quantize_layer)


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
    the lowest ``E`` is returned. From :data:`_FEEDBACK_ONLY_CLUSTERS` centroids
    (7-8 bits) one error-feedback rounding of the k-means centroids is followed by
    re-assignments alone: no nearest-centroid run (unless error feedback never
    lowers ``E``), no centroid refits, no restarts. On the real layers measured
    at 7-8 bits the error-feedback rounding alone ended lower than the whole
    nearest-centroid run, and the refits and restarts lowered ``E`` by 0.12-0.33 %
    at up to half of the layer's fitting time (docs/CALIBRATION.md); at fewer
    bits the nearest-centroid run sometimes wins. ``weights`` should be the
    unquantized weights that minimise ``E`` for ``masks`` (:func:`refit_weights`), which the
    error-feedback start assumes. Pruned weights (``masks`` False) stay exactly zero.

    ``history`` lists ``E`` after the k-means start and after every accepted step
    of the nearest-centroid run (when it runs first), then every lower ``E`` an
    error-feedback run ended with (then the nearest-centroid run's, in the fallback
    above); it never increases.
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
    feedback_only = error_feedback and n_clusters >= _FEEDBACK_ONLY_CLUSTERS
    if not feedback_only:
        codes, centroids, error = _alternate(problem, codes, start_centroids, error, rounds, history)
    if error_feedback:
        plans = feedback_rounding.feedback_plans(problem, masks, one_rounding=feedback_only)
        feedback_centroids = start_centroids
        for _ in range(1 if feedback_only else _FEEDBACK_RESTARTS):
            trial_codes = feedback_rounding.feedback_codes(plans, weights, feedback_centroids)
            trial_error = problem.error([_dequantize(c, feedback_centroids) for c in trial_codes])
            trial_codes, trial_centroids, trial_error = _alternate(
                problem, trial_codes, feedback_centroids, trial_error, rounds, [], refit_centroids=not feedback_only
            )
            if not _improves(trial_error, error):
                break
            codes, centroids, error = trial_codes, trial_centroids, trial_error
            history.append(error)
            feedback_centroids = centroids
        if feedback_only and len(history) == 1:  # error feedback never lowered E: the nearest-centroid run after all
            codes, centroids, error = _alternate(problem, codes, start_centroids, error, rounds, history)
    return QuantizedLayer(codes, centroids, error, history)


def refit_centroids(problem: LayerProblem, codes: Sequence[np.ndarray], centroids: np.ndarray) -> np.ndarray:
    """Centroids minimising ``E`` for fixed assignments (the ``k x k`` system ``M mu = r``).

    Clusters no weight is assigned to keep their value. Returns the new
    centroids in the same order (callers re-sort). If the system is singular the
    minimum-norm least-squares solution is used; :func:`quantize_layer` still
    checks that ``E`` went down.
    """
    return _CentroidSystems(problem).refit(codes, centroids)


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
        init, seed: the k-means initialisation (see :mod:`onnx_dc.codec.clustering`).
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
            if len(candidates) == 1:  # nothing to compare: E after pruning is not needed (a K^2 N product)
                best_pruned = (math.nan, name, masks, weights)
                continue
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




def _sorted_codebook(
    codes: list[np.ndarray], centroids: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Codes and centroids with the centroids sorted increasing, and ``rank`` (old code -> new code)."""
    order = np.argsort(centroids, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return [_relabelled(c, rank) for c in codes], centroids[order], rank


def _relabelled(codes: np.ndarray, rank: np.ndarray) -> np.ndarray:
    new = codes.copy()
    kept = codes >= 0
    new[kept] = rank[codes[kept]]
    return new


class _CentroidSystems:
    """The blocks' centroid systems ``M`` of the last refit and the codes they were built for.

    A refit after few changed assignments (the next round of :func:`_alternate`,
    after :func:`reassign_codes`) updates ``M`` from the changed weights alone
    (:func:`_centroid_system_change`, work proportional to their number times
    ``K k``) instead of rebuilding it (``k`` products of ``H`` with ``K x N``
    matrices); the right-hand sides are recomputed (one pass over the codes).
    """

    def __init__(self, problem: LayerProblem) -> None:
        self.problem = problem
        self.codes: list[np.ndarray] | None = None
        self.matrices: list[np.ndarray] = []

    def refit(self, codes: Sequence[np.ndarray], centroids: np.ndarray) -> np.ndarray:
        """:func:`refit_centroids` of ``codes``, from the systems kept since the last call when that is cheaper."""
        problem = self.problem
        centroids = np.asarray(centroids, dtype=np.float64).reshape(-1)
        k = centroids.size
        codes = _check_codes(codes, problem, k)
        if _pair_sums_apply(problem):
            system, rhs = _small_blocks_system(problem, codes, k)
            return _solve_centroids(system, rhs, centroids)
        blocks = zip(problem.hessians, problem.targets, codes, problem.column_weights, problem.hessian_targets())
        previous = self.codes if self.codes is not None and self.matrices[0].shape[0] == k else None
        matrices, system, rhs = [], np.zeros((k, k)), np.zeros(k)
        for b, (hessian, target, c, cw, ht) in enumerate(blocks):
            old = previous[b] if previous is not None else None
            if (old is not None and np.count_nonzero(old != c) <= _UPDATE_MAX_CHANGED * c.size
                    and np.array_equal(old < 0, c < 0)):
                m_block = self.matrices[b] + _centroid_system_change(hessian, old, c, k, cw)
                r_block = _centroid_rhs(hessian, target, c, k, cw, ht)
            else:
                m_block, r_block = _centroid_system(hessian, target, c, k, cw, hessian_target=ht)
            matrices.append(m_block)
            system += m_block
            rhs += r_block
        self.codes, self.matrices = [c.copy() for c in codes], matrices
        return _solve_centroids(system, rhs, centroids)

    def relabel(self, rank: np.ndarray) -> None:
        """Follow a renumbering of the codes (old code ``c`` is now ``rank[c]``)."""
        if self.codes is None:
            return
        self.codes = [_relabelled(c, rank) for c in self.codes]
        order = np.argsort(rank)
        self.matrices = [m[np.ix_(order, order)] for m in self.matrices]


def _pair_sums_apply(problem: LayerProblem) -> bool:
    """Whether :func:`_small_blocks_system` serves ``problem``: several blocks of one shape (grouped and depthwise
    convolutions), ``G K^2 N`` at most :data:`_PAIR_SUMS_MAX_ENTRIES`."""
    shapes = {t.shape for t in problem.targets}
    if len(problem.targets) < 2 or len(shapes) != 1:
        return False
    (n_rows, n_cols), = shapes
    return len(problem.targets) * n_rows * n_rows * n_cols <= _PAIR_SUMS_MAX_ENTRIES


def _small_blocks_system(problem: LayerProblem, codes: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(M, r)`` summed over many small blocks at once: ``M_cd`` adds ``s_n H_ij`` over every block, column ``n``
    and pair of kept rows ``(i, j)`` with codes ``(c, d)`` (one ``bincount`` over all pairs, instead of a
    ``k x k`` system per block; a depthwise convolution has hundreds of 25-input blocks)."""
    hessians = np.stack(problem.hessians)  # [G, K, K]
    stacked = np.stack(codes)  # [G, K, N]
    weights = np.stack([np.ones(stacked.shape[2]) if w is None else w for w in problem.column_weights])  # [G, N]
    pairs = stacked[:, :, None, :] * k + stacked[:, None, :, :]  # [G, K, K, N]
    kept = (stacked[:, :, None, :] >= 0) & (stacked[:, None, :, :] >= 0)
    values = hessians[..., None] * weights[:, None, None, :]
    system = np.bincount(pairs[kept], weights=values[kept], minlength=k * k)[: k * k].reshape(k, k)
    targets = np.stack(problem.hessian_targets())  # H T S per block, [G, K, N]
    rhs = np.bincount(stacked[stacked >= 0], weights=targets[stacked >= 0], minlength=k)[:k]
    return 0.5 * (system + system.T), rhs


def _solve_centroids(system: np.ndarray, rhs: np.ndarray, centroids: np.ndarray) -> np.ndarray:
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


def _alternate(
    problem: LayerProblem, codes: list[np.ndarray], centroids: np.ndarray, error: float, rounds: int,
    history: list[float], *, refit_centroids: bool = True,
) -> tuple[list[np.ndarray], np.ndarray, float]:
    """Alternate centroid refit and re-assignment from ``codes``; accepted errors appended to ``history``.

    Without ``refit_centroids`` only the re-assignments run (the centroids stay).
    """
    systems = _CentroidSystems(problem) if refit_centroids else None
    for _ in range(rounds):
        start = error
        if systems is not None:
            new_centroids = systems.refit(codes, centroids)
            new_error = problem.error([_dequantize(c, new_centroids) for c in codes])
            if _improves(new_error, error):
                centroids, error = new_centroids, new_error
                codes, centroids, rank = _sorted_codebook(codes, centroids)
                systems.relabel(rank)
                history.append(error)
        new_codes = reassign_codes(problem, codes, centroids)
        new_error = problem.error([_dequantize(c, centroids) for c in new_codes])
        if _improves(new_error, error):
            codes, error = new_codes, new_error
            history.append(error)
        if not error < start * (1.0 - _ROUND_RTOL):
            break
    return codes, centroids, error


def _improves(new: float, old: float) -> bool:
    return new < old - _IMPROVEMENT_RTOL * max(abs(old), 1e-300)


def _centroid_system(
    hessian: np.ndarray, target: np.ndarray, codes: np.ndarray, k: int, column_weights: np.ndarray | None = None,
    *, hessian_target: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(M, r)`` of one block: ``M_cd = tr(A_c^T H A_d S)``, ``r_c = tr(A_c^T H T S)`` (``S`` = diag(column weights)).

    ``hessian_target``: ``H T S`` when already known (:meth:`LayerProblem.hessian_targets`).
    """
    kept = codes >= 0
    system = np.zeros((k, k))
    if not np.any(kept):
        return system, np.zeros(k)
    rhs = _centroid_rhs(hessian, target, codes, k, column_weights, hessian_target)
    n_rows, n_cols = codes.shape
    if not _per_column_is_cheaper(k, n_rows, np.count_nonzero(kept, axis=0)):
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
        chunks = [range(n, min(n_cols, n + _SYSTEM_CHUNK_COLUMNS)) for n in range(0, n_cols, _SYSTEM_CHUNK_COLUMNS)]
        for part in map_columns(lambda chunk: _per_column_system(hessian, codes, k, column_weights, chunk), chunks):
            system += part  # in chunk order, whatever the threads
    return 0.5 * (system + system.T), rhs


def _per_column_system(
    hessian: np.ndarray, codes: np.ndarray, k: int, column_weights: np.ndarray | None, columns: range
) -> np.ndarray:
    """``sum_n s_n B_n^T H_SS B_n`` over ``columns``: per column, ``H_SS`` with its rows and columns in code
    order, summed over each code's run."""
    system = np.zeros((k, k))
    for n in columns:
        rows = np.flatnonzero(codes[:, n] >= 0)
        if rows.size == 0:
            continue
        order = rows[np.argsort(codes[rows, n], kind="stable")]
        sorted_codes = codes[order, n]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
        block = np.add.reduceat(np.add.reduceat(hessian[np.ix_(order, order)], starts, axis=1), starts, axis=0)
        used = sorted_codes[starts]
        system[np.ix_(used, used)] += block if column_weights is None else column_weights[n] * block
    return system


def _per_column_is_cheaper(k: int, n_rows: int, kept_per_column: np.ndarray) -> bool:
    """Whether :func:`_centroid_system` should sum ``H_SS`` by code column by column rather than take ``k``
    dense products ``H A_d``: measured costs, BLAS products against one gather of ``H_SS`` per column."""
    dense_seconds = 1.5e-10 * k * n_rows * n_rows * kept_per_column.size
    per_column_seconds = 9e-9 * float(np.sum(kept_per_column.astype(np.float64) ** 2)) + 2e-4 * kept_per_column.size
    return per_column_seconds < dense_seconds


def _centroid_rhs(
    hessian: np.ndarray, target: np.ndarray, codes: np.ndarray, k: int, column_weights: np.ndarray | None,
    hessian_target: np.ndarray | None,
) -> np.ndarray:
    """``r_c = tr(A_c^T H T S)`` of one block (``hessian_target``: ``H T S`` when already known)."""
    kept = codes >= 0
    ht = hessian_target
    if ht is None:
        ht = hessian @ target
        if column_weights is not None:
            ht = ht * column_weights[None, :]
    return np.bincount(codes[kept], weights=ht[kept], minlength=k)[:k]


def _centroid_system_change(
    hessian: np.ndarray, old: np.ndarray, new: np.ndarray, k: int, column_weights: np.ndarray | None
) -> np.ndarray:
    """``M(new) - M(old)`` of one block whose codes changed at a few kept weights (the mask is the same).

    With ``B_n`` the one-hot assignments of column ``n`` and ``D_n = B'_n - B_n``,
    ``B'^T H B' - B^T H B = sum_n s_n (D_n^T H B'_n + B_n^T H D_n)``; ``D_n`` has
    two entries per changed weight, and ``H B'_n = H B_n + H D_n``: column ``n`` costs one product
    of the changed rows of ``H`` with ``B_n`` (``|changed| K k``).
    """
    change = np.zeros((k, k))
    one_hot = np.vstack([np.eye(k), np.zeros((1, k))])  # code -1 (a pruned weight): zeros
    with single_threaded_blas():  # many small products
        for n in np.flatnonzero(np.any(old != new, axis=0)):
            rows = np.flatnonzero(old[:, n] != new[:, n])
            h_rows = hessian[rows]
            before = h_rows @ one_hot[old[:, n]]  # H_j B_n for the changed rows j
            moved = one_hot[new[rows, n]] - one_hot[old[rows, n]]  # D_n on those rows
            after = before + hessian[np.ix_(rows, rows)] @ moved  # H_j B'_n = H_j (B_n + D_n)
            column = moved.T @ after + before.T @ moved
            change += column if column_weights is None else column_weights[n] * column
    return 0.5 * (change + change.T)


def _reassign_block(
    hessian: np.ndarray, target: np.ndarray, codes: np.ndarray, centroids: np.ndarray, sweeps: int
) -> np.ndarray:
    """One block of :func:`reassign_codes`: its row-by-row coordinate descent, visiting only rows that move.

    A row moves its weights by the residual ``R`` as the rows before it left it.
    The rows are taken :data:`_REASSIGN_ROWS` at a time: the moves of all of
    them are computed at once from ``R``; after row ``j`` moves the weights of
    columns ``C``, only ``R[:, C]`` changed, so only the moves of the group's
    later rows in ``C`` are computed again. The rows that move are updated with
    the arithmetic of a plain row-by-row sweep (the same operations on the same
    values), so the codes are those of visiting every row in turn.
    """
    if centroids.size == 0 or not np.any(codes >= 0):
        return codes
    values = _dequantize(codes, centroids)
    # R^T, one row per output column: the update of the columns a row moves is then
    # a product added to whole rows of memory (the same products and sums as on R).
    residual_t = np.ascontiguousarray((hessian @ (values - target)).T)
    mid = 0.5 * centroids[:-1] + 0.5 * centroids[1:]
    diag = np.diag(hessian)
    movable = (codes >= 0) & (diag > 0)[:, None]
    n_rows = codes.shape[0]
    for _ in range(sweeps):
        changed_any = False
        for begin in range(0, n_rows, _REASSIGN_ROWS):
            group = slice(begin, min(n_rows, begin + _REASSIGN_ROWS))
            moves, new_codes = _coordinate_moves(
                residual_t[:, group].T, values[group], diag[group], movable[group], centroids, mid
            )
            moves_per_row = np.count_nonzero(moves, axis=1)
            row = -1
            while True:
                later = np.flatnonzero(moves_per_row[row + 1 :])
                if later.size == 0:
                    break
                row += 1 + int(later[0])
                j = begin + row
                cols = np.flatnonzero(moves[row])
                new = new_codes[row, cols]
                delta = centroids[new] - values[j, cols]
                codes[j, cols] = new
                values[j, cols] += delta
                residual_t[cols] += np.outer(delta, hessian[:, j])
                changed_any = True
                if row + 1 == moves.shape[0]:
                    break
                below = slice(row + 1, None)
                rows_below = slice(j + 1, group.stop)
                moves[below, cols], new_codes[below, cols] = _coordinate_moves(
                    residual_t[cols, rows_below].T, values[rows_below, cols], diag[rows_below],
                    movable[rows_below, cols], centroids, mid,
                )
                moves_per_row[below] = np.count_nonzero(moves[below], axis=1)
        if not changed_any:
            break
    return codes


def _coordinate_moves(
    residual: np.ndarray, values: np.ndarray, diag: np.ndarray, movable: np.ndarray, centroids: np.ndarray,
    mid: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Which weights move, and to which code, when each alone takes the centroid that lowers ``E`` most.

    ``residual``, ``values``, ``movable``: ``[rows, columns]``; ``diag``: ``H_jj`` of the rows. The
    centroid nearest to ``w - R_jn / H_jj``; a weight moves when that changes ``E`` by less than 0.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        optimum = values - residual / diag[:, None]
    new = np.searchsorted(mid, optimum, side="left")
    delta = centroids[new] - values
    gain = 2.0 * delta * residual + delta * delta * diag[:, None]  # change of E, <= 0 up to rounding
    return movable & (delta != 0) & (gain < 0), new
