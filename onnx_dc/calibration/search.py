"""Automatic per-layer settings: the most compression within an accuracy budget.

``onnx-dc compress MODEL -o OUT --calib C.npz --min-cosine 0.999`` (label-free)
or ``--eval E.npz --max-drop 0.5`` (top-1 accuracy, percentage points) searches
a sparsity and a bit width for every layer with calibration statistics (and,
through the output-error proxy of :mod:`onnx_dc.calibration.proxies`, for every
other searched weight: LSTM/GRU, ConvTranspose, Gather embeddings...) so that
the whole model is as small as possible (containers with Huffman coding,
everything else counted too) while the budget holds on data held apart from
the calibration set.

The search, one-shot and reproducible (no randomness except the held-out split
and the random k-means initialisations, both seeded):

1. **Candidates.** From the original model's statistics, every layer is
   compressed at every (sparsity, bits) pair of the grid with the calibrated
   recipe (:class:`onnx_dc.calibration.model_fit.LayerFitter`; the pruning path is shared
   between sparsities). Each candidate has an exact size (its container, with
   the relative-index width that minimises it) and a measured effect: the
   relative output error of the whole model on the search data with only that
   layer compressed (a sensitivity analysis at every grid point). Large models
   (more than :data:`MANY_LAYERS` layers) are searched with a cheap recipe
   (activation-aware pruning without the weight refit, plain k-means; errors that
   the full recipe only lowers), and when running the model for every candidate
   would take more than :data:`MEASURE_ALL_SECONDS`, 1-3 candidates per layer are
   run and the others' effects predicted from their layer errors (the measured
   ratio of output error to layer error, interpolated in log(layer error)).
2. **Path.** Per layer, the candidates on the lower convex hull of (size,
   error) are kept. Starting from every layer at its most accurate candidate,
   the path repeatedly takes the step, over all layers, that saves the most bytes
   per unit of added error (the classic Lagrangian allocation: errors of
   different layers are treated as additive). This gives a sequence of
   configurations of decreasing size.
3. **Budget.** Every configuration of the path is assembled (the candidates'
   weights put together) and run on the search data (when that takes more than
   :data:`PATH_CHECK_SECONDS`, a subset spread evenly in log(size) is). The measured losses
   (``1 - cosine``, top-1 drop) are noisy but increase along the path; they are
   smoothed by isotonic regression, and the most compressed configuration whose
   smoothed and own measurements meet the budget is chosen. With
   ``drop_margin_se`` the top-1 drops must meet it by that many standard errors
   of each configuration's own measurement (:func:`drop_standard_error`), so that
   the budget holds beyond the search data and not only on it.
4. **Final model.** That configuration is compressed for real with the full
   recipe (the non-sequential statistics are reused from step 1; sequentially
   when the options say so: each layer re-fitted with the compressed upstream
   layers in place), converted, and the written model is run end to end on the
   search data. If it misses the budget, the search steps back along the path
   with real compressions: the few configurations just before it one by one
   (measurements are noisy, so passing is not monotone), then a binary search.
   If it meets it, up to :data:`STEP_FORWARD` following configurations are
   compressed for real as well (:func:`_step_forward`; models of at most
   :data:`MANY_LAYERS` layers): the real, sequential compression corrects
   upstream errors that the assembled candidates (each fitted to the original
   model's inputs) cannot, so it often meets the budget further along the path.
   The walk stops at the first real model that misses the budget (with the
   margin), and the choice among the walked ones follows step 3's rule.

Transformers (:mod:`onnx_dc.graph.transformers`; ``transformer=True``) are searched
on their own grid (:data:`TRANSFORMER_SEARCH_SPARSITIES` x :data:`TRANSFORMER_BITS`,
starting unpruned at 8 bits) with the cheap recipe throughout, the final model
included (not sequential), a counted number of model runs, a bisection of the
gap after the chosen path configuration (:func:`_bisect_gap`) and a margin on
the cosine loss (:data:`TRANSFORMER_COSINE_LOSS_SHARE`); no forward steps.

A user task metric (:class:`onnx_dc.calibration.metrics.TaskMetric`, ``metric``)
is computed on every checked configuration and final model; ``budget.min_metric``
bounds it.

Search data: ``--eval`` data when given (inputs and ``labels``), otherwise a
seeded random part of the calibration file held out from the fits (label-free
budgets only). The budget is checked and reported on those data.

Reproducibility: with at most :data:`MANY_LAYERS` searched layers the result
depends only on the inputs and the seed. Larger models size their model runs by
the measured time of one pass over the search data (:func:`_runs_per_layer`,
:func:`_max_path_checks`), so a much faster or busier machine can change which
candidates are measured and so the choice.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from onnx_dc.calibration.budget import Budget, _describe_metrics, _robust_choice, _step_back, _step_forward
from onnx_dc.calibration.capture import capture_statistics, reused_statistics, run_model
from onnx_dc.calibration.data import CalibrationData
from onnx_dc.calibration.layer_problem import column_threads
from onnx_dc.calibration.layers import LayerSpec, find_layers
from onnx_dc.calibration.metrics import OutputMetrics, TaskMetric, compare_outputs, top1_accuracy
from onnx_dc.calibration.model_fit import (
    CalibratedCompression,
    LayerFitter,
    compress_with_calibration,
    initializer_array,
)
from onnx_dc.calibration.options import CalibrationOptions, LayerSettings
from onnx_dc.calibration.proxies import ProxyWeight, find_proxy_weights, proxy_candidates
from onnx_dc.calibration.search_path import (
    Candidate,
    _allocation_path,
    _hull,
    _max_path_checks,
    _measured_indices,
    _predict_output_errors,
    _runs_per_layer,
    _thin_path,
)
from onnx_dc.calibration.search_result import AutotuneResult, LayerChoice
from onnx_dc.calibration.targets import layer_target
from onnx_dc.calibration.transformer_search import (  # noqa: F401 - the grid constants are part of this module's API
    TRANSFORMER_BITS,
    TRANSFORMER_COSINE_LOSS_SHARE,
    TRANSFORMER_GAP_CHECKS,
    TRANSFORMER_MEASURED_PER_LAYER,
    TRANSFORMER_PATH_CHECKS,
    TRANSFORMER_SEARCH_SPARSITIES,
    TRANSFORMER_TABLE_MIN_ELEMENTS,
    bisect_gap,
    cheap_fit_options,
    embedding_tables,
    table_candidates,
    within_margin,
)
from onnx_dc.calibration.weight_swap import WeightSwapRunner
from onnx_dc.errors import CalibrationError, SettingsError
from onnx_dc.progress import on_terminal

__all__ = [
    "DEFAULT_BITS_CONV",
    "DEFAULT_BITS_FC",
    "DEFAULT_SEARCH_SPARSITIES",
    "AutotuneResult",
    "LayerChoice",
    "autotune",
    "default_grids",
]


DEFAULT_SEARCH_SPARSITIES: tuple[float, ...] = (
    0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98,
)
DEFAULT_BITS_FC: tuple[int, ...] = (2, 3, 4, 5, 6)
DEFAULT_BITS_CONV: tuple[int, ...] = (3, 4, 5, 6, 8)
# Models with more layers than this get the coarse grids by default: every grid point of
# every layer costs a fit and a pass over the search data (45 layers x 75 points was hours).
MANY_LAYERS = 12
COARSE_SEARCH_SPARSITIES: tuple[float, ...] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
COARSE_BITS_FC: tuple[int, ...] = (3, 4, 6)
COARSE_BITS_CONV: tuple[int, ...] = (4, 6, 8)
DEFAULT_HOLDOUT_FRACTION = 0.2
STEP_FORWARD = 4  # configurations past the chosen one compressed for real when its final model meets the budget
MAX_HOLDOUT_SAMPLES = 2048


def default_grids(
    n_layers: int, *, transformer: bool = False
) -> tuple[tuple[float, ...], tuple[int, ...], tuple[int, ...]]:
    """``(sparsities, bits_fc, bits_conv)`` searched by default for a model with ``n_layers`` searched layers.

    The fine grids (:data:`DEFAULT_SEARCH_SPARSITIES` x 5 bit widths) up to
    :data:`MANY_LAYERS` layers, the coarse ones (6 x 3) above: the search costs
    one fit and one pass over the search data per layer and grid point. A
    transformer gets :data:`TRANSFORMER_SEARCH_SPARSITIES` x :data:`TRANSFORMER_BITS`,
    whose first point (no pruning, 8 bits) is nearly lossless.
    """
    if transformer:
        return TRANSFORMER_SEARCH_SPARSITIES, TRANSFORMER_BITS, TRANSFORMER_BITS
    if n_layers > MANY_LAYERS:
        return COARSE_SEARCH_SPARSITIES, COARSE_BITS_FC, COARSE_BITS_CONV
    return DEFAULT_SEARCH_SPARSITIES, DEFAULT_BITS_FC, DEFAULT_BITS_CONV






Builder = Callable[[CalibratedCompression], tuple[Any, onnx.ModelProto, str | None]]
"""Converts a calibrated compression into ``(anything to keep, model to run, custom-op library or None)``."""


def _reusing_statistics(function: Callable[..., AutotuneResult]) -> Callable[..., AutotuneResult]:
    """Run ``function`` inside :func:`onnx_dc.calibration.capture.reused_statistics`: the final (non-sequential)
    compression reuses the statistics the candidates were fitted from instead of capturing them again."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> AutotuneResult:
        with reused_statistics():
            return function(*args, **kwargs)

    return wrapper


