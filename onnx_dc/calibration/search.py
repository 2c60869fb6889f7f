"""Automatic per-layer settings: the most compression within an accuracy budget.

``onnx-dc compress MODEL -o OUT --calib C.npz --min-cosine 0.999`` (label-free)
or ``--eval E.npz --max-drop 0.5`` (top-1 accuracy, percentage points) searches
a sparsity and a bit width for every layer with calibration statistics so that
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
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from onnx_dc.calibration.budget import (
    Budget,
    _describe_metrics,
    _robust_choice,
    _step_back,
    _step_forward,
)
from onnx_dc.calibration.capture import capture_statistics, reused_statistics, run_model
from onnx_dc.calibration.data import CalibrationData
from onnx_dc.calibration.layers import LayerSpec, find_layers
from onnx_dc.calibration.metrics import OutputMetrics, compare_outputs, top1_accuracy
from onnx_dc.calibration.model_fit import (
    CalibratedCompression,
    LayerFitter,
    compress_with_calibration,
    initializer_array,
)
from onnx_dc.calibration.options import CalibrationOptions, LayerSettings
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
from onnx_dc.calibration.targets import layer_target
from onnx_dc.calibration.weight_swap import WeightSwapRunner
from onnx_dc.errors import CalibrationError, SettingsError

__all__ = [
    "AutotuneResult",
    "DEFAULT_BITS_CONV",
    "DEFAULT_BITS_FC",
    "DEFAULT_SEARCH_SPARSITIES",
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


def default_grids(n_layers: int) -> tuple[tuple[float, ...], tuple[int, ...], tuple[int, ...]]:
    """``(sparsities, bits_fc, bits_conv)`` searched by default for a model with ``n_layers`` searched layers.

    The fine grids (:data:`DEFAULT_SEARCH_SPARSITIES` x 5 bit widths) up to
    :data:`MANY_LAYERS` layers, the coarse ones (6 x 3) above: the search costs
    one fit and one pass over the search data per layer and grid point.
    """
    if n_layers > MANY_LAYERS:
        return COARSE_SEARCH_SPARSITIES, COARSE_BITS_FC, COARSE_BITS_CONV
    return DEFAULT_SEARCH_SPARSITIES, DEFAULT_BITS_FC, DEFAULT_BITS_CONV


@dataclass(frozen=True)
class LayerChoice:
    """What the search chose for one layer and what it gave in the final model."""

    name: str
    op: str
    shape: tuple[int, ...]
    sparsity: float
    bits: int
    index_bits: int
    size_bytes: int
    original_bytes: int
    criterion: str | None
    relative_error: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "name": self.name,
            "op": self.op,
            "shape": list(self.shape),
            "sparsity": self.sparsity,
            "bits": self.bits,
            "index_bits": self.index_bits,
            "bytes": self.size_bytes,
            "original_bytes": self.original_bytes,
            "criterion": self.criterion,
            "layer_relative_error": self.relative_error,
        }


@dataclass
class AutotuneResult:
    """Outcome of :func:`autotune`.

    Attributes:
        settings: the chosen :class:`~onnx_dc.calibration.options.LayerSettings` per searched layer.
        choices: per searched layer, what was chosen and what it gave.
        compression: the final :class:`~onnx_dc.calibration.model_fit.CalibratedCompression`.
        built: what the ``build`` callback returned for it (the converted model and its report).
        metrics: the final model's :class:`~onnx_dc.calibration.metrics.OutputMetrics` on the search data.
        baseline_accuracy: the original model's accuracy on the search data (with labels).
        budget_met: whether the final model meets the budget.
        predicted: metrics of the assembled (non-sequential) configuration the search chose.
        search_description, n_search_samples, n_fit_samples: what the budget was measured on.
        verified_with: how the final model was run.
        path_length: configurations on the whole search path (before thinning).
        path: the configurations whose budget was checked, in path order (most accurate first), as
            per-layer settings of the searched layers; the trade-off curve the choice was made on.
        chosen_index: the index in ``path`` of the configuration returned.
        steps: log lines of the search.
    """

    settings: dict[str, LayerSettings]
    choices: list[LayerChoice]
    compression: CalibratedCompression
    built: Any
    metrics: OutputMetrics
    budget: Budget
    baseline_accuracy: float | None
    budget_met: bool
    predicted: OutputMetrics | None
    search_description: str
    n_search_samples: int
    n_fit_samples: int
    verified_with: str
    path_length: int = 0
    path: list[dict[str, LayerSettings]] = field(default_factory=list)
    chosen_index: int | None = None
    steps: list[str] = field(default_factory=list)

    def achieved(self) -> str:
        """The achieved budget as text, e.g. ``cosine 0.99942 (>= 0.999)``."""
        parts = []
        if self.budget.min_cosine is not None:
            parts.append(f"cosine {self.metrics.cosine:.6f} (budget >= {self.budget.min_cosine:g})")
        if self.budget.max_drop is not None and self.metrics.accuracy is not None and self.baseline_accuracy is not None:
            drop = 100.0 * (self.baseline_accuracy - self.metrics.accuracy)
            parts.append(
                f"top-1 {100 * self.metrics.accuracy:.2f} % vs {100 * self.baseline_accuracy:.2f} % "
                f"original, drop {drop:.2f} pp (budget <= {self.budget.max_drop:g} pp)"
            )
        return "; ".join(parts)

    def format_summary(self) -> str:
        """The per-layer choices and the achieved budget, for the command line."""
        header = ["layer", "op", "shape", "sparsity", "bits", "idx bits", "bytes", "ratio", "criterion", "layer err"]
        rows = [header]
        for c in self.choices:
            rows.append(
                [
                    c.name,
                    c.op,
                    "x".join(map(str, c.shape)),
                    f"{c.sparsity:.2f}",
                    str(c.bits),
                    str(c.index_bits),
                    f"{c.size_bytes:,}",
                    f"{c.original_bytes / c.size_bytes:.1f}x" if c.size_bytes else "-",
                    c.criterion or "plain",
                    f"{c.relative_error:.2e}" if c.relative_error is not None else "-",
                ]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [f"automatic settings ({self.budget.describe()} on {self.n_search_samples} samples of {self.search_description}; "
                 f"fitted on {self.n_fit_samples} calibration samples):"]
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(widths[j]) if j in (0, 1, 2, 8) else cell.rjust(widths[j]) for j, cell in enumerate(row)))
            if i == 0:
                lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
        verdict = "met" if self.budget_met else "NOT met"
        lines.append(f"budget {verdict}: {self.achieved()} [final model run end to end: {self.verified_with}]")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "budget": {"min_cosine": self.budget.min_cosine, "max_drop": self.budget.max_drop},
            "budget_met": self.budget_met,
            "search_data": self.search_description,
            "search_samples": self.n_search_samples,
            "fit_samples": self.n_fit_samples,
            "baseline_accuracy": self.baseline_accuracy,
            "final": self.metrics.to_dict(),
            "predicted": None if self.predicted is None else self.predicted.to_dict(),
            "verified_with": self.verified_with,
            "layers": [c.to_dict() for c in self.choices],
            "path_length": self.path_length,
        }


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
        progress: ``True`` prints progress lines on stderr (terminal only), or a callable taking a line.
        drop_margin_se: with ``max_drop``, the path configuration chosen must meet the budget by this
            many standard errors of its measured drop (:func:`drop_standard_error`): 1.0 asks the
            budget to hold beyond the search data with about 84 % confidence instead of 50 %.
            The final model is then checked against the budget itself.
        forward_steps: when the final model of the chosen configuration meets the budget, up to this
            many following configurations of the path are compressed for real too
            (:func:`_step_forward`); 0 turns this off. None (default): :data:`STEP_FORWARD` for models
            of at most :data:`MANY_LAYERS` searched layers, 0 for larger ones (each step is a full
            sequential compression).

    Raises:
        CalibrationError: ``max_drop`` without labels, or the budget cannot be met by any
            configuration of the grid.
    """
    log: list[str] = []

    def say(line: str) -> None:
        log.append(line)
        if callable(progress):
            progress(line)
        elif progress is True and sys.stderr.isatty():
            print(f"onnx-dc: {line}", file=sys.stderr, flush=True)

    fixed = dict(fixed or {})
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
    if budget.max_drop is not None and (search is None or labels is None):
        raise CalibrationError("--max-drop needs evaluation data with labels (--eval E.npz holding the inputs and 'labels')")
    if search is None:
        calibration = calibration.materialised()
        n_holdout = min(MAX_HOLDOUT_SAMPLES, max(1, int(round(holdout_fraction * calibration.n_samples))))
        if calibration.n_samples - n_holdout < 1:
            raise CalibrationError(f"{calibration.n_samples} calibration sample(s) are too few to hold some apart for the budget")
        calibration, search = calibration.split(n_holdout, seed=seed)
        description = f"the calibration data (held out, seed {seed})"
    else:
        description = search.description or "evaluation data"

    all_layers = find_layers(model)
    layers = [layer for layer in all_layers if layer.weight not in fixed]
    if searched is not None:
        wanted = set(searched)
        layers = [layer for layer in layers if layer.weight in wanted]
    if not layers:
        raise CalibrationError("no layer with calibration statistics to search (MatMul/Gemm/Conv weights)")

    say(f"capturing statistics of {len(layers)} layer(s) on {calibration.n_samples} samples")
    stats = capture_statistics(model, calibration, layers, batch_size=options.batch_size, max_memory_bytes=options.max_memory_bytes)
    swap = [layer.weight for layer in layers] + [layer.bias for layer in layers if layer.bias]
    runner = WeightSwapRunner(model, swap, search, batch_size=options.batch_size)
    started = time.perf_counter()
    reference = runner.run()
    run_seconds = time.perf_counter() - started  # one pass over the search data: what every measurement costs
    if run_seconds > 0.05:  # the first run pays onnxruntime's warm-up: time a second one
        started = time.perf_counter()
        runner.run()
        run_seconds = min(run_seconds, time.perf_counter() - started)
    baseline = top1_accuracy(reference, labels) if labels is not None else None

    search_options = _search_options(options, len(layers))
    cheap = search_options != options
    if search_options != options:
        say("large model: candidates fitted with the cheap search recipe (activation-aware pruning, plain k-means); "
            "the chosen configuration is fitted with the full recipe")
    grid_points = max(len(sparsities) * len(bits_conv if layer.op == "Conv" else bits_fc) for layer in layers)
    per_layer = _runs_per_layer(run_seconds, len(layers), grid_points)
    if per_layer is not None:
        say(f"one pass over the search data takes {run_seconds:.2f} s: the model-level effect of {per_layer} "
            f"candidate(s) per layer is measured, the others' predicted from their layer errors")

    candidates: dict[str, list[Candidate]] = {}
    fits: dict[str, tuple[LayerSpec, LayerFitter]] = {}
    for index, layer in enumerate(layers):
        weight = initializer_array(model, layer.weight)
        bias = initializer_array(model, layer.bias) if layer.bias else None
        target = layer_target(model, layer, stats.pop(layer.weight), weight, bias, options, layers=all_layers)
        fitter = LayerFitter(target, weight, search_options)
        fitter.prepare([s for s in sparsities if s > 0])
        fits[layer.weight] = (layer, fitter)
        grid_bits = bits_conv if layer.op == "Conv" else bits_fc
        found = []
        replacements = []
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
                        target.problem.relative_error(layer.to_blocks(tensor.quantized)),
                        tensor.quantized, new_bias, tensor.settings.index_bits,
                    )
                )
        measured = _measured_indices([c.layer_error for c in found], per_layer)
        for i in measured:
            found[i].output_error = compare_outputs(reference, runner.run(replacements[i])).relative_error
        _predict_output_errors(found, measured)
        candidates[layer.weight] = found
        say(f"layer {index + 1}/{len(layers)} {layer.weight}: {len(found)} candidates ({len(measured)} measured)")

    path = _allocation_path({name: _hull(c) for name, c in candidates.items()})
    full_length = len(path)
    path = _thin_path(path, _max_path_checks(run_seconds))
    say(f"search path of {full_length} configurations, {len(path)} of them checked")

    def assembled(config: Mapping[str, Candidate]) -> OutputMetrics:
        replacement: dict[str, np.ndarray] = {}
        for name, cand in config.items():
            layer = fits[name][0]
            replacement[name] = cand.weight
            if cand.bias is not None and layer.bias is not None:
                replacement[layer.bias] = cand.bias
        return compare_outputs(reference, runner.run(replacement), labels)

    say(f"checking the budget along the path ({len(path)} configurations, one pass over the search data each)")
    checked = [assembled(config) for config in path]
    if not budget.met(checked[0], baseline):
        raise CalibrationError(
            f"the budget ({budget.describe()}) cannot be met by any setting of the search grid: the least compressed "
            f"configuration gives {_describe_metrics(checked[0], baseline)} on {description}"
        )
    best = _robust_choice(checked, budget, baseline, n_samples=search.n_samples, drop_margin_se=drop_margin_se)
    say(f"assembled configuration {best}/{len(path) - 1} meets the budget: {_describe_metrics(checked[best], baseline)}")

    path_settings = [
        {name: LayerSettings(sparsity=c.sparsity, bits=c.bits, index_bits=None, seed=seed) for name, c in config.items()}
        for config in path
    ]

    def final(i: int) -> tuple[dict[str, LayerSettings], CalibratedCompression, Any, onnx.ModelProto, str | None, OutputMetrics]:
        chosen = dict(path_settings[i])
        compression = compress_with_calibration(model, calibration, {**fixed, **chosen}, options)
        kept, runnable, library = build(compression)
        outputs = run_model(runnable, search, batch_size=options.batch_size, library=library)
        metrics = compare_outputs(reference, {k: outputs[k] for k in reference}, labels)
        say(f"final model for configuration {i}: {_describe_metrics(metrics, baseline)}")
        return chosen, compression, kept, runnable, library, metrics

    results = {best: final(best)}
    if forward_steps is None:
        forward_steps = STEP_FORWARD if len(layers) <= MANY_LAYERS else 0
    if budget.met(results[best][5], baseline) and forward_steps > 0 and best < len(path) - 1:
        # The assembled configurations fit every layer to the original model's inputs; the real
        # (sequential) compression corrects upstream errors and usually measures better, so the next
        # configurations of the path may meet the budget too once compressed for real.
        def real_metrics(i: int) -> OutputMetrics:
            if i not in results:
                results[i] = final(i)
            return results[i][5]

        best = _step_forward(
            real_metrics, best, min(len(path) - 1, best + forward_steps), budget, baseline,
            n_samples=search.n_samples, drop_margin_se=drop_margin_se,
        )
        say(f"configuration {best} chosen after compressing the next ones for real")
    if not budget.met(results[best][5], baseline):
        # The real (e.g. sequential) compression misses what the assembled one met: step back.
        def real_passes(i: int) -> bool:
            if i not in results:
                results[i] = final(i)
            return budget.met(results[i][5], baseline)

        best = _step_back(real_passes, best)
    chosen, compression, kept, runnable, library, metrics = results[best]
    choices = []
    for layer in layers:
        r = compression.results[layer.weight]
        choices.append(
            LayerChoice(
                layer.weight, layer.op, tuple(layer.weight_shape), r.settings.sparsity, r.settings.bits,
                r.tensor.settings.index_bits, r.tensor.size_bytes, r.tensor.original_size_bytes,
                r.criterion, r.relative_error,
            )
        )
    return AutotuneResult(
        settings=chosen,
        choices=choices,
        compression=compression,
        built=kept,
        metrics=metrics,
        budget=budget,
        baseline_accuracy=baseline,
        budget_met=budget.met(metrics, baseline),
        predicted=checked[best] if best < len(checked) else None,
        search_description=description,
        n_search_samples=search.n_samples,
        n_fit_samples=calibration.n_samples,
        verified_with="onnx-dc custom operator library" if library else "decompressed model (standard operators)",
        path_length=full_length,
        path=path_settings,
        chosen_index=best,
        steps=log,
    )


def _search_options(options: CalibrationOptions, n_layers: int) -> CalibrationOptions:
    """The recipe the candidates are fitted with: ``options`` itself, or the cheap one for large models."""
    if n_layers <= MANY_LAYERS:
        return options
    criterion = "activation" if options.criterion in ("auto", "obs") else options.criterion
    return replace(options, criterion=criterion, refit_weights=False, refit_rounds=0)
