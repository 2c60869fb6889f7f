"""The calibrated verbs behind ``onnx_dc.compress(..., calib=...)`` and ``onnx_dc.sensitivity``.

``compress`` with calibration data takes the same recipe as without (per-kind
or per-tensor ``sparsity``, ``bits``...; see :mod:`onnx_dc.graph.settings`) and
applies it with the calibrated fits of :mod:`onnx_dc.calibration.model_fit` to
every layer whose input can be captured; with a search in the recipe (a budget,
``min_cosine`` or ``max_drop``) the per-layer sparsity and bits of those layers
are searched instead (:mod:`onnx_dc.calibration.search`), together with the
compressed weights that have no statistics but that the data reach (the
output-error proxy of :mod:`onnx_dc.calibration.proxies`), while the remaining
weights keep their settings. Everything runs on the calibration view of
:mod:`onnx_dc.calibration.subgraphs` (If branches the data take inlined,
subgraph constants lifted) and is carried back to the model's own structure;
weights of branches the data never take keep the plain path and are named in
the report's notes. The result's recipe spells out what a search chose, so that
``--recipe`` reproduces the model without searching.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx_dc.api.convert import CompressionResult, compress_model, prepare_model, record_recipe, refuse_compressed_input
from onnx_dc.api.parallel import default_jobs
from onnx_dc.api.recipe import Recipe
from onnx_dc.calibration.data import (
    DEFAULT_MAX_SAMPLES,
    CalibrationData,
    CalibrationSource,
    EvaluationSource,
    load_calibration,
    read_labels,
)
from onnx_dc.calibration.layers import find_layers
from onnx_dc.calibration.metrics import load_task_metric
from onnx_dc.calibration.model_fit import CalibratedCompression, compress_with_calibration
from onnx_dc.calibration.options import CalibrationOptions, LayerSettings
from onnx_dc.calibration.proxies import find_proxy_weights
from onnx_dc.calibration.search import (
    DEFAULT_HOLDOUT_FRACTION,
    MAX_HOLDOUT_SAMPLES,
    AutotuneResult,
    autotune,
    default_grids,
)
from onnx_dc.calibration.sensitivity import DEFAULT_BITS, DEFAULT_SPARSITIES, SensitivityReport, analyze_sensitivity
from onnx_dc.calibration.subgraphs import CalibrationView, calibration_view
from onnx_dc.calibration.transformer_search import calib_fit_options, cheap_fit_options
from onnx_dc.errors import CalibrationError, LibraryNotFoundError, ModelError, SettingsError
from onnx_dc.graph.model_io import (
    ModelSource,
    check_output_path,
    constants_to_initializers,
    load_model,
    model_file_bytes,
    save_model,
)
from onnx_dc.graph.restore import decompress_model
from onnx_dc.graph.tensor_store import open_model
from onnx_dc.graph.transformers import is_transformer
from onnx_dc.graph.weights import find_weights

__all__ = ["calibration_notes", "compress_calibrated", "load_evaluation", "sensitivity"]


def load_evaluation(
    source: str | os.PathLike | Mapping[str, np.ndarray], model: onnx.ModelProto, *, need_labels: bool
) -> tuple[CalibrationData, np.ndarray | None]:
    """Evaluation inputs (the axis-0 rule of calibration data) and their ``labels`` if present.

    Raises:
        CalibrationError: unreadable data, or no labels when ``need_labels``.
    """
    arrays = source
    if isinstance(source, (str, os.PathLike)):
        from onnx_dc.calibration.data import read_npz

        arrays = read_npz(source)
    if not isinstance(arrays, Mapping):
        raise CalibrationError("evaluation data must be an .npz file or a dict of arrays (inputs and 'labels')")
    name = str(source) if isinstance(source, (str, os.PathLike)) else "evaluation data"
    data = load_calibration(arrays, model, max_samples=None, allow_labels=True)
    data.description = name
    labels = None
    if "labels" in arrays:
        labels = read_labels(arrays)
        if labels.size != data.n_samples:
            raise CalibrationError(f"{name}: {labels.size} labels for {data.n_samples} samples")
    elif need_labels:
        raise CalibrationError(f"{name}: no 'labels' array; --max-drop needs labels for top-1 accuracy")
    return data, labels


def compress_calibrated(
    model: ModelSource,
    recipe: Recipe,
    calib: CalibrationSource,
    *,
    eval_data: EvaluationSource | None = None,
    output: str | os.PathLike | None = None,
    progress: bool | Callable[..., None] = False,
    external_data: bool | None = None,
    jobs: int | None = None,
) -> CompressionResult:
    """Compress with calibration data as ``recipe`` says: fitted settings, or a search within its budget.

    Weights in main-graph ``Constant`` nodes are first moved to initializers
    (:func:`onnx_dc.graph.model_io.constants_to_initializers`) so that they are fitted too.
    Returns the :class:`onnx_dc.api.convert.CompressionResult` with ``calibration`` set to the
    :class:`~onnx_dc.calibration.model_fit.CalibratedCompression` or, with a search, the
    :class:`~onnx_dc.calibration.search.AutotuneResult`; its ``recipe`` spells out what a search chose.
    """
    if output is not None:
        check_output_path(output, [model] if not isinstance(model, onnx.ModelProto) else [])
    source_dir = _streamed_source_dir(model, recipe)
    loaded = open_model(model, anchored=True) if source_dir is not None else load_model(model)
    refuse_compressed_input(loaded, model)
    # Weights held in main-graph Constant nodes (PaddlePaddle exports) become initializers, so they get statistics.
    proto = constants_to_initializers(loaded)
    prepared = prepare_model(proto, source_dir)  # folded and shared first: the layers are fitted as they will run
    data = load_calibration(calib, proto, max_samples=recipe.calibration.samples)
    if recipe.search is None and eval_data is not None:
        raise SettingsError("--eval is used with a budget (--max-drop or --min-cosine)")
    # If branches the data take are inlined and subgraph weights lifted, so that they are fitted or searched too.
    view = calibration_view(proto, data, batch_size=recipe.calibration.options.batch_size)
    planned = {p.weight.name for p in recipe.settings().plan(find_weights(proto, min_elements=0)) if p.settings is not None}
    view.uncalibrated = {name: why for name, why in view.uncalibrated.items() if name in planned}
    # With a budget, the weights the search cannot measure keep the standard defaults (an embedding table at
    # 8 bits costs 1.5e-5 of cosine on all-MiniLM-L6-v2, at the transformer default's 5 bits about 1e-3).
    layer_settings = _layer_settings(view.model, recipe, transformer=recipe.search is None and is_transformer(proto))
    if recipe.search is None:
        return _compress_fitted(
            view, recipe, data, layer_settings, output, progress, external_data, prepared, jobs, source_dir
        )
    return _compress_searched(
        view, recipe, data, eval_data, layer_settings, output, progress, external_data, prepared, jobs
    )


def _layer_settings(proto: onnx.ModelProto, recipe: Recipe, *, transformer: bool) -> dict[str, LayerSettings]:
    """The calibrated path's settings of every planned main-graph weight (``transformer``: with the
    transformer defaults, :data:`onnx_dc.graph.defaults.TRANSFORMER_DEFAULTS`)."""
    main_graph = {t.name for t in proto.graph.initializer} | {
        n.output[0] for n in proto.graph.node if n.op_type == "Constant" and n.output
    }
    layer_settings: dict[str, LayerSettings] = {}
    for plan in recipe.settings().plan(find_weights(proto, min_elements=0), transformer=transformer):
        weight = plan.weight
        if plan.settings is None or weight.scope.parent is not None or weight.name not in main_graph:
            continue
        values = weight.to_array() if plan.settings.quality is not None else None
        layer_settings[weight.name] = LayerSettings.from_resolved(plan.settings, values)
    return layer_settings


def _compress_fitted(
    view: CalibrationView, recipe, data, layer_settings, output, progress, external_data, prepared, jobs=None,
    source_dir=None,
) -> CompressionResult:
    """Every layer fitted with its settings as given (``recipe.calibration.holdout`` samples left out)."""
    if recipe.calibration.holdout:
        data, _ = data.materialised().split(recipe.calibration.holdout, seed=recipe.seed)
    options, note = _fit_options(view.model, recipe.calibration.options)
    fit_jobs = default_jobs() if jobs is None else jobs
    compression = view.restore(
        compress_with_calibration(view.model, data, layer_settings, options, progress=progress, jobs=fit_jobs)
    )
    result = compress_model(
        compression.model, recipe, output=output, progress=progress,
        external_data=external_data, tensor_compressor=compression.tensor_compressor(), prepared=prepared,
        jobs=jobs, source_dir=source_dir,
    )
    result.report.notes.extend(([note] if note else []) + calibration_notes(compression))
    result.calibration = compression
    return result


STREAMED_CALIBRATION_BYTES = 128 << 20
"""Model files (with their external data) at least this large are fitted with their weights left in the
files (:func:`onnx_dc.graph.tensor_store.open_model`), when no search is asked for."""

LARGE_FIT_COST = 3e10
"""Above this sum of ``K^2 N`` over the fitted layers (``K`` inputs, ``N`` outputs), ``--calib`` alone with the
default options fits with :func:`~onnx_dc.calibration.transformer_search.cheap_fit_options`: the full
recipe's per-column weight refits cost about ``N K^3`` per layer (a 2048 x 2048 layer took over three
minutes), the cheap one a few ``K^2 N`` products. The zoo's convolutional models and LeNets stay below."""