@_reusing_statistics
def autotune(
    model: onnx.ModelProto,
    calibration: CalibrationData,
    budget: Budget,
    build: Builder,
    *,
    search: CalibrationData | None = None,
    labels: np.ndarray | None = None,
    fixed: Mapping[str, LayerSettings] | None = None,
    searched: Sequence[str] | None = None,
    sparsities: Sequence[float] = DEFAULT_SEARCH_SPARSITIES,
    bits_fc: Sequence[int] = DEFAULT_BITS_FC,
    bits_conv: Sequence[int] = DEFAULT_BITS_CONV,
    options: CalibrationOptions = CalibrationOptions(),
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    seed: int = 0,
    progress: bool | Callable[[str], None] = False,
    drop_margin_se: float = 0.0,
    forward_steps: int | None = None,
    transformer: bool = False,
    metric: TaskMetric | None = None,
    jobs: int = 1,
) -> AutotuneResult:
    """Search per-layer sparsity and bits for the smallest model within ``budget`` (module docstring).

    Args:
        model: the original model (not modified).
        calibration: calibration inputs (for the fits).
        budget: the :class:`Budget`.
        build: converts a :class:`~onnx_dc.calibration.model_fit.CalibratedCompression` into the
            final model (the converter); returns ``(kept object, model to run,
            custom operator library path or None)``.
        search: data held apart from calibration for the budget (``--eval``); when
            None, a seeded part of ``calibration`` is held out (label-free budgets only).
        labels: labels of ``search`` (required by ``max_drop``).
        fixed: settings of weights compressed without search (e.g. without statistics).
        searched: layer weights to search (default: every layer with statistics not in ``fixed``).
        sparsities, bits_fc, bits_conv: the grids (conv bits for Conv layers).
        options: the calibrated recipe (sequential mode applies to the final model).
        holdout_fraction: share of the calibration samples held out when ``search`` is None.
        seed: seed of the held-out split and of random k-means initialisations.
        progress: ``True`` prints progress lines on stderr (off a terminal the stages only), or a callable taking a line.
        drop_margin_se: with ``max_drop``, the path configuration chosen must meet the budget by this
            many standard errors of its measured drop (:func:`drop_standard_error`): 1.0 asks the
            budget to hold beyond the search data with about 84 % confidence instead of 50 %.
            The final model is then checked against the budget itself.
        forward_steps: when the final model of the chosen configuration meets the budget, up to this
            many following configurations of the path are compressed for real too
            (:func:`_step_forward`); 0 turns this off. None (default): :data:`STEP_FORWARD` for models
            of at most :data:`MANY_LAYERS` searched layers, 0 for larger ones (each step is a full
            sequential compression).
        transformer: the model is a transformer (:mod:`onnx_dc.graph.transformers`): the candidates and
            the final model are fitted with the cheap recipe (:func:`_search_options`), the final model
            from the original model's statistics (not sequentially: each sequential capture runs the whole
            model again), and the model runs are counted (:data:`TRANSFORMER_MEASURED_PER_LAYER`
            candidates per layer, :data:`TRANSFORMER_PATH_CHECKS` path checks, then up to
            :data:`TRANSFORMER_GAP_CHECKS` bisection runs between the chosen configuration and the next
            checked one: :func:`_bisect_gap`), not timed.
        metric: the user's task metric, measured on every checked configuration (``budget.min_metric``).
        jobs: threads for the fits: the per-column solves of each layer's candidates, and those of the final
            models (:func:`~onnx_dc.calibration.model_fit.compress_with_calibration`); the result does not
            depend on it.

    Raises:
        CalibrationError: ``max_drop`` without labels, or the budget cannot be met by any
            configuration of the grid.
    """
    say = _Log(progress)
    fixed = dict(fixed or {})
    sparsities = _check_arguments(sparsities, bits_fc, bits_conv, forward_steps, drop_margin_se)
    if budget.min_metric is not None and metric is None:
        raise SettingsError("--min-metric needs --metric module:function")
    if budget.max_drop is not None and (search is None or labels is None):
        raise CalibrationError("--max-drop needs evaluation data with labels (--eval E.npz holding the inputs and 'labels')")
    calibration, search, description = _search_data(calibration, search, holdout_fraction, seed)
    all_layers = find_layers(model)
    proxies = _proxy_weights(model, all_layers, fixed, searched)
    layers = _searched_layers(all_layers, fixed, searched, proxies)
    if forward_steps is None:
        forward_steps = STEP_FORWARD if len(layers) <= MANY_LAYERS and not transformer else 0

    say(f"capturing statistics of {len(layers)} layer(s) on {calibration.n_samples} samples")
    with column_threads(jobs):
        stats = capture_statistics(
            model, calibration, layers, batch_size=options.batch_size, max_memory_bytes=options.max_memory_bytes
        )
    tables = embedding_tables(model, fixed) if transformer else []
    runner = WeightSwapRunner(
        model, _swapped(layers) + [p.weight for p in proxies] + tables, search, batch_size=options.batch_size
    )
    reference, run_seconds = _reference_run(runner)
    baseline = top1_accuracy(reference, labels) if labels is not None else None
    search_options = _search_options(options, len(layers), transformer)
    final_options = cheap_fit_options(options) if transformer else options
    if transformer:
        say("transformer: candidates and the final model fitted with the cheap search recipe (activation-aware "
            "pruning, plain k-means) on the original model's statistics")
    elif search_options != options:
        say("large model: candidates fitted with the cheap search recipe (activation-aware pruning, plain k-means); "
            "the chosen configuration is fitted with the full recipe")
    grid_points = max(
        len(sparsities) * len(bits_conv if layer.op == "Conv" else bits_fc) for layer in [*layers, *proxies]
    )
    per_layer = (
        TRANSFORMER_MEASURED_PER_LAYER if transformer
        else _runs_per_layer(run_seconds, len(layers) + len(proxies), grid_points)
    )
    if per_layer is not None:
        say(f"one pass over the search data takes {run_seconds:.2f} s: the model-level effect of {per_layer} "
            f"candidate(s) per layer is measured, the others' predicted from their layer errors")

    candidates: dict[str, list[Candidate]] = {}
    for index, layer in enumerate(layers):
        grid_bits = bits_conv if layer.op == "Conv" else bits_fc
        with column_threads(jobs):
            found, measured = _layer_candidates(
                model, layer, stats.pop(layer.weight), all_layers, options, search_options, sparsities, grid_bits,
                seed, runner, reference, per_layer, damped=transformer,
            )
        candidates[layer.weight] = found
        say(f"layer {index + 1}/{len(layers)} {layer.weight}: {len(found)} candidates ({measured} measured)",
            detail=not transformer)
    for index, proxy in enumerate(proxies):
        grid_bits = bits_conv if proxy.is_convolution else bits_fc
        found, measured = proxy_candidates(model, proxy, sparsities, grid_bits, seed, runner, reference, per_layer)
        candidates[proxy.weight] = found
        say(f"weight {index + 1}/{len(proxies)} {proxy.weight} (output-error proxy: {proxy.reason}): "
            f"{len(found)} candidates ({measured} measured)", detail=True)

    for name in tables:
        candidates[name] = table_candidates(model, name, fixed[name], bits_fc, seed, runner, reference)
        say(f"embedding table {name}: {len(candidates[name])} candidates (all measured)")

    full_path = _allocation_path({name: _hull(c) for name, c in candidates.items()})
    full_length = len(full_path)
    path = _thin_path(full_path, TRANSFORMER_PATH_CHECKS if transformer else _max_path_checks(run_seconds))
    say(f"search path of {full_length} configurations, {len(path)} of them checked")
    say(f"checking the budget along the path ({len(path)} configurations, one pass over the search data each)")
    biases = {unit.weight: unit.bias for unit in [*layers, *proxies]}
    checked = [_assembled_metrics(config, biases, runner, reference, labels, metric) for config in path]
    if not budget.met(checked[0], baseline):
        raise CalibrationError(
            f"the budget ({budget.describe()}) cannot be met by any setting of the search grid: the least compressed "
            f"configuration gives {_describe_metrics(checked[0], baseline)} on {description}; "
            f"{_closest_flags(sparsities, bits_fc, bits_conv, layers)} without the budget writes that configuration"
        )
    choice_budget = within_margin(budget) if transformer else budget
    best = _robust_choice(checked, choice_budget, baseline, n_samples=search.n_samples, drop_margin_se=drop_margin_se)
    within = f" (chosen for {choice_budget.describe()}, a margin for new inputs)" if choice_budget != budget else ""
    if choice_budget != budget and not choice_budget.met(checked[best], baseline):
        within = f", not the margin for new inputs ({choice_budget.describe()})"
    say(f"assembled configuration {best}/{len(path) - 1} meets the budget{within}: "
        f"{_describe_metrics(checked[best], baseline)}")
    if transformer and best < len(path) - 1:
        refined = bisect_gap(
            full_path, path, checked, best,
            lambda config: _assembled_metrics(config, biases, runner, reference, labels, metric),
            lambda metrics: choice_budget.met(metrics, baseline),
        )
        if refined != best:
            best = refined
            say(f"a configuration between it and the next checked one meets the budget too (now {best}/"
                f"{len(path) - 1}): {_describe_metrics(checked[best], baseline)}")

    path_settings = [
        {name: LayerSettings(sparsity=c.sparsity, bits=c.bits, index_bits=None, seed=seed) for name, c in config.items()}
        for config in path
    ]
    finals = _FinalModels(
        model, calibration, fixed, path_settings, final_options, build, search, reference, labels, baseline, say, metric,
        jobs,
    )
    best = finals.refine(best, budget, forward_steps, drop_margin_se)
    final = finals.results[best]
    return AutotuneResult(
        settings=final.settings,
        choices=[_layer_choice(unit, final.compression) for unit in [*layers, *proxies]],
        compression=final.compression,
        built=final.kept,
        metrics=final.metrics,
        budget=budget,
        baseline_accuracy=baseline,
        budget_met=budget.met(final.metrics, baseline),
        predicted=checked[best] if best < len(checked) else None,
        search_description=description,
        n_search_samples=search.n_samples,
        n_fit_samples=calibration.n_samples,
        verified_with="onnx-dc custom operator library" if final.library else "decompressed model (standard operators)",
        path_length=full_length,
        path=path_settings,
        chosen_index=best,
        steps=say.lines,
    )


