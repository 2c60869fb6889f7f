"""Layer-wise reconstruction fits: "trained quantization" done one-shot from calibration statistics.

The paper retrains the network after pruning and fine-tunes the shared
centroids by back-propagation. Without a training loop, each layer is fitted
instead to reproduce its own output on calibration data. For a layer computing
``Y = X W`` (``X``: ``[m, K]`` inputs, ``W``: ``[K, N]`` weights, one row per
input feature) the output error of a compressed ``W_q`` is::

    ||X (W_q - T)||^2 = tr((W_q - T)^T G (W_q - T)),   G = X^T X   (K x K)

where ``T`` is the weight the output should match (the original weight, or a
corrected target in sequential mode, see :mod:`onnx_dc.calibration.model_fit`). Only the
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
  layer (exact count, :func:`onnx_dc.codec.pruning.prune_by_score`), so columns and
  input features end up with different densities.
* :func:`refit_weights`: the surviving weights that minimise ``E`` for a fixed
  mask: per output column ``n`` with kept inputs ``S``, ``w_S = H_SS^-1 (H t_n)_S``
  (pruned weights stay exactly zero).
* :func:`quantize_layer`: weight sharing with ``k`` centroids. Starts from
  1-D k-means of the kept weights (as :func:`onnx_dc.codec.tensor.compress_tensor`),
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
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from numbers import Integral

import numpy as np

from onnx_dc.codec._checks import finite_real
from onnx_dc.errors import InvalidTensorError, SettingsError

__all__ = [
    "CRITERIA",
    "DEFAULT_DAMPING",
    "LayerFit",
    "LayerProblem",
    "QuantizedLayer",
    "column_threads",
    "inverse_cholesky",
    "map_columns",
    "single_threaded_blas",
]


CRITERIA: tuple[str, ...] = ("magnitude", "activation", "obs")
"""Pruning criteria: the paper's ``|w|``, activation-aware ``|w| * ||x||``, Optimal Brain Surgeon."""

DEFAULT_DAMPING = 0.01
"""lambda = DEFAULT_DAMPING * mean(diag(G))."""


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
            output ``n`` matters downstream, see :func:`onnx_dc.calibration.targets.downstream_column_weights`).
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
        self._damped_energy: float | None = None
        self._hessian_targets: list[np.ndarray] | None = None
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

    def hessian_targets(self) -> list[np.ndarray]:
        """Per block ``H T`` scaled by the column weights (the right-hand sides of the centroid systems; computed once)."""
        if self._hessian_targets is None:
            products = []
            for h, t, c in zip(self.hessians, self.targets, self.column_weights):
                product = h @ t
                products.append(product if c is None else product * c[None, :])
            self._hessian_targets = products
        return self._hessian_targets

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

    def damped_relative_error(self, weights: Sequence[np.ndarray]) -> float:
        """:meth:`error` relative to its value at all-zero weights (0 when that is 0).

        Unlike :meth:`relative_error`, a weight on an input channel that the calibration data never
        excite is not free to remove: it costs its share of the damping term (``lambda ||w||^2``),
        as in the fits' own objective.
        """
        if self._damped_energy is None:
            self._damped_energy = self.error([np.zeros_like(t) for t in self.targets])
        scale = self._damped_energy
        return self.error(weights) / scale if scale > 0 else 0.0


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
        errors_by_criterion: ``E`` after pruning (and weight refit) of every criterion compared (empty when one
            criterion was asked for).
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


def _inverse_spd(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive-definite matrix (pseudo-inverse if it is singular)."""
    if matrix.size == 0:
        return matrix.copy()
    inverse = _definite_inverse(matrix)
    return np.linalg.pinv(matrix, hermitian=True) if inverse is None else inverse


def _definite_inverse(matrix: np.ndarray) -> np.ndarray | None:
    """``matrix^-1`` through its Cholesky factorisation, or None when it is not positive definite."""
    try:
        inverse_lower = inverse_cholesky(matrix[None])[0]
    except np.linalg.LinAlgError:
        return None
    inverse = inverse_lower.T @ inverse_lower
    return 0.5 * (inverse + inverse.T)


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limit BLAS to one thread inside the block (loops of small matrix operations).

    Many small products and factorisations are slower multi-threaded (thread
    start-up and, on a busy machine, threads spinning for a core): on 2 shared
    cores the Gram updates of depthwise convolutions ran 10x slower with two
    BLAS threads. Needs threadpoolctl (a dependency); without it this does nothing.
    """
    controller = _blas_controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


_COLUMN_JOBS: contextvars.ContextVar[int] = contextvars.ContextVar("column_jobs", default=1)


@contextlib.contextmanager
def column_threads(jobs: int) -> Iterator[None]:
    """Let :func:`map_columns` run ``jobs`` pieces of one layer's fit at once inside the block (this thread only:
    threads started elsewhere, e.g. layers fitted at once, keep one)."""
    token = _COLUMN_JOBS.set(max(1, int(jobs)))
    try:
        yield
    finally:
        _COLUMN_JOBS.reset(token)


def map_columns(function: Callable, items: Sequence) -> list:
    """``function`` over independent pieces of one layer's fit (column groups, padded batches), results in order.

    Inside :func:`column_threads` they run that many at once in threads, BLAS pinned to one thread
    (numpy releases the GIL in its heavy work); the result does not depend on the number of threads.
    A layer fitted alone (sequential captures) thus uses every core on its per-column solves.
    """
    jobs = _COLUMN_JOBS.get()
    if jobs <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    with single_threaded_blas(), ThreadPoolExecutor(max_workers=min(jobs, len(items))) as pool:
        return list(pool.map(function, items))


_SMALL_BLOCK_INPUTS = 512  # below this block width, one BLAS thread is faster (many small operations)
_CHOLESKY_BLOCK = 64  # inverse_cholesky factors matrices up to this size directly, larger ones by halves


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


def inverse_cholesky(stack: np.ndarray) -> np.ndarray:
    """``L^-1`` for the lower Cholesky factors ``L`` of a stack of symmetric matrices ``[B, s, s]``.

    By halves: with ``H = [[A, B^T], [B, C]]``, ``A = L_A L_A^T``, ``X = B L_A^-T``
    and ``C - X X^T = L_C L_C^T``, ``L^-1 = [[L_A^-1, 0], [-L_C^-1 X L_A^-1, L_C^-1]]``
    (matrix products, where numpy's own factorisation of large matrices is slow).

    Raises:
        numpy.linalg.LinAlgError: a matrix of the stack is not positive definite.
    """
    size = stack.shape[-1]
    if size <= _CHOLESKY_BLOCK:
        return np.tril(np.linalg.inv(np.linalg.cholesky(stack)))  # inv leaves rounding noise above the diagonal
    half = size // 2
    top = inverse_cholesky(stack[:, :half, :half])
    below = np.matmul(stack[:, half:, :half], np.swapaxes(top, 1, 2))
    schur = stack[:, half:, half:] - np.matmul(below, np.swapaxes(below, 1, 2))
    bottom = inverse_cholesky(0.5 * (schur + np.swapaxes(schur, 1, 2)))
    inverse = np.zeros_like(stack)
    inverse[:, :half, :half] = top
    inverse[:, half:, half:] = bottom
    inverse[:, half:, :half] = -np.matmul(bottom, np.matmul(below, top))
    return inverse


def _int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (Integral, np.integer)):
        raise SettingsError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise SettingsError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _dequantize(codes: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    result = np.zeros(codes.shape)
    kept = codes >= 0
    if np.any(kept):
        result[kept] = centroids[codes[kept]]
    return result