def _streamed_source_dir(model: ModelSource, recipe: Recipe) -> Path | None:
    """The model's directory when it is fitted with its weights left in its files, else None."""
    if recipe.search is not None or not isinstance(model, (str, os.PathLike)):
        return None
    try:
        size = model_file_bytes(model)
    except (OSError, ValueError, ModelError):
        return None  # load_model says what is wrong with the file
    return Path(model).resolve().parent if size >= STREAMED_CALIBRATION_BYTES else None


def _fit_options(model: onnx.ModelProto, options: CalibrationOptions) -> tuple[CalibrationOptions, str]:
    """The options of ``--calib`` alone given the default options: a transformer is fitted with
    :func:`~onnx_dc.calibration.transformer_search.calib_fit_options`, a model whose layers cost more than
    :data:`LARGE_FIT_COST` with :func:`~onnx_dc.calibration.transformer_search.cheap_fit_options`, each said
    in a note."""
    defaults = CalibrationOptions()
    if replace(options, batch_size=defaults.batch_size, max_memory_bytes=defaults.max_memory_bytes) != defaults:
        return options, ""
    explicit = "calibration options given explicitly are used as given"
    if is_transformer(model):
        fitted = calib_fit_options(options)
        return fitted, (
            f"transformer: layers fitted on the original model's statistics with activation-aware pruning, k-means "
            f"and {fitted.refit_rounds} rounds of centroid refit, and the bias correction (no weight refits, no "
            f"sequential captures); {explicit}"
        )
    cost = sum(_fit_cost(layer) for layer in find_layers(model))
    if cost <= LARGE_FIT_COST:
        return options, ""
    return cheap_fit_options(options), (
        f"large layers (sum of K^2 N {cost:.1e} over {LARGE_FIT_COST:.0e}): fitted on the original model's "
        f"statistics with activation-aware pruning, k-means and the bias correction (no weight or centroid "
        f"refits, no sequential captures: the full recipe would take hours); {explicit}"
    )