class _Log:
    """The search's log lines, echoed to a callable or (``True``) to stderr: every line on a terminal,
    elsewhere the stages only (not the per-layer ``detail`` lines)."""

    def __init__(self, progress: bool | Callable[[str], None]) -> None:
        self.progress = progress
        self.lines: list[str] = []

    def __call__(self, line: str, *, detail: bool = False) -> None:
        self.lines.append(line)
        if callable(self.progress):
            self.progress(line)
        elif self.progress is True and (on_terminal() or not detail):
            print(f"onnx-dc: {line}", file=sys.stderr, flush=True)


def _check_arguments(
    sparsities: Sequence[float], bits_fc: Sequence[int], bits_conv: Sequence[int], forward_steps: int | None,
    drop_margin_se: float,
) -> list[float]:
    """Validate the grids and the search's numbers; the sorted distinct sparsities."""
    sparsities = sorted({float(s) for s in sparsities})
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise SettingsError(f"search sparsities must be in [0, 1), got {s}")
    for b in list(bits_fc) + list(bits_conv):
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= 8:
            raise SettingsError(f"search bits must be integers in [1, 8], got {b!r}")
    if forward_steps is not None and (
        isinstance(forward_steps, bool) or not isinstance(forward_steps, (int, np.integer)) or forward_steps < 0
    ):
        raise SettingsError(f"forward_steps must be an integer >= 0, got {forward_steps!r}")
    if isinstance(drop_margin_se, bool) or not isinstance(drop_margin_se, (int, float)) or not (
        math.isfinite(drop_margin_se) and drop_margin_se >= 0
    ):
        raise SettingsError(f"drop_margin_se must be a finite number >= 0, got {drop_margin_se!r}")
    return sparsities


