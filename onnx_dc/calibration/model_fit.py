"""Compression with calibration data: per-layer fits on captured statistics, plain or sequential.

This module turns the numerical core (:mod:`onnx_dc.calibration.sharing_fit`) and the captured
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
3. **Fit.** :func:`onnx_dc.calibration.sharing_fit.fit_layer`: pruning criterion (``magnitude``,
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
   (:func:`onnx_dc.codec.tensor.compressed_tensor_from_codes`): the decoder and the
   runtime do not know calibration was used.

Weights without statistics (embeddings, ConvTranspose, recurrent, shared or
Loop/Scan weights...; see :mod:`onnx_dc.calibration.proxies`) take the plain path (:func:`onnx_dc.codec.tensor.compress_tensor`); in
sequential mode they are compressed first, so every fitted layer sees them
compressed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_dc.calibration.capture import LayerStatistics, capture_statistics
from onnx_dc.calibration.data import CalibrationData
from onnx_dc.calibration.layer_problem import CRITERIA, LayerFit, column_threads, single_threaded_blas
from onnx_dc.calibration.layers import LayerSpec, find_layers
from onnx_dc.calibration.options import AUTO_INDEX_BITS, CalibrationOptions, LayerSettings
from onnx_dc.calibration.sequential_capture import SequentialCapture
from onnx_dc.calibration.sharing_fit import fit_layer
from onnx_dc.calibration.targets import LayerTarget, layer_target
from onnx_dc.codec.container import encode_container
from onnx_dc.codec.tensor import (
    CompressedTensor,
    EncodedTensor,
    codebook_in_dtype,
    compress_tensor,
    compressed_tensor_from_codes,
)
from onnx_dc.graph.model_io import initializer_array, set_initializer
from onnx_dc.progress import on_terminal, progress_bar, stage_line

__all__ = [
    "CalibratedCompression",
    "LayerFitter",
    "LayerResult",
    "compress_with_calibration",
    "fit_one_layer",
    "fit_to_tensor",
    "initializer_array",
    "plain_tensor",
    "set_initializer",
]



def fit_to_tensor(
    layer: LayerSpec, fit: LayerFit, dtype: np.dtype, settings: LayerSettings, *, exhaustive: bool = True
) -> CompressedTensor:
    """Encode a :class:`~onnx_dc.calibration.layer_problem.LayerFit` as a container in the weight's dtype and layout.

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
        tensor: its :class:`~onnx_dc.codec.tensor.CompressedTensor`, or once fitted layers are
            done with it, the :class:`~onnx_dc.codec.tensor.EncodedTensor` (the container; the
            arrays decoded when asked for).
        settings: the :class:`LayerSettings` used.
        calibrated: False for weights without statistics (plain path).
        criterion: pruning criterion chosen (calibrated layers).
        relative_error: output error / output energy of the layer on the calibration data.
        bias: name of the bias that was refitted, or None.
        note: why the weight took the plain path (e.g. its statistics exceed the memory budget).
    """

    name: str
    tensor: CompressedTensor | EncodedTensor
    settings: LayerSettings
    calibrated: bool
    criterion: str | None = None
    relative_error: float | None = None
    bias: str | None = None
    note: str | None = None  # why a weight took the plain path, when not for lack of a layer


@dataclass
class CalibratedCompression:
    """The result of :func:`compress_with_calibration`.

    ``model`` is a copy of the input model whose refitted biases hold their new
    values (the weights are still the original dense ones): hand it to the
    converter with :meth:`tensor_compressor`
    (``onnx_dc.api.convert.compress_model(c.model, settings, tensor_compressor=c.tensor_compressor())``).
    """

    model: onnx.ModelProto
    results: dict[str, LayerResult] = field(default_factory=dict)
    n_samples: int = 0
    uncalibrated: dict[str, str] = field(default_factory=dict)
    """Weights of the model that could not be calibrated (e.g. in an ``If`` branch the data never take), and why."""

    @property
    def tensors(self) -> dict[str, CompressedTensor]:
        """Compressed tensor per weight name."""
        return {name: r.tensor for name, r in self.results.items()}

    def tensor_compressor(self) -> Callable[..., CompressedTensor]:
        """A ``tensor_compressor`` for :func:`onnx_dc.api.convert.compress_model`: the tensor fitted here for
        every weight in :attr:`results`, the converter's plain path
        (:func:`onnx_dc.codec.tensor.compress_tensor`) for any other."""

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
    jobs: int = 1,
) -> CalibratedCompression:
    """Compress the weights named in ``settings`` using calibration data.

    Args:
        model: the original model (not modified).
        data: calibration samples.
        settings: per weight name, its :class:`LayerSettings`; weights not named are left alone.
        options: :class:`CalibrationOptions`.
        progress: ``True`` for tqdm bars on a terminal, or a callable ``(done, total, name)``.
        jobs: threads: without sequential capture, layers fitted at once (one BLAS thread each; the fits
            do not depend on each other); with it, the per-column solves of the layer being fitted
            (:func:`~onnx_dc.calibration.layer_problem.map_columns`). The results do not depend on ``jobs``.

    Raises:
        ModelError: a named weight is not an initializer of the main graph or a Constant.
        CalibrationError: the data do not fit the model, or onnxruntime fails on them.
    """
    working = onnx.ModelProto()
    working.CopyFrom(model)
    all_layers = find_layers(working)
    budget = options.max_memory_bytes
    # Statistics over the memory budget: fitted without the sequential terms (a third of the
    # memory), or, when even those do not fit, compressed the plain way.
    over_budget = {layer.weight for layer in all_layers if layer.weight in settings and layer.statistics_bytes > budget}
    without_reference = {layer.weight for layer in all_layers if 3 * layer.statistics_bytes > budget}
    layers = [layer for layer in all_layers if layer.weight in settings and layer.weight not in over_budget]
    layer_names = {layer.weight for layer in layers}
    result = CalibratedCompression(working)
    show = progress is True and on_terminal()
    callback = progress if callable(progress) else None
    names_in_order = [n for n in settings if n not in layer_names] + [layer.weight for layer in layers]
    total = len(names_in_order)
    samples = f"{data.n_samples} calibration samples" if data.n_samples >= 0 else "the calibration samples"
    stage_line(progress, f"fitting {len(layers)} layer(s) to {samples}"
               f"{', one after the other' if options.sequential else ''}")
    bar = progress_bar(progress, total, unit="tensor", description="fitting")

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
            note = "statistics over the memory budget (--max-memory)" if name in over_budget else None
            result.results[name] = LayerResult(name, compressed, settings[name], calibrated=False, note=note)
            if options.sequential:
                set_initializer(working, name, compressed.quantized)
            tick(name)

        # A layer fitted in this thread (sequential mode, a group of one) splits its per-column solves and its
        # statistics' row chunks among the threads; layers fitted in threads of their own use one each.
        with column_threads(jobs):
            if options.sequential:
                _fit_sequentially(model, working, data, layers, all_layers, settings, options, budget,
                                  without_reference, result, show, tick)
            else:
                _fit_in_groups(model, working, data, layers, all_layers, settings, options, budget, result, show,
                               tick, jobs)
    finally:
        if bar is not None:
            bar.close()
    # Hand back the original dense weights (the converter compresses them from the
    # precomputed tensors) with the refitted biases; only sequential mode replaced them.
    if options.sequential:
        _restore_tensors(working, model, result.results)
    return result


def _fit_sequentially(
    model, working, data, layers, all_layers, settings, options, budget, without_reference, result, show, tick,
) -> None:
    """Each layer captured on the working model with the layers before it compressed, then fitted."""
    sequential = SequentialCapture(model, data, layers, batch_size=options.batch_size, max_memory_bytes=budget)
    for layer in layers:
        reference = None if layer.weight in without_reference else model
        stats = _sequential_statistics(sequential, working, data, layer, reference, options, show)[layer.weight]
        layer_result, new_bias = _fit_captured(model, layer, stats, all_layers, settings, options)
        result.n_samples = max(result.n_samples, stats.n_samples)
        del stats  # the layer's statistics before the next capture
        set_initializer(working, layer.weight, layer_result.tensor.quantized)
        if new_bias is not None:
            set_initializer(working, layer.bias, new_bias)
        sequential.changed([layer.weight, layer.bias if new_bias is not None else None])
        _record(result, layer, layer_result, tick)


def _fit_in_groups(model, working, data, layers, all_layers, settings, options, budget, result, show, tick, jobs) -> None:
    """The layers captured a budget's worth at a time (one pass over the data per group) on the original
    model, each group fitted (``jobs`` layers at once) and freed before the next is captured."""
    for group in _groups_within(layers, budget):
        statistics = capture_statistics(
            model, data, group, batch_size=options.batch_size, max_memory_bytes=options.max_memory_bytes,
            progress=show, description="calibrating",
        )

        def fit(layer: LayerSpec, statistics: dict[str, LayerStatistics] = statistics):
            stats = statistics[layer.weight]
            return (*_fit_captured(model, layer, stats, all_layers, settings, options), stats.n_samples)

        results = _map_in_order(fit, group, jobs, cost=_fit_cost)
        for layer, (layer_result, new_bias, n_samples) in zip(group, results):
            result.n_samples = max(result.n_samples, n_samples)
            if new_bias is not None:
                set_initializer(working, layer.bias, new_bias)
            statistics.pop(layer.weight, None)  # free its memory
            _record(result, layer, layer_result, tick)


def _fit_captured(model, layer, stats, all_layers, settings, options) -> tuple[LayerResult, np.ndarray | None]:
    """One layer's fit from its statistics."""
    weight = initializer_array(model, layer.weight)
    bias = initializer_array(model, layer.bias) if layer.bias is not None else None
    target = layer_target(model, layer, stats, weight, bias, options, layers=all_layers)
    return fit_one_layer(target, weight, bias, settings[layer.weight], options)