def _fit_cost(layer) -> float:
    return float(layer.n_inputs) ** 2 * layer.n_outputs


def _compress_searched(
    view: CalibrationView, recipe, data, eval_data, layer_settings, output, progress, external_data, prepared,
    jobs=None,
):
    """The automatic search of :mod:`onnx_dc.calibration.search`, then the chosen model written.

    Searched: every layer with statistics and every other compressed weight the data reach
    (:mod:`onnx_dc.calibration.proxies`); the remaining weights keep their settings."""
    proto = view.model
    search_recipe = recipe.search
    budget = search_recipe.budget
    data, search, labels, holdout = _search_data(proto, recipe, data, eval_data)
    transformer = is_transformer(proto)
    layers = find_layers(proto)
    # A transformer's embedding tables are searched by the transformer path (autotune's tables), not as proxies.
    proxies = {} if transformer else {
        proxy.weight: proxy.reason for proxy in find_proxy_weights(proto, layers, list(layer_settings))
    }
    searchable = {layer.weight for layer in layers} | set(proxies)
    searched = [name for name in layer_settings if name in searchable]
    fixed = {name: s for name, s in layer_settings.items() if name not in searchable}
    library = _library_or_none()
    grid_sparsities, grid_bits_fc, grid_bits_conv = default_grids(len(searched), transformer=transformer)
    metric = load_task_metric(search_recipe.metric) if search_recipe.metric is not None else None
    # A transformer's weights without statistics keep the standard defaults (compress_calibrated), or the bits
    # the search chose for its embedding tables: named explicitly in the recipe the converter plans with and in
    # the recipe recorded, which would otherwise give them the transformer defaults.
    kept_settings = {
        name: {"sparsity": s.sparsity, "bits": s.bits, "index_bits": s.index_bits} for name, s in fixed.items()
    } if transformer else {}
    fit_recipe = recipe.without_search(kept_settings)

    def build(compression: CalibratedCompression):
        compression = view.restore(compression)
        built = compress_model(
            compression.model, fit_recipe, tensor_compressor=compression.tensor_compressor(), prepared=prepared
        )
        runnable = built.model
        if library is None:
            runnable = onnx.ModelProto()
            runnable.CopyFrom(built.model)
            decompress_model(runnable)
        return built, runnable, library

    tuned = autotune(
        proto, data, budget, build,
        search=search, labels=labels, fixed=fixed, searched=searched,
        sparsities=search_recipe.sparsities if search_recipe.sparsities is not None else grid_sparsities,
        bits_fc=search_recipe.bits if search_recipe.bits is not None else grid_bits_fc,
        bits_conv=search_recipe.bits if search_recipe.bits is not None else grid_bits_conv,
        drop_margin_se=search_recipe.drop_margin_se,
        options=recipe.calibration.options, seed=recipe.seed, progress=progress is True,
        transformer=transformer, metric=metric, jobs=default_jobs() if jobs is None else jobs,
    )
    result = tuned.built
    for name in kept_settings:  # the embedding tables a transformer search chose bits for
        fitted = tuned.compression.results.get(name)
        if fitted is not None:
            kept_settings[name] = {
                "sparsity": fitted.settings.sparsity, "bits": fitted.settings.bits,
                "index_bits": fitted.tensor.settings.index_bits,
            }
    result.recipe = _chosen_recipe(recipe, tuned, holdout, kept_settings)
    record_recipe(result.model, result.recipe)
    result.report.recipe = result.recipe
    if output is not None:
        saved = save_model(result.model, output, external_data=external_data)
        result.saved = saved
        result.report.compressed_file_bytes = saved.size_bytes
        result.report.notes[:] = [n for n in result.report.notes if not n.startswith("compressed size: serialized")]
    tuned.compression = view.restore(tuned.compression)
    for name, reason in proxies.items():
        if name in tuned.compression.results:
            tuned.compression.results[name].note = f"searched by the model's output error: {reason}"
    result.report.notes.extend(calibration_notes(tuned.compression))
    result.calibration = tuned
    return result