def _search_data(
    calibration: CalibrationData, search: CalibrationData | None, holdout_fraction: float, seed: int
) -> tuple[CalibrationData, CalibrationData, str]:
    """(fit data, budget data, description of the budget data): ``search``, or a seeded held-out part."""
    if search is not None:
        return calibration, search, search.description or "evaluation data"
    calibration = calibration.materialised()
    n_holdout = min(MAX_HOLDOUT_SAMPLES, max(1, int(round(holdout_fraction * calibration.n_samples))))
    if calibration.n_samples - n_holdout < 1:
        raise CalibrationError(f"{calibration.n_samples} calibration sample(s) are too few to hold some apart for the budget")
    calibration, search = calibration.split(n_holdout, seed=seed)
    return calibration, search, f"the calibration data (held out, seed {seed})"


def _searched_layers(
    all_layers: Sequence[LayerSpec], fixed: Mapping[str, LayerSettings], searched: Sequence[str] | None,
    proxies: Sequence[ProxyWeight] = (),
) -> list[LayerSpec]:
    layers = [layer for layer in all_layers if layer.weight not in fixed]
    if searched is not None:
        wanted = set(searched)
        layers = [layer for layer in layers if layer.weight in wanted]
    if not layers and not proxies:
        raise CalibrationError("no weight to search: no layer with calibration statistics and no other weight "
                               "that the calibration data reach")
    return layers


