"""Calibrated pruning: which weights to remove, and the least-squares refit of the survivors.

``magnitude`` scores ``|t|`` (the paper); ``activation`` scores
``|t| * ||x_j||`` with ``||x_j|| = sqrt(G_jj)`` the norm of the weight's input
feature over the calibration set; ``obs`` scores ``t^2 / [H^-1]_jj``, the
increase of the layer's error when one weight is removed and the others
re-fitted (Optimal Brain Surgeon); :func:`prune_iteratively` removes the
weights in a few steps, re-fitting and re-scoring in between.
:func:`refit_weights` gives the surviving weights that minimise the error for
a fixed mask. The objective is :class:`onnx_dc.calibration.layer_problem.LayerProblem`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnx_dc.calibration.layer_problem import (
    LayerProblem,
    _blas_threads_for,
    _blocks,
    _check_criterion,
    _check_masks,
    _definite_inverse,
    _inverse_spd,
    _solve_spd,
    inverse_cholesky,
    map_columns,
    single_threaded_blas,
)
from onnx_dc.codec._checks import finite_real, fraction
from onnx_dc.codec.pruning import prune_by_score
from onnx_dc.errors import SettingsError

__all__ = [
    "DEFAULT_OBS_RATE",
    "prune_iteratively",
    "pruning_path",
    "pruning_scores",
    "refit_weights",
    "select_mask",
]

_REFIT_BATCH_BYTES = 1 << 23  # padded Hessians of single-column groups solved together (*)
# (*) Batches well under glibc's largest heap allocation (32 MiB) reuse freed memory; larger ones come from
# fresh pages each time, which cost more than the arithmetic on a VM (nudenet-320n's 128x128x3x3 factors: 5.5-6.4 s
# in 8 MiB batches, 8.3-14.5 s in 32 MiB ones).


DEFAULT_OBS_RATE = 0.15
"""Fraction of the kept weights :func:`pruning_path` removes per step after the first."""


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
    :func:`onnx_dc.codec.pruning.prune_by_score`.
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
    groups = [(np.flatnonzero(mask[:, columns[0]]), columns) for columns in _column_groups(mask)]
    lightly_pruned = [g for g in groups if _by_complement(g[0].size, mask.shape[0])]
    groups = [g for g in groups if g[0].size and not _by_complement(g[0].size, mask.shape[0])]
    inverse = _definite_inverse(hessian) if lightly_pruned else None
    if inverse is None:  # not positive definite (no damping): every group solved directly, least squares if need be
        groups += lightly_pruned
    else:
        with single_threaded_blas():
            map_columns(lambda group: _refit_by_complement(inverse, target, mask, *group, result), lightly_pruned)
    if not groups:
        return result
    ht = hessian @ target

    def solve(batch: list[tuple[np.ndarray, np.ndarray]]) -> None:  # each batch writes its own columns
        if len(batch) == 1:
            rows, columns = batch[0]
            result[np.ix_(rows, columns)] = _solve_spd(hessian[np.ix_(rows, rows)], ht[np.ix_(rows, columns)])
        else:
            _solve_padded(hessian, ht, batch, result)

    with single_threaded_blas():
        map_columns(solve, column_batches(groups, _REFIT_BATCH_BYTES))
    return result


def _by_complement(n_kept: int, n_rows: int) -> bool:
    """Whether a column group with ``n_kept`` of ``n_rows`` inputs kept is solved through its pruned rows
    (:func:`_refit_by_complement`: ``|P|^3`` instead of ``|S|^3``)."""
    return n_kept > 0 and 2 * (n_rows - n_kept) <= n_rows


def _refit_by_complement(
    inverse: np.ndarray, target: np.ndarray, mask: np.ndarray, rows: np.ndarray, columns: np.ndarray,
    result: np.ndarray, saliency: np.ndarray | None = None,
) -> None:
    """The refit of a column group from ``G = H^-1`` and its pruned rows ``P`` (OBS's removal of a set of weights).

    ``T`` minimises ``E`` without a mask, so the best weights with ``w_P = 0`` are
    ``w = t - G_:P G_PP^-1 t_P`` (then ``H w = H t - e_P (...)``: ``(H w)_S = (H t)_S``, the refit's
    equations). With ``saliency`` also the OBS saliencies ``w_j^2 / [H_SS^-1]_jj``, from
    ``H_SS^-1 = G_SS - G_SP G_PP^-1 G_PS``. Cost ``|P|^3 + K |P| |C|`` against ``|S|^3``.
    """
    pruned = np.flatnonzero(~mask[:, columns[0]])
    t = target[:, columns]
    if pruned.size == 0:
        weights, inverse_diagonal = t[rows], np.diag(inverse)[rows]
    else:
        g_pp = inverse[np.ix_(pruned, pruned)]
        g_sp = inverse[np.ix_(rows, pruned)]
        weights = t[rows] - g_sp @ np.linalg.solve(g_pp, t[pruned])
        if saliency is not None:
            inverse_diagonal = np.diag(inverse)[rows] - np.sum(g_sp * np.linalg.solve(g_pp, g_sp.T).T, axis=1)
    result[np.ix_(rows, columns)] = weights
    if saliency is not None:
        saliency[np.ix_(rows, columns)] = weights * weights / inverse_diagonal[:, None]


def column_batches(
    groups: Sequence[tuple[np.ndarray, np.ndarray]], max_bytes: int
) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Groups of columns ``(rows, columns)`` for work on ``H_SS`` in stacks: a group of several columns
    alone, single columns together, by number of rows, while ``count * rows^2 * 8`` bytes stay within ``max_bytes``."""
    batches = [[g] for g in groups if g[1].size > 1]
    singles = sorted((g for g in groups if g[1].size == 1), key=lambda g: g[0].size)
    start = 0
    while start < len(singles):
        stop = start + 1
        while stop < len(singles) and (stop - start + 1) * singles[stop][0].size ** 2 * 8 <= max_bytes:
            stop += 1
        batches.append(singles[start:stop])
        start = stop
    return batches


def padded_hessians(
    hessian: np.ndarray, batch: Sequence[tuple[np.ndarray, np.ndarray]], *, reverse: bool = False
) -> np.ndarray:
    """``H_SS`` of each group of a :func:`column_batches` batch, padded with an identity block to a common size
    ``[len(batch), s, s]`` (a padded row is independent of the others and of its group's rows).

    ``reverse``: ``J H_SS J`` (the group's rows in reverse order) after a leading identity block instead.
    """
    size = max(rows.size for rows, _ in batch)
    stack = np.broadcast_to(np.eye(size), (len(batch), size, size)).copy()
    for b, (rows, _) in enumerate(batch):
        if reverse:
            backwards = rows[::-1]
            stack[b, size - rows.size :, size - rows.size :] = hessian[np.ix_(backwards, backwards)]
        else:
            stack[b, : rows.size, : rows.size] = hessian[np.ix_(rows, rows)]
    return stack


def _solve_padded(
    hessian: np.ndarray, ht: np.ndarray, batch: Sequence[tuple[np.ndarray, np.ndarray]], result: np.ndarray
) -> None:
    """``w_S = H_SS^-1 (H t)_S`` of single columns at once, each ``H_SS`` padded with an identity block."""
    stack = padded_hessians(hessian, batch)
    rhs = np.zeros((len(batch), stack.shape[-1], 1))
    for b, (rows, columns) in enumerate(batch):
        rhs[b, : rows.size] = ht[np.ix_(rows, columns)]
    try:
        inverse_lower = inverse_cholesky(stack)
    except np.linalg.LinAlgError:  # one of them is singular: each on its own (least squares where needed)
        for rows, columns in batch:
            result[np.ix_(rows, columns)] = _solve_spd(hessian[np.ix_(rows, rows)], ht[np.ix_(rows, columns)])
        return
    solved = np.matmul(np.swapaxes(inverse_lower, 1, 2), np.matmul(inverse_lower, rhs))
    for b, (rows, columns) in enumerate(batch):
        result[np.ix_(rows, columns)] = solved[b, : rows.size]


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
    groups = _column_groups(mask)
    full_inverse = None
    if any(_by_complement(int(np.count_nonzero(mask[:, c[0]])), mask.shape[0]) for c in groups):
        full_inverse = _definite_inverse(hessian)  # None: every group solved directly

    def refit(columns: np.ndarray) -> None:  # each group writes its own columns
        rows = np.flatnonzero(mask[:, columns[0]])
        if rows.size == 0:
            return
        if full_inverse is not None and _by_complement(rows.size, mask.shape[0]):
            _refit_by_complement(full_inverse, target, mask, rows, columns, weights, scores)
            return
        inverse = _inverse_spd(hessian[np.ix_(rows, rows)])
        w = inverse @ ht[np.ix_(rows, columns)]
        weights[np.ix_(rows, columns)] = w
        scores[np.ix_(rows, columns)] = w * w / np.diag(inverse)[:, None]

    with single_threaded_blas():
        map_columns(refit, groups)
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