def _search_data(proto, recipe, data, eval_data):
    """(fit data, search data, labels, samples held out of the calibration data for the budget)."""
    search_recipe = recipe.search
    if eval_data is not None:
        search, labels = load_evaluation(eval_data, proto, need_labels=search_recipe.max_drop is not None)
        return data, search, labels, 0
    if search_recipe.max_drop is not None:
        raise CalibrationError("--max-drop needs --eval E.npz (evaluation inputs and their 'labels')")
    data = data.materialised()
    holdout = recipe.calibration.holdout or min(
        MAX_HOLDOUT_SAMPLES, max(1, int(round(DEFAULT_HOLDOUT_FRACTION * data.n_samples)))
    )
    if data.n_samples - holdout < 1:
        raise CalibrationError(f"{data.n_samples} calibration sample(s) are too few to hold some apart for the budget")
    data, search = data.split(holdout, seed=recipe.seed)
    search.description = f"the calibration data (held out, seed {recipe.seed})"
    return data, search, None, holdout


def _chosen_recipe(
    recipe: Recipe, tuned: AutotuneResult, holdout: int, kept_settings: Mapping[str, Mapping[str, Any]]
) -> Recipe:
    """The recipe that reproduces the searched model without searching: each searched layer's settings by name
    (and ``kept_settings``, the unsearched weights named explicitly)."""
    per_tensor = dict(kept_settings)
    per_tensor.update(
        (c.name, {"sparsity": c.sparsity, "bits": c.bits, "index_bits": c.index_bits}) for c in tuned.choices
    )
    calibration = replace(recipe.calibration, holdout=holdout)
    return replace(recipe.without_search(per_tensor), calibration=calibration)