def _proxy_weights(
    model: onnx.ModelProto, all_layers: Sequence[LayerSpec], fixed: Mapping[str, LayerSettings],
    searched: Sequence[str] | None,
) -> list[ProxyWeight]:
    """The searched weights without statistics (:mod:`onnx_dc.calibration.proxies`)."""
    names = [t.name for t in model.graph.initializer] if searched is None else list(searched)
    return find_proxy_weights(model, all_layers, [n for n in names if n not in fixed])


def _swapped(layers: Sequence[LayerSpec]) -> list[str]:
    """The initializers a candidate replaces: every searched weight and its bias."""
    return [layer.weight for layer in layers] + [layer.bias for layer in layers if layer.bias]


def _reference_run(runner: WeightSwapRunner) -> tuple[dict[str, np.ndarray], float]:
    """The original model's outputs on the search data, and the seconds one pass takes (what every check costs)."""
    started = time.perf_counter()
    reference = runner.run()
    run_seconds = time.perf_counter() - started
    if run_seconds > 0.05:  # the first run pays onnxruntime's warm-up: time a second one
        started = time.perf_counter()
        runner.run()
        run_seconds = min(run_seconds, time.perf_counter() - started)
    return reference, run_seconds


def _layer_candidates(
    model: onnx.ModelProto, layer: LayerSpec, stats, all_layers: Sequence[LayerSpec], options: CalibrationOptions,
    search_options: CalibrationOptions, sparsities: Sequence[float], grid_bits: Sequence[int], seed: int,
    runner: WeightSwapRunner, reference: Mapping[str, np.ndarray], per_layer: int | None, damped: bool = False,
) -> tuple[list[Candidate], int]:
    """Every grid point of one layer fitted on the original statistics, with its size and output error.

    ``damped``: compare the candidates by the fits' damped objective
    (:meth:`~onnx_dc.calibration.layer_problem.LayerProblem.damped_relative_error`), not the plain output error.

    Returns the candidates and how many had their model-level effect measured (the others' is predicted).
    """
    weight = initializer_array(model, layer.weight)
    bias = initializer_array(model, layer.bias) if layer.bias else None
    target = layer_target(model, layer, stats, weight, bias, options, layers=all_layers)
    fitter = LayerFitter(target, weight, search_options)
    fitter.prepare([s for s in sparsities if s > 0])
    cheap = search_options != options
    # A transformer's calibration inputs leave some channels unexcited (Whisper's last MLP: 604 of 1536 hidden
    # units silent on six clips, active on others): with the undamped error, pruning them looks free.
    layer_error = target.problem.damped_relative_error if damped else target.problem.relative_error
    found: list[Candidate] = []
    replacements: list[dict[str, np.ndarray]] = []
    for s in sparsities:
        for b in grid_bits:
            fit = fitter.fit(s, int(b), seed=seed)
            tensor, new_bias = fitter.tensor(
                fit, LayerSettings(sparsity=s, bits=int(b), index_bits=None, seed=seed), exhaustive=not cheap
            )
            replacement = {layer.weight: tensor.quantized}
            if new_bias is not None and bias is not None:
                new_bias = new_bias.reshape(bias.shape).astype(bias.dtype)
                replacement[layer.bias] = new_bias  # type: ignore[index]
            replacements.append(replacement)
            found.append(
                Candidate(
                    s, int(b), tensor.size_bytes, math.nan,
                    layer_error(layer.to_blocks(tensor.quantized)),
                    tensor.quantized, new_bias, tensor.settings.index_bits,
                )
            )
    measured = _measured_indices([c.layer_error for c in found], per_layer)
    for i in measured:
        found[i].output_error = compare_outputs(reference, runner.run(replacements[i])).relative_error
    _predict_output_errors(found, measured)
    return found, len(measured)


