"""The calibrated verbs behind ``onnx_dc.compress(..., calib=...)`` and ``onnx_dc.calibration.sensitivity``.

``compress`` with calibration data takes the same settings as without
(``--sparsity``, ``--bits``, ... per kind or tensor name; see
:mod:`onnx_dc.graph.settings`) and applies them with the calibrated recipe of
:mod:`onnx_dc.calibration.model_fit` to every layer whose input can be captured; with a
budget (``min_cosine`` or ``max_drop``) the per-layer sparsity and bits of those
layers are searched instead (:mod:`onnx_dc.calibration.search`), while the remaining
weights keep their settings. Weights outside the main graph, or without
statistics, take the plain path in every case.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from onnx_dc.calibration.budget import Budget
from onnx_dc.calibration.data import (
    DEFAULT_MAX_SAMPLES,
    CalibrationData,
    load_calibration,
    read_labels,
)
from onnx_dc.calibration.layers import find_layers
from onnx_dc.calibration.model_fit import (
    CalibratedCompression,
    compress_with_calibration,
)
from onnx_dc.calibration.options import CalibrationOptions, LayerSettings
from onnx_dc.calibration.search import AutotuneResult, autotune, default_grids
from onnx_dc.calibration.sensitivity import (
    DEFAULT_BITS,
    DEFAULT_SPARSITIES,
    SensitivityReport,
    analyze_sensitivity,
)
from onnx_dc.errors import CalibrationError, LibraryNotFoundError, SettingsError
from onnx_dc.graph.model_io import (
    ModelSource,
    check_output_path,
    constants_to_initializers,
    load_model,
    save_model,
)
from onnx_dc.graph.settings import CompressionSettings
from onnx_dc.graph.weights import find_weights

__all__ = ["CalibrationSource", "compress_calibrated", "load_evaluation", "sensitivity"]

CalibrationSource = str | os.PathLike | Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]] | CalibrationData


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
    settings: CompressionSettings,
    calib: CalibrationSource,
    *,
    output: str | os.PathLike | None = None,
    options: CalibrationOptions | None = None,
    calib_samples: int | None = DEFAULT_MAX_SAMPLES,
    min_cosine: float | None = None,
    max_drop: float | None = None,
    drop_margin_se: float = 0.0,
    eval_data: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    search_sparsities: Sequence[float] | None = None,
    search_bits: Sequence[int] | None = None,
    progress: bool | Callable[..., None] = False,
    external_data: bool | None = None,
):
    """Compress with calibration data, optionally searching per-layer settings within a budget.

    Weights in main-graph ``Constant`` nodes are first moved to initializers
    (:func:`onnx_dc.graph.model_io.constants_to_initializers`) so that they are fitted too.
    The automatic search uses :func:`onnx_dc.calibration.search.default_grids` unless
    ``search_sparsities`` / ``search_bits`` are given.

    ``drop_margin_se`` (with ``max_drop``): the searched configuration must meet
    the top-1 budget by that many standard errors of its own measured drop
    (:func:`onnx_dc.calibration.search.autotune`); 0 checks the budget as measured.

    Returns the converter's :class:`onnx_dc.api.convert.CompressionResult` with
    ``calibration`` set to the :class:`~onnx_dc.calibration.model_fit.CalibratedCompression`
    or, with a budget, the :class:`~onnx_dc.calibration.search.AutotuneResult`.
    """
    from onnx_dc.api.convert import compress_model

    options = options or CalibrationOptions()
    if output is not None:
        check_output_path(output, [model] if not isinstance(model, onnx.ModelProto) else [])
    # Weights held in main-graph Constant nodes (PaddlePaddle exports) become initializers, so they get statistics.
    proto = constants_to_initializers(load_model(model))
    data = load_calibration(calib, proto, max_samples=calib_samples)
    plans = settings.plan(find_weights(proto, min_elements=0))
    main_graph = {t.name for t in proto.graph.initializer} | {
        n.output[0] for n in proto.graph.node if n.op_type == "Constant" and n.output
    }
    layer_settings: dict[str, LayerSettings] = {}
    for plan in plans:
        weight = plan.weight
        if plan.settings is None or weight.scope.parent is not None or weight.name not in main_graph:
            continue
        values = weight.to_array() if plan.settings.quality is not None else None
        layer_settings[weight.name] = LayerSettings.from_resolved(plan.settings, values)

    if drop_margin_se and max_drop is None:
        raise SettingsError("--drop-margin-se is used with --max-drop")
    if min_cosine is None and max_drop is None:
        if eval_data is not None:
            raise SettingsError("--eval is used with a budget (--max-drop or --min-cosine)")
        compression = compress_with_calibration(proto, data, layer_settings, options, progress=progress)
        result = compress_model(
            compression.model, settings, output=output, progress=progress,
            external_data=external_data, tensor_compressor=compression.tensor_compressor(),
        )
        result.calibration = compression
        return result

    budget = Budget(min_cosine=min_cosine, max_drop=max_drop)
    search, labels = (None, None)
    if eval_data is not None:
        search, labels = load_evaluation(eval_data, proto, need_labels=max_drop is not None)
    elif max_drop is not None:
        raise CalibrationError("--max-drop needs --eval E.npz (evaluation inputs and their 'labels')")
    layer_names = {layer.weight for layer in find_layers(proto)}
    searched = [name for name in layer_settings if name in layer_names]
    fixed = {name: s for name, s in layer_settings.items() if name not in layer_names}
    library = _library_or_none()
    grid_sparsities, grid_bits_fc, grid_bits_conv = default_grids(len(searched))

    def build(compression: CalibratedCompression):
        built = compress_model(compression.model, settings, tensor_compressor=compression.tensor_compressor())
        runnable = built.model
        if library is None:
            from onnx_dc.graph.restore import decompress_model

            runnable = onnx.ModelProto()
            runnable.CopyFrom(built.model)
            decompress_model(runnable)
        return built, runnable, library

    tuned = autotune(
        proto, data, budget, build,
        search=search, labels=labels, fixed=fixed, searched=searched,
        sparsities=search_sparsities if search_sparsities is not None else grid_sparsities,
        bits_fc=search_bits if search_bits is not None else grid_bits_fc,
        bits_conv=search_bits if search_bits is not None else grid_bits_conv,
        drop_margin_se=drop_margin_se,
        options=options, seed=_seed(settings), progress=progress is True,
    )
    result = tuned.built
    if output is not None:
        saved = save_model(result.model, output, external_data=external_data)
        result.saved = saved
        result.report.compressed_file_bytes = saved.size_bytes
        result.report.notes[:] = [n for n in result.report.notes if not n.startswith("compressed size: serialized")]
    result.calibration = tuned
    return result


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
    proto = constants_to_initializers(load_model(model))
    data = load_calibration(calib, proto, max_samples=calib_samples)
    evaluation, labels = (None, None)
    if eval_data is not None:
        evaluation, labels = load_evaluation(eval_data, proto, need_labels=False)
    return analyze_sensitivity(
        proto, data, evaluation=evaluation, labels=labels, sparsities=sparsities, bits=bits,
        method=method, options=options, layers=layers, progress=progress,
    )


def _seed(settings: CompressionSettings) -> int:
    return int(getattr(settings, "seed", 0))


def _library_or_none() -> str | None:
    try:
        from onnx_dc.graph.library import ops_library_path

        return str(ops_library_path())
    except (ImportError, LibraryNotFoundError):
        return None


def describe_calibration(calibration: Any) -> str:
    """Text for the command line: the autotune summary, or the per-layer fit table."""
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
                    r.criterion or "plain (no statistics)",
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