def sensitivity(
    model: ModelSource,
    calib: CalibrationSource,
    *,
    eval_data: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    calib_samples: int | None = DEFAULT_MAX_SAMPLES,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    bits: Sequence[int] = DEFAULT_BITS,
    method: str = "calibrated",
    options: CalibrationOptions | None = None,
    layers: Sequence[str] | None = None,
    progress: bool | Callable[..., None] = False,
) -> SensitivityReport:
    """Per-layer sensitivity to pruning and weight sharing (see :mod:`onnx_dc.calibration.sensitivity`)."""
    loaded = load_model(model)
    refuse_compressed_input(loaded, model)
    proto = constants_to_initializers(loaded)
    data = load_calibration(calib, proto, max_samples=calib_samples)
    evaluation, labels = (None, None)
    if eval_data is not None:
        evaluation, labels = load_evaluation(eval_data, proto, need_labels=False)
    return analyze_sensitivity(
        proto, data, evaluation=evaluation, labels=labels, sparsities=sparsities, bits=bits,
        method=method, options=options, layers=layers, progress=progress,
    )


def _library_or_none() -> str | None:
    try:
        from onnx_dc.graph.library import ops_library_path

        return str(ops_library_path())
    except (ImportError, LibraryNotFoundError):
        return None


def calibration_notes(compression: CalibratedCompression) -> list[str]:
    """One line per weight that was not fitted to statistics: searched by a proxy, or not calibrated at all."""
    notes = [
        f"{r.name}: {r.note}" for r in compression.results.values()
        if r.note is not None and r.note.startswith("searched by")
    ]
    notes += [f"{name}: not calibrated ({why}); plain recipe" for name, why in compression.uncalibrated.items()]
    return notes


def describe_calibration(calibration: Any) -> str:
    """Text for the command line: the autotune summary, or the per-layer fit table (the weights
    without statistics of their own are in the report's notes, :func:`calibration_notes`)."""
    if isinstance(calibration, AutotuneResult):
        return calibration.format_summary()
    if isinstance(calibration, CalibratedCompression):
        header = ["layer", "sparsity", "bits", "criterion", "layer rel. error", "bias refitted"]
        rows = [header]
        for r in calibration.results.values():
            rows.append(
                [
                    r.name,
                    f"{r.settings.sparsity:.2f}",
                    str(r.settings.bits),
                    r.criterion or f"plain ({r.note or 'no statistics'})",
                    f"{r.relative_error:.2e}" if r.relative_error is not None else "-",
                    r.bias or "-",
                ]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [f"calibrated fits ({calibration.n_samples} calibration samples):"]
        for i, row in enumerate(rows):
            lines.append("  ".join(c.ljust(widths[j]) for j, c in enumerate(row)).rstrip())
            if i == 0:
                lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
        return "\n".join(lines)
    return ""