def _assembled_metrics(
    config: Mapping[str, Candidate], biases: Mapping[str, str | None], runner: WeightSwapRunner,
    reference: Mapping[str, np.ndarray], labels: np.ndarray | None, metric: TaskMetric | None = None,
) -> OutputMetrics:
    """The model with every layer of ``config`` at its candidate (fitted on the original inputs), on the search data."""
    replacement: dict[str, np.ndarray] = {}
    for name, cand in config.items():
        replacement[name] = cand.weight
        if cand.bias is not None and biases.get(name) is not None:
            replacement[biases[name]] = cand.bias
    return compare_outputs(reference, runner.run(replacement), labels, metric)


@dataclass
class _FinalModel:
    """One path configuration compressed for real (the full recipe, sequential when asked) and run end to end."""

    settings: dict[str, LayerSettings]
    compression: CalibratedCompression
    kept: Any
    library: str | None
    metrics: OutputMetrics


class _FinalModels:
    """Path configurations compressed for real on demand, each once; and the walk along the path with them."""

    def __init__(
        self, model, calibration, fixed, path_settings, options, build, search, reference, labels, baseline, say, metric,
        jobs,
    ):
        self.model, self.calibration, self.fixed = model, calibration, fixed
        self.path_settings, self.options, self.build = path_settings, options, build
        self.search, self.reference, self.labels, self.baseline, self.say = search, reference, labels, baseline, say
        self.metric, self.jobs = metric, jobs
        self.results: dict[int, _FinalModel] = {}

    def get(self, i: int) -> _FinalModel:
        """Configuration ``i`` compressed, converted and measured (cached)."""
        if i not in self.results:
            chosen = dict(self.path_settings[i])
            compression = compress_with_calibration(
                self.model, self.calibration, {**self.fixed, **chosen}, self.options, jobs=self.jobs
            )
            kept, runnable, library = self.build(compression)
            outputs = run_model(runnable, self.search, batch_size=self.options.batch_size, library=library)
            metrics = compare_outputs(self.reference, {k: outputs[k] for k in self.reference}, self.labels, self.metric)
            self.say(f"final model for configuration {i}: {_describe_metrics(metrics, self.baseline)}")
            self.results[i] = _FinalModel(chosen, compression, kept, library, metrics)
        return self.results[i]

    def refine(self, best: int, budget: Budget, forward_steps: int, drop_margin_se: float) -> int:
        """The configuration returned: ``best`` compressed for real, then stepped forward or back along the path."""
        last = len(self.path_settings) - 1
        if budget.met(self.get(best).metrics, self.baseline) and forward_steps > 0 and best < last:
            # The assembled configurations fit every layer to the original model's inputs; the real
            # (sequential) compression corrects upstream errors and usually measures better, so the next
            # configurations of the path may meet the budget too once compressed for real.
            best = _step_forward(
                lambda i: self.get(i).metrics, best, min(last, best + forward_steps), budget, self.baseline,
                n_samples=self.search.n_samples, drop_margin_se=drop_margin_se,
            )
            self.say(f"configuration {best} chosen after compressing the next ones for real")
        if not budget.met(self.results[best].metrics, self.baseline):
            # The real (e.g. sequential) compression misses what the assembled one met: step back.
            best = _step_back(lambda i: budget.met(self.get(i).metrics, self.baseline), best)
        return best


