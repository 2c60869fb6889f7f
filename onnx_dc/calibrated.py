"""Compression with calibration data: per-layer fits on captured statistics, plain or sequential.

This module turns the numerical core (:mod:`onnx_dc.refit`) and the captured
statistics (:mod:`onnx_dc.calibration`) into compressed tensors for the
converter. For every layer (MatMul/Gemm/Conv weight with captured input):

1. **Target.** ``T`` = the original weight viewed as blocks ``[K, N]``. In
   *sequential* mode the statistics are captured with the already-compressed
   upstream layers in place (``X~``) while the reference activations of the
   original model (``X``) are captured on the same samples, and the target is
   the weight that best reproduces the *original* output from the *compressed*
   input: ``T = argmin ||X~ T - X W||^2 + lambda ||T - W||^2``, i.e.
   ``(X~^T X~ + lambda I) T = X~^T X W + lambda W``. Fitting every layer to that
   target (with ``G = X~^T X~``) corrects the upstream errors instead of letting
   them compound.
2. **Bias.** When the layer has a bias of its own (Gemm C, Conv B, or the
   constant of an Add right after a MatMul), the bias is refitted together with
   the weights: it absorbs the mean of the output error. Eliminating it turns
   ``G`` into the Gram matrix of the *centred* inputs, and afterwards
   ``b = b_T - mean(x)^T (W_q - T)``. Biases stay dense (as in the paper) and
   are counted in the totals either way.
3. **Fit.** :func:`onnx_dc.refit.fit_layer`: pruning criterion (``magnitude``,
   ``activation``, ``obs`` or the best of them), least-squares refit of the
   surviving weights, k-means, then alternating centroid refit and
   re-assignment; each step is accepted only if the layer's reconstruction
   error goes down.
4. **Downstream weighting** (``CalibrationOptions.downstream_weighting``, on by
   default). When the layer's output feeds exactly one other fitted layer,
   directly or through ``Relu``/``Identity``, each output column of the
   objective is weighted by how much an error in it reaches that layer's output
   (:func:`downstream_column_weights`): the layer spends its weights and
   centroids where the next layer is sensitive. Other graphs keep the plain
   objective.
5. **Container.** The fitted codes and centroids become an ordinary container
   (:func:`onnx_dc.tensor.compressed_tensor_from_codes`): the decoder and the
   runtime do not know calibration was used.

Weights without statistics (embeddings, ConvTranspose, shared or subgraph
weights...) take the plain path (:func:`onnx_dc.tensor.compress_tensor`); in
sequential mode they are compressed first, so every fitted layer sees them
compressed.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_dc.calibration import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_MEMORY_BYTES,
    CalibrationData,
    LayerSpec,
    LayerStatistics,
    capture_statistics,
    find_layers,
)
from onnx_dc.container import encode_container
from onnx_dc.errors import ModelError, SettingsError
from onnx_dc.pruning import prune_by_std
from onnx_dc.refit import CRITERIA, DEFAULT_DAMPING, DEFAULT_OBS_RATE, LayerFit, LayerProblem, fit_layer
from onnx_dc.tensor import CompressedTensor, TensorSettings, codebook_in_dtype, compress_tensor, compressed_tensor_from_codes

__all__ = [
    "AUTO_INDEX_BITS",
    "CalibratedCompression",
    "CalibrationOptions",
    "LayerFitter",
    "LayerResult",
    "LayerSettings",
    "LayerTarget",
    "build_target",
    "compress_with_calibration",
    "downstream_column_weights",
    "fit_one_layer",
    "fit_to_tensor",
    "initializer_array",
    "layer_target",
    "plain_tensor",
    "set_initializer",
]

AUTO_INDEX_BITS: tuple[int, ...] = tuple(range(2, 13))
"""Relative-index widths tried when the index bits are chosen automatically (smallest container wins)."""


@dataclass(frozen=True)
class CalibrationOptions:
    """How calibration data are used.

    Attributes:
        criterion: pruning criterion, one of :data:`onnx_dc.refit.CRITERIA` or ``auto``
            (per layer, the one with the lowest reconstruction error).
        refit_weights: least-squares refit of the surviving weights before clustering.
        refit_rounds: rounds of centroid refit + re-assignment (0: plain k-means).
        sequential: capture each layer's statistics with the compressed upstream layers in place.
        bias_correction: refit the layers' own biases (absorbing the mean output error).
        downstream_weighting: weight each output column of a layer's reconstruction error by
            how much it reaches the next compressed layer (:func:`downstream_column_weights`);
            layers without such a successor keep the plain objective.
        damping: ridge term of the fits, relative to the mean diagonal of ``G``.
        obs_rate: fraction of the kept weights removed per iterative OBS step.
        batch_size: samples per onnxruntime run.
        max_memory_bytes: statistics kept in memory at once (non-sequential capture).
    """

    criterion: str = "auto"
    refit_weights: bool = True
    refit_rounds: int = 8
    sequential: bool = True
    bias_correction: bool = True
    downstream_weighting: bool = True
    damping: float = DEFAULT_DAMPING
    obs_rate: float = DEFAULT_OBS_RATE
    batch_size: int = DEFAULT_BATCH_SIZE
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES

    def __post_init__(self) -> None:
        if self.criterion != "auto" and self.criterion not in CRITERIA:
            raise SettingsError(
                f"unknown pruning criterion {self.criterion!r}: expected auto or one of {', '.join(CRITERIA)}"
            )
        if isinstance(self.refit_rounds, bool) or not isinstance(self.refit_rounds, int) or self.refit_rounds < 0:
            raise SettingsError(f"refit_rounds must be an integer >= 0, got {self.refit_rounds!r}")
        if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping >= 0):
            raise SettingsError(f"damping must be a finite number >= 0, got {self.damping!r}")
        if not (isinstance(self.obs_rate, (int, float)) and 0 < self.obs_rate < 1):
            raise SettingsError(f"obs_rate must be in (0, 1), got {self.obs_rate!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SettingsError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")


@dataclass(frozen=True)
class LayerSettings:
    """Compression settings of one weight for the calibrated path.

    ``sparsity`` is the fraction removed (``quality`` is converted to it by
    the paper's rule on the original weights); ``index_bits=None`` picks the
    width giving the smallest container among :data:`AUTO_INDEX_BITS`.
    """

    sparsity: float = 0.0
    bits: int = 5
    index_bits: int | None = 5
    init: str = "linear"
    seed: int = 0

    @classmethod
    def from_resolved(cls, resolved, weight: np.ndarray | None = None) -> LayerSettings:
        """From :class:`onnx_dc.settings.ResolvedSettings` (``quality`` needs the weight)."""
        sparsity = resolved.sparsity
        if sparsity is None and resolved.quality is not None:
            if weight is None:
                raise SettingsError("quality needs the weight to convert it to a sparsity")
            keep = prune_by_std(weight, resolved.quality)
            sparsity = 1.0 - np.count_nonzero(keep) / keep.size if keep.size else 0.0
        return cls(
            sparsity=float(sparsity or 0.0),
            bits=int(resolved.bits),
            index_bits=int(resolved.index_bits),
            init=str(resolved.init),
            seed=int(resolved.seed),
        )

    def tensor_settings(self, index_bits: int | None = None) -> TensorSettings:
        """The :class:`onnx_dc.tensor.TensorSettings` recorded with the container."""
        chosen = index_bits if index_bits is not None else (self.index_bits if self.index_bits is not None else 5)
        return TensorSettings(sparsity=self.sparsity, bits=self.bits, index_bits=chosen, init=self.init, seed=self.seed)


@dataclass
class LayerTarget:
    """A layer's :class:`~onnx_dc.refit.LayerProblem` and how its bias follows the fitted weights."""

    layer: LayerSpec
    problem: LayerProblem
    bias_target: list[np.ndarray] | None = None  # effective (scaled) bias per block
    input_mean: list[np.ndarray] | None = None  # mean input per block

    def corrected_bias(self, blocks: Sequence[np.ndarray]) -> np.ndarray | None:
        """The stored bias (divided by the bias scale) that goes with the fitted ``blocks``; None without bias."""
        if self.bias_target is None or self.input_mean is None:
            return None
        parts = [
            b - mean @ (w - t)
            for b, mean, w, t in zip(self.bias_target, self.input_mean, blocks, self.problem.targets)
        ]
        return np.concatenate(parts) / self.layer.bias_scale


def build_target(
    layer: LayerSpec,
    stats: LayerStatistics,
    weight: np.ndarray,
    bias: np.ndarray | None,
    *,
    damping: float = DEFAULT_DAMPING,
    bias_correction: bool = True,
    column_weights: Sequence[np.ndarray] | None = None,
) -> LayerTarget:
    """The reconstruction problem of one layer from its statistics (see the module docstring).

    ``bias`` is the stored bias (``None`` when the layer has none or it must
    not change). Sequential statistics (with cross terms) give the corrected
    target; plain ones the original weight. ``column_weights`` (one array per
    block, e.g. from :func:`downstream_column_weights`) weight the output columns
    of the objective.
    """
    blocks = layer.to_blocks(weight)
    use_bias = bias is not None and bias_correction and layer.bias_scale != 0
    bias_blocks = layer.bias_to_blocks(bias) if use_bias else None
    grams, targets, bias_targets, means = [], [], [], []
    for g, w in enumerate(blocks):
        k = w.shape[0]
        gram_aug = stats.gram[g]
        n = gram_aug[k, k]
        if stats.cross is not None:
            target_aug = _sequential_target(gram_aug, stats.cross[g], w, bias_blocks[g] if use_bias else None, damping)
        else:
            target_aug = np.vstack([w, bias_blocks[g][None, :]]) if use_bias else w
        if use_bias and n > 0:
            s = gram_aug[k, :k]
            grams.append(gram_aug[:k, :k] - np.outer(s, s) / n)
            means.append(s / n)
            targets.append(target_aug[:k])
            bias_targets.append(target_aug[k])
        else:
            grams.append(gram_aug[:k, :k])
            targets.append(target_aug[:k])
            if use_bias:
                means.append(np.zeros(k))
                bias_targets.append(target_aug[k])
    problem = LayerProblem(grams, targets, damping=damping, column_weights=column_weights)
    if use_bias:
        return LayerTarget(layer, problem, bias_targets, means)
    return LayerTarget(layer, problem)


def _sequential_target(
    gram_aug: np.ndarray, cross_aug: np.ndarray, w: np.ndarray, b: np.ndarray | None, damping: float
) -> np.ndarray:
    """``argmin ||A~ T - A W||^2 + lambda ||T - W||^2`` with ``A = [X, 1]`` (bias row free when given)."""
    k = w.shape[0]
    if b is None:
        gram, cross, theta0 = gram_aug[:k, :k], cross_aug[:k, :k], w
    else:
        gram, cross, theta0 = gram_aug, cross_aug, np.vstack([w, b[None, :]])
    diag = np.diag(gram_aug)[:k]
    mean_diag = float(np.mean(diag)) if k else 0.0
    lam = damping * mean_diag if mean_diag > 0 else 1.0
    ridge = np.full(gram.shape[0], lam)
    if b is not None:
        ridge[k] = 0.0  # the bias is not pulled towards its old value
    system = gram + np.diag(ridge)
    rhs = cross @ theta0 + ridge[:, None] * theta0
    try:
        return np.linalg.solve(system, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(system, rhs, rcond=None)[0]


def fit_to_tensor(
    layer: LayerSpec, fit: LayerFit, dtype: np.dtype, settings: LayerSettings, *, exhaustive: bool = True
) -> CompressedTensor:
    """Encode a :class:`~onnx_dc.refit.LayerFit` as a container in the weight's dtype and layout.

    The codebook is the fitted centroids rounded to ``dtype``; every weight keeps
    the centroid it was fitted to (equal rounded centroids merge). With
    ``settings.index_bits=None`` the relative-index width giving the smallest
    container is chosen: among all of :data:`AUTO_INDEX_BITS`, or with
    ``exhaustive=False`` (search-time candidates) by a scan that stops once the
    size has grown at two widths in a row past the smallest so far.
    """
    quantized = fit.quantized
    values = layer.from_blocks(quantized.weights)
    codes = layer.from_blocks(quantized.codes)
    kept = codes >= 0
    codebook, kept_codes = codebook_in_dtype(values[kept], quantized.centroids, dtype)
    full = np.full(codes.shape, -1, dtype=np.int16)
    full[kept] = kept_codes
    return _encode_best(full, codebook, settings, exhaustive=exhaustive)


def _encode_best(
    codes: np.ndarray, codebook: np.ndarray, settings: LayerSettings, *, exhaustive: bool = True
) -> CompressedTensor:
    if settings.index_bits is not None:
        return compressed_tensor_from_codes(codes, codebook, settings.tensor_settings())
    if not np.any(codes < 0):
        # Nothing pruned: the "auto" layout is the dense one, whose size does not depend on the index width.
        return compressed_tensor_from_codes(codes, codebook, settings.tensor_settings(AUTO_INDEX_BITS[0]))
    best_bits, best_size = AUTO_INDEX_BITS[0], None
    worse_in_a_row = 0
    for index_bits in AUTO_INDEX_BITS:
        size = len(encode_container(codes, codebook, bits=settings.bits, index_bits=index_bits))
        if best_size is None or size < best_size:
            best_bits, best_size = index_bits, size
            worse_in_a_row = 0
        else:
            worse_in_a_row += 1
            if not exhaustive and worse_in_a_row >= 2:
                break
    return compressed_tensor_from_codes(codes, codebook, settings.tensor_settings(best_bits))


def plain_tensor(weight: np.ndarray, settings: LayerSettings) -> CompressedTensor:
    """The uncalibrated pipeline (magnitude pruning, k-means), with automatic index bits when asked."""
    compressed = compress_tensor(weight, settings.tensor_settings())
    if settings.index_bits is not None:
        return compressed
    return _encode_best(compressed.codes, compressed.codebook, settings)


@dataclass
class LayerResult:
    """What happened to one weight.

    Attributes:
        name: the weight.
        tensor: its :class:`~onnx_dc.tensor.CompressedTensor`.
        settings: the :class:`LayerSettings` used.
        calibrated: False for weights without statistics (plain path).
        criterion: pruning criterion chosen (calibrated layers).
        relative_error: output error / output energy of the layer on the calibration data.
        bias: name of the bias that was refitted, or None.
    """

    name: str
    tensor: CompressedTensor
    settings: LayerSettings
    calibrated: bool
    criterion: str | None = None
    relative_error: float | None = None
    bias: str | None = None


@dataclass
class CalibratedCompression:
    """The result of :func:`compress_with_calibration`.

    ``model`` is a copy of the input model whose refitted biases hold their new
    values (the weights are still the original dense ones): hand it to the
    converter with :meth:`tensor_compressor`
    (``onnx_dc.api.compress_model(c.model, settings, tensor_compressor=c.tensor_compressor())``).
    """

    model: onnx.ModelProto
    results: dict[str, LayerResult] = field(default_factory=dict)
    n_samples: int = 0

    @property
    def tensors(self) -> dict[str, CompressedTensor]:
        """Compressed tensor per weight name."""
        return {name: r.tensor for name, r in self.results.items()}

    def tensor_compressor(self) -> Callable[..., CompressedTensor]:
        """A ``tensor_compressor`` for :func:`onnx_dc.api.compress_model`: the tensor fitted here for
        every weight in :attr:`results`, the converter's plain path
        (:func:`onnx_dc.tensor.compress_tensor`) for any other."""

        def compressor(weight, values: np.ndarray, resolved) -> CompressedTensor:
            found = self.results.get(weight.name)
            if found is not None:
                return found.tensor
            return compress_tensor(values, resolved.to_tensor_settings())

        return compressor


ProgressCallback = Callable[[int, int, str], None]


def compress_with_calibration(
    model: onnx.ModelProto,
    data: CalibrationData,
    settings: Mapping[str, LayerSettings],
    options: CalibrationOptions = CalibrationOptions(),
    *,
    progress: bool | ProgressCallback = False,
) -> CalibratedCompression:
    """Compress the weights named in ``settings`` using calibration data.

    Args:
        model: the original model (not modified).
        data: calibration samples.
        settings: per weight name, its :class:`LayerSettings`; weights not named are left alone.
        options: :class:`CalibrationOptions`.
        progress: ``True`` for tqdm bars on a terminal, or a callable ``(done, total, name)``.

    Raises:
        ModelError: a named weight is not an initializer of the main graph or a Constant.
        CalibrationError: the data do not fit the model, or onnxruntime fails on them.
    """
    working = onnx.ModelProto()
    working.CopyFrom(model)
    all_layers = find_layers(working)
    layers = [layer for layer in all_layers if layer.weight in settings]
    layer_names = {layer.weight for layer in layers}
    result = CalibratedCompression(working)
    show = progress is True and sys.stderr.isatty()
    callback = progress if callable(progress) else None
    names_in_order = [n for n in settings if n not in layer_names] + [layer.weight for layer in layers]
    total = len(names_in_order)
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="tensor", desc="fitting", leave=False)

    def tick(name: str) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(name, refresh=True)
        if callback is not None:
            callback(len(result.results), total, name)

    try:
        # Weights without statistics: plain path, and in place in the working model
        # so that the fitted layers downstream see them compressed.
        for name in names_in_order[: total - len(layers)]:
            original = initializer_array(model, name)
            compressed = plain_tensor(original, settings[name])
            result.results[name] = LayerResult(name, compressed, settings[name], calibrated=False)
            if options.sequential:
                set_initializer(working, name, compressed.quantized)
            tick(name)

        reference = None
        statistics: dict[str, LayerStatistics] = {}
        if options.sequential:
            reference = model
        else:
            statistics = capture_statistics(
                model, data, layers, batch_size=options.batch_size,
                max_memory_bytes=options.max_memory_bytes, progress=show, description="calibrating",
            )
        for layer in layers:
            if options.sequential:
                statistics = capture_statistics(
                    working, data, [layer], reference=reference, batch_size=options.batch_size,
                    progress=show, description=f"calibrating {layer.weight}",
                )
            stats = statistics[layer.weight]
            weight = initializer_array(model, layer.weight)
            bias = initializer_array(model, layer.bias) if layer.bias is not None else None
            target = layer_target(model, layer, stats, weight, bias, options, layers=all_layers)
            layer_result, new_bias = fit_one_layer(target, weight, bias, settings[layer.weight], options)
            result.results[layer.weight] = layer_result
            result.n_samples = max(result.n_samples, stats.n_samples)
            if options.sequential:
                set_initializer(working, layer.weight, layer_result.tensor.quantized)
            if new_bias is not None:
                set_initializer(working, layer.bias, new_bias)
            if not options.sequential:
                statistics.pop(layer.weight, None)  # free its memory
            tick(layer.weight)
    finally:
        if bar is not None:
            bar.close()
    # Hand back the original dense weights (the converter compresses them from the
    # precomputed tensors) with the refitted biases.
    for name in result.results:
        set_initializer(working, name, initializer_array(model, name))
    return result


def layer_target(
    model: onnx.ModelProto,
    layer: LayerSpec,
    stats: LayerStatistics,
    weight: np.ndarray,
    bias: np.ndarray | None,
    options: CalibrationOptions,
    *,
    layers: Sequence[LayerSpec] | None = None,
) -> LayerTarget:
    """:func:`build_target` with the damping and bias correction of ``options`` and, when
    ``options.downstream_weighting`` is on, the column weights of :func:`downstream_column_weights`
    (``layers``: the model's layers, found again when not given)."""
    column_weights = (
        downstream_column_weights(model, layer, stats, weight, bias, layers=layers)
        if options.downstream_weighting else None
    )
    return build_target(
        layer, stats, weight, bias, damping=options.damping, bias_correction=options.bias_correction,
        column_weights=column_weights,
    )


def fit_one_layer(
    target: LayerTarget,
    weight: np.ndarray,
    bias: np.ndarray | None,
    settings: LayerSettings,
    options: CalibrationOptions,
) -> tuple[LayerResult, np.ndarray | None]:
    """Fit one layer's :class:`LayerTarget` (:func:`layer_target`); returns its :class:`LayerResult`
    and the new bias (or None)."""
    layer = target.layer
    fit = fit_layer(
        target.problem,
        sparsity=settings.sparsity,
        bits=settings.bits,
        criterion=options.criterion,
        refit_weights_first=options.refit_weights,
        refit_centroids_rounds=options.refit_rounds,
        obs_rate=options.obs_rate,
        init=settings.init,
        seed=settings.seed,
    )
    compressed = fit_to_tensor(layer, fit, weight.dtype, settings)
    new_bias = None
    if target.bias_target is not None and bias is not None:
        blocks = layer.to_blocks(compressed.quantized)  # the stored values, after rounding to the dtype
        new_bias = target.corrected_bias(blocks).reshape(bias.shape).astype(bias.dtype)
    layer_result = LayerResult(
        layer.weight, compressed, settings, calibrated=True, criterion=fit.criterion,
        relative_error=target.problem.relative_error(layer.to_blocks(compressed.quantized)),
        bias=layer.bias if new_bias is not None else None,
    )
    return layer_result, new_bias


# ---------------------------------------------------------------------------
# Downstream weighting

_DOWNSTREAM_FLOOR = 0.01  # smallest column weight, relative to the mean (units silent on the calibration data)


def downstream_column_weights(
    model: onnx.ModelProto,
    layer: LayerSpec,
    stats: LayerStatistics,
    weight: np.ndarray,
    bias: np.ndarray | None,
    *,
    layers: Sequence[LayerSpec] | None = None,
) -> list[np.ndarray] | None:
    """How much an error in each output column of ``layer`` reaches the next compressed layer's output.

    When the layer's output (after its own bias) feeds exactly one other layer
    with statistics, directly or through ``Relu`` / ``Identity`` nodes, and
    nothing else, an error ``e_n`` in output ``n`` changes that layer's output by
    ``e_n g_n V[n, :]`` (``V`` the next layer's original weight as ``[K, M]``,
    ``g_n`` the Relu gate). Its expected energy is ``P(y_n > 0) ||V[n, :]||^2 E[e_n^2]``,
    with ``P(y_n > 0)`` from the normal law with the mean and variance of the
    pre-activation ``y_n`` computed from ``stats`` (1 without Relu). For a
    convolution feeding a convolution (both ungrouped) ``||V[n, :]||^2`` sums over
    the next kernel's offsets of input channel ``n``. The weights are scaled to
    mean 1 (floored at 1 % of it) and returned one array per block, or None
    (plain objective) for any other graph: several consumers, a graph output,
    other operators in between, grouped convolutions, or mismatched shapes.
    """
    layers = find_layers(model) if layers is None else list(layers)
    found = _next_layer(model, layer, layers)
    if found is None:
        return None
    following, gated = found
    if layer.groups != 1 or following.groups != 1:
        return None
    if layer.op == "Conv":
        if following.op != "Conv" or following.weight_shape[1] != layer.weight_shape[0]:
            return None
        kernel = np.asarray(initializer_array(model, following.weight), dtype=np.float64)
        energy = np.sum(kernel * kernel, axis=tuple(i for i in range(kernel.ndim) if i != 1))
    else:
        if following.op == "Conv" or following.n_inputs != layer.n_outputs:
            return None
        (rows,) = following.to_blocks(initializer_array(model, following.weight))
        energy = np.sum(rows * rows, axis=1)
    if gated:
        energy = energy * _relu_pass_probability(layer, stats, weight, bias)
    mean = float(np.mean(energy)) if energy.size else 0.0
    if not (np.all(np.isfinite(energy)) and mean > 0):
        return None
    energy = np.maximum(energy / mean, _DOWNSTREAM_FLOOR)
    return [energy / float(np.mean(energy))]


def _next_layer(model: onnx.ModelProto, layer: LayerSpec, layers: Sequence[LayerSpec]) -> tuple[LayerSpec, bool] | None:
    """The single layer ``layer``'s output reaches through Relu/Identity, and whether a Relu is on the way."""
    graph = model.graph
    nodes = list(graph.node)
    labels = [node.name or f"{node.op_type}#{i}" for i, node in enumerate(nodes)]
    if layer.node_name not in labels:
        return None
    node = nodes[labels.index(layer.node_name)]
    if not node.output:
        return None
    consumers: dict[str, list[int]] = {}
    for i, other in enumerate(nodes):
        for name in set(other.input):
            consumers.setdefault(name, []).append(i)
    outputs = {o.name for o in graph.output}
    by_node = {spec.node_name: spec for spec in layers}
    value = node.output[0]
    if layer.op == "MatMul" and layer.bias is not None:
        # The bias is the constant of the Add right after the MatMul.
        users = consumers.get(value, [])
        if len(users) != 1 or value in outputs:
            return None
        add = nodes[users[0]]
        if add.op_type != "Add" or layer.bias not in add.input:
            return None
        value = add.output[0]
    gated = False
    for _ in range(len(nodes)):
        users = consumers.get(value, [])
        if value in outputs or len(users) != 1:
            return None
        user = nodes[users[0]]
        if user.domain not in ("", "ai.onnx"):
            return None
        spec = by_node.get(labels[users[0]])
        if spec is not None:
            return (spec, gated) if spec.activation == value and list(user.input).count(value) == 1 else None
        if user.op_type not in ("Relu", "Identity") or len(user.output) != 1:
            return None
        gated = gated or user.op_type == "Relu"
        value = user.output[0]
    return None


def _relu_pass_probability(layer: LayerSpec, stats: LayerStatistics, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``P(y_n > 0)`` per output column under a normal law with the pre-activation's mean and variance."""
    (w,) = layer.to_blocks(weight)
    gram_aug = stats.gram[0]
    k = w.shape[0]
    count = float(gram_aug[k, k])
    if count <= 0:
        return np.ones(w.shape[1])
    mean_x = gram_aug[k, :k] / count
    linear_mean = mean_x @ w
    second = np.sum(w * (gram_aug[:k, :k] @ w), axis=0) / count
    variance = np.maximum(second - linear_mean**2, 0.0)
    offset = np.zeros(w.shape[1])
    if bias is not None:
        (offset,) = layer.bias_to_blocks(np.asarray(bias, dtype=np.float64))
    mean = linear_mean + offset
    std = np.sqrt(variance)
    z = np.where(std > 0, mean / np.where(std > 0, std, 1.0), np.where(mean > 0, np.inf, -np.inf))
    return np.array([0.5 * math.erfc(-float(v) / math.sqrt(2.0)) for v in z])


# ---------------------------------------------------------------------------
# Initializers


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    """The value of a main-graph initializer or Constant node output. Raises :class:`ModelError`."""
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    return numpy_helper.to_array(attr.t)
    raise ModelError(f"{name!r} is not a constant tensor of the main graph")


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Replace the value of a main-graph initializer (or Constant) in place, keeping its name and dtype."""
    for tensor in model.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(_tensor_like(tensor, value))
            return
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    attr.t.CopyFrom(_tensor_like(attr.t, value))
                    return
    raise ModelError(f"{name!r} is not a constant tensor of the main graph")


def _tensor_like(template: onnx.TensorProto, value: np.ndarray) -> onnx.TensorProto:
    old = numpy_helper.to_array(template)
    new = numpy_helper.from_array(np.asarray(value).astype(old.dtype).reshape(old.shape), template.name)
    if template.doc_string:
        new.doc_string = template.doc_string
    for entry in template.metadata_props:
        new.metadata_props.add().CopyFrom(entry)
    return new


class LayerFitter:
    """Fits of one layer at many (sparsity, bits) settings from one set of statistics.

    The pruning path (iterative OBS through all requested sparsities) is
    computed once by :meth:`prepare` and shared by every :meth:`fit`; used by
    the sensitivity analysis and the automatic search.
    """

    def __init__(self, target: LayerTarget, weight: np.ndarray, options: CalibrationOptions) -> None:
        self.target = target
        self.weight = np.asarray(weight)
        self.options = options
        self._obs: dict[float, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        self._pruned_cache: dict[float, tuple[str, list[np.ndarray], list[np.ndarray]]] = {}

    @property
    def layer(self) -> LayerSpec:
        """The layer fitted."""
        return self.target.layer

    def prepare(self, sparsities: Sequence[float]) -> None:
        """Compute the OBS pruning path through ``sparsities`` (when the criterion may use OBS)."""
        if self.options.criterion not in ("obs", "auto"):
            return
        todo = sorted({float(s) for s in sparsities} - set(self._obs) - set(self._pruned_cache))
        if not todo:
            return
        from onnx_dc.refit import pruning_path

        path = pruning_path(self.target.problem, todo, rate=self.options.obs_rate)
        self._obs.update(zip(todo, path))

    def fit(self, sparsity: float, bits: int, *, init: str = "linear", seed: int = 0) -> LayerFit:
        """The :func:`onnx_dc.refit.fit_layer` result at one setting (the pruning is computed once per sparsity)."""
        criterion, masks, weights = self._pruned(sparsity)
        return fit_layer(
            self.target.problem,
            sparsity=sparsity,
            bits=bits,
            criterion=criterion,
            refit_weights_first=self.options.refit_weights,
            refit_centroids_rounds=self.options.refit_rounds,
            obs_rate=self.options.obs_rate,
            init=init,
            seed=seed,
            pruned={criterion: (masks, weights)},
        )

    def pruned_weights(self, sparsity: float) -> tuple[str, np.ndarray, np.ndarray | None]:
        """Pruning only (no weight sharing): ``(criterion, weight in the stored layout, new bias or None)``.

        With several criteria, the one with the lowest reconstruction error is used.
        """
        criterion, _, blocks = self._pruned(sparsity)
        weight = self.layer.from_blocks(blocks).astype(self.weight.dtype)
        return criterion, weight, self._bias(self.layer.to_blocks(weight))

    def _pruned(self, sparsity: float) -> tuple[str, list[np.ndarray], list[np.ndarray]]:
        """``(criterion, masks, weights)`` of the best criterion at ``sparsity`` (cached)."""
        from onnx_dc.refit import refit_weights, select_mask

        key = float(sparsity)
        if key in self._pruned_cache:
            return self._pruned_cache[key]
        problem = self.target.problem
        criteria = CRITERIA if self.options.criterion == "auto" else (self.options.criterion,)
        best = None
        for name in criteria:
            if name == "obs":
                self.prepare([key])
                masks, blocks = self._obs[key]
            else:
                masks = select_mask(problem, key, name)
                blocks = (
                    refit_weights(problem, masks)
                    if self.options.refit_weights
                    else [t * m for t, m in zip(problem.targets, masks)]
                )
            error = problem.error(blocks)
            if best is None or error < best[0]:
                best = (error, name, masks, blocks)
        assert best is not None
        self._pruned_cache[key] = best[1:]
        self._obs.pop(key, None)  # kept once, in the cache
        return self._pruned_cache[key]

    def tensor(
        self, fit: LayerFit, settings: LayerSettings, *, exhaustive: bool = True
    ) -> tuple[CompressedTensor, np.ndarray | None]:
        """The container of a fit and the bias that goes with its stored (rounded) values.

        ``exhaustive=False``: automatic index bits by the quick scan of :func:`fit_to_tensor`.
        """
        compressed = fit_to_tensor(self.layer, fit, self.weight.dtype, settings, exhaustive=exhaustive)
        return compressed, self._bias(self.layer.to_blocks(compressed.quantized))

    def _bias(self, blocks: Sequence[np.ndarray]) -> np.ndarray | None:
        bias = self.target.corrected_bias(blocks)
        return None if bias is None else bias