def _record(result, layer, layer_result, tick) -> None:
    # Held as its container: a layer's codes, mask and values would otherwise stay in memory for every
    # layer until the model is written.
    layer_result.tensor = layer_result.tensor.container_only()
    result.results[layer.weight] = layer_result
    tick(layer.weight)


def _fit_cost(layer: LayerSpec) -> float:
    """A rough relative cost of one layer's fit: ``K^2 N``, times ``1 + K / 1000`` for the ``K^3`` factorisations
    of wide layers, plus a per-block overhead (on ppocrv4-rec, one 2 880-input convolution takes 87 s, a
    480 x 480 one 15 s, a depthwise 5 x 5 one of 480 channels 6.5 s)."""
    return float(layer.n_inputs) ** 2 * layer.n_outputs * (1.0 + layer.n_inputs / 1000.0) + 1.5e5 * layer.groups


def _map_in_order(function, items, jobs: int, cost=None):
    """``function`` over ``items``, results in order; ``jobs > 1`` runs that many at once in threads with
    BLAS pinned to one thread (numpy releases the GIL in its heavy work), started costliest first by
    ``cost(item)`` when given, so that a long fit does not start last and leave the other threads idle."""
    if jobs <= 1 or len(items) <= 1:
        yield from map(function, items)
        return
    order = range(len(items)) if cost is None else sorted(range(len(items)), key=lambda i: -cost(items[i]))
    with single_threaded_blas(), ThreadPoolExecutor(max_workers=jobs) as pool:
        submitted = {i: pool.submit(function, items[i]) for i in order}
        futures = [submitted[i] for i in range(len(items))]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _sequential_statistics(
    sequential: SequentialCapture, working: onnx.ModelProto, data: CalibrationData, layer: LayerSpec,
    reference: onnx.ModelProto | None, options: CalibrationOptions, show: bool,
) -> dict[str, LayerStatistics]:
    """One layer's sequential statistics: from the cached values of the layers before it, or captured anew
    when the cache cannot serve (:class:`~onnx_dc.calibration.sequential_capture.SequentialCapture`)."""
    stats = sequential.capture(working, layer, with_reference=reference is not None)
    if stats is not None:
        return {layer.weight: stats}
    return capture_statistics(
        working, data, [layer], reference=reference, batch_size=options.batch_size,
        max_memory_bytes=options.max_memory_bytes, progress=show, description=f"calibrating {layer.weight}",
    )