def _layer_choice(layer: LayerSpec, compression: CalibratedCompression) -> LayerChoice:
    r = compression.results[layer.weight]
    return LayerChoice(
        layer.weight, layer.op, tuple(layer.weight_shape), r.settings.sparsity, r.settings.bits,
        r.tensor.settings.index_bits, r.tensor.size_bytes, r.tensor.original_size_bytes, r.criterion, r.relative_error,
    )


def _closest_flags(
    sparsities: Sequence[float], bits_fc: Sequence[int], bits_conv: Sequence[int], layers: Sequence[LayerSpec],
) -> str:
    """The command-line settings of the grid's least compressed configuration, per kind of searched layer."""
    kinds = sorted({"conv" if layer.op == "Conv" else "fc" for layer in layers} or {"fc"})
    bits = {"fc": max(bits_fc), "conv": max(bits_conv)}
    sparsity = ",".join(f"{kind}={min(sparsities):g}" for kind in kinds)
    return f"--sparsity {sparsity} --bits " + ",".join(f"{kind}={bits[kind]}" for kind in kinds)


def _search_options(options: CalibrationOptions, n_layers: int, transformer: bool = False) -> CalibrationOptions:
    """The recipe the candidates are fitted with: ``options`` itself, or the cheap one (large models, transformers)."""
    if transformer:
        return cheap_fit_options(options)
    if n_layers <= MANY_LAYERS:
        return options
    criterion = "activation" if options.criterion in ("auto", "obs") else options.criterion
    return replace(options, criterion=criterion, refit_weights=False, refit_rounds=0)