def _groups_within(layers: Sequence[LayerSpec], budget: int) -> list[list[LayerSpec]]:
    """Consecutive layers whose statistics take at most ``budget`` bytes together (one layer at the least)."""
    groups: list[list[LayerSpec]] = []
    used = budget + 1
    for layer in layers:
        if used + layer.statistics_bytes > budget:
            groups.append([])
            used = 0
        groups[-1].append(layer)
        used += layer.statistics_bytes
    return groups


def _restore_tensors(working: onnx.ModelProto, model: onnx.ModelProto, names: Collection[str]) -> None:
    """Put ``model``'s tensors ``names`` (initializers or Constants) back into ``working`` as they were (a
    reference stays one)."""
    originals = {t.name: t for t in model.graph.initializer if t.name in names}
    for tensor in working.graph.initializer:
        if tensor.name in originals:
            tensor.CopyFrom(originals[tensor.name])
    for name in set(names) - set(originals):
        set_initializer(working, name, initializer_array(model, name))


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
# Initializers








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
        from onnx_dc.calibration.pruning_fit import pruning_path

        path = pruning_path(self.target.problem, todo, rate=self.options.obs_rate)
        self._obs.update(zip(todo, path))

    def fit(self, sparsity: float, bits: int, *, init: str = "linear", seed: int = 0) -> LayerFit:
        """The :func:`onnx_dc.calibration.sharing_fit.fit_layer` result at one setting (the pruning is computed once per sparsity)."""
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
        from onnx_dc.calibration.pruning_fit import refit_weights, select_mask

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
