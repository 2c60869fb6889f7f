"""The Python API: ``compress``, ``decompress``, ``inspect``, ``validate``, ``sensitivity``.

Every function accepts a model as a path (external data is loaded from beside
it) or as an ``onnx.ModelProto`` (never modified), and, where it writes a
model, writes it atomically. User mistakes raise
:class:`~onnx_dc.errors.OnnxDcError` subclasses with a one-line message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnx_dc.api.convert import (
    CompressionResult,
    ProgressCallback,
    _check_written_model,
    _source_size_bytes,
    compress_model,
)
from onnx_dc.api.recipe import Recipe
from onnx_dc.api.report import ModelReport, model_report
from onnx_dc.api.validation import DEFAULT, ThresholdArgument, ValidationReport, validate_models
from onnx_dc.errors import ModelError, SettingsError
from onnx_dc.graph.model_io import ModelSource, check_output_path, load_model, save_model
from onnx_dc.graph.operators import MODEL_META_RUNTIME, MODEL_META_VERSION
from onnx_dc.graph.restore import decompress_model
from onnx_dc.graph.settings import SettingValue
from onnx_dc.graph.tensor_store import read_structure

if TYPE_CHECKING:
    from onnx_dc.calibration.data import CalibrationSource, EvaluationSource


def compress(
    model: ModelSource,
    output: str | os.PathLike | None = None,
    recipe: Recipe | None = None,
    *,
    calib: CalibrationSource | None = None,
    eval_data: EvaluationSource | None = None,
    sparsity: SettingValue = None,
    bits: SettingValue = None,
    progress: bool | ProgressCallback = False,
    external_data: bool | None = None,
    jobs: int | None = None,
) -> CompressionResult:
    """Compress the weights of an ONNX model with Deep Compression, as ``recipe`` says.

    Args:
        model: a path (external data is read from beside it) or an ``onnx.ModelProto`` (not modified).
        output: where to write the compressed model, atomically (with external data when over
            2 GB or ``external_data=True``); None returns it only.
        recipe: the :class:`~onnx_dc.api.recipe.Recipe` (default: the data-free defaults).
        calib: calibration inputs (an ``.npz`` keyed by input name, a dict of arrays or an
            iterable of feeds): the layers are fitted to them (``recipe.calibration``); with
            ``recipe.search`` the per-layer settings are searched within its budget.
        eval_data: held-out inputs (and ``labels`` for ``max_drop``) the search's budget is
            measured on; default: a seeded part of ``calib`` held apart.
        sparsity, bits: shorthand for ``Recipe.build(recipe, sparsity=..., bits=...)``: one
            value, ``KEY=VALUE,...`` text or a dict by kind, name or glob
            (:mod:`onnx_dc.graph.settings`).
        progress: ``True`` shows a bar on a terminal (weights, their rate, the time left) and one line
            per stage on stderr otherwise (:mod:`onnx_dc.progress`); a callable gets ``(done, total, name)``.
        external_data: force (True) or forbid (False) external data for the output.
        jobs: worker processes compressing tensors at once, and threads of a calibration's fits (layers
            at once without sequential capture, a layer's column solves with it; default: every core).
            An execution option, not part of the recipe: the output is the same for every value.

    Returns:
        The :class:`~onnx_dc.api.convert.CompressionResult`: model, per-layer report, and
        ``recipe``, the recipe that reproduces it (a search's choice spelled out per tensor).

    See docs/USAGE.md and docs/CALIBRATION.md.
    """
    recipe = Recipe.build(recipe, sparsity=sparsity, bits=bits)
    if calib is not None:
        from onnx_dc.api.calibrated import compress_calibrated

        return compress_calibrated(
            model, recipe, calib, eval_data=eval_data, output=output, progress=progress, external_data=external_data,
            jobs=jobs,
        )
    if recipe.search is not None or eval_data is not None:
        raise SettingsError("a budget search (--min-cosine, --max-drop) and --eval need calibration data (--calib)")
    return compress_model(model, recipe, output=output, progress=progress, external_data=external_data, jobs=jobs)


def decompress(
    model: ModelSource,
    output: str | os.PathLike | None = None,
    *,
    external_data: bool | None = None,
) -> onnx.ModelProto:
    """Turn a compressed model back into standard ONNX (original ops, dense quantized weights).

    The result runs on plain onnxruntime without the custom operator library.
    Written atomically to ``output`` when given.
    """
    if output is not None:
        check_output_path(output, [model] if not isinstance(model, onnx.ModelProto) else [])
    proto = load_model(model)
    decompress_model(proto)
    _check_written_model(proto, model)
    if output is not None:
        save_model(proto, output, external_data=external_data)
    return proto


def inspect(model: ModelSource) -> ModelReport:
    """The per-layer report of a compressed model (the table ``compress`` prints).

    A model file is read without its weights: only the containers' bytes, one at a time.

    Raises:
        ModelError: the model holds no onnx-dc containers (not compressed, decompressed, or
            compressed with every weight left dense): there is nothing to inspect.
    """
    if isinstance(model, onnx.ModelProto):
        proto = load_model(model)
        report = model_report(proto, compressed_file_bytes=_source_size_bytes(model))
    else:
        proto = read_structure(model)
        report = model_report(proto, compressed_file_bytes=_source_size_bytes(model),
                              base_dir=Path(model).resolve().parent)
    if not report.tensors:
        what = "the model" if isinstance(model, onnx.ModelProto) else str(model)
        raise ModelError(f"{what} holds no onnx-dc containers: {_why_no_containers(proto)}")
    return report


def _why_no_containers(model: onnx.ModelProto) -> str:
    metadata = {entry.key for entry in model.metadata_props}
    if MODEL_META_RUNTIME in metadata:
        return "onnx-dc left every weight of it dense, so there is no per-layer table"
    if MODEL_META_VERSION in metadata:
        return "it was decompressed (onnx-dc decompress) and is standard ONNX again"
    return "it is not a compressed model (onnx-dc compress MODEL -o OUT makes one)"


def validate(
    original: ModelSource,
    compressed: ModelSource,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    *,
    max_abs_diff: ThresholdArgument = None,
    min_cosine: ThresholdArgument = DEFAULT,
    min_top1_agreement: ThresholdArgument = DEFAULT,
    use_library: bool | None = None,
) -> ValidationReport:
    """Run both models on the same inputs and compare their outputs (see :mod:`onnx_dc.api.validation`).

    The same defaults as ``onnx-dc validate``: every float output's cosine >= 0.99 and, on given
    ``inputs``, top-1 agreement >= 95 % for classifier-shaped outputs (last axis >= 2). A number
    replaces a default; ``None`` checks nothing (``min_cosine=None, min_top1_agreement=None``: no
    thresholds, only finite outputs of the original's shapes). ``report.passed`` is the verdict.
    Model files are run from their paths (onnxruntime reads their external data itself).
    """
    return validate_models(
        original if isinstance(original, onnx.ModelProto) else Path(original),
        compressed if isinstance(compressed, onnx.ModelProto) else Path(compressed),
        inputs=inputs,
        max_abs_diff=max_abs_diff,
        min_cosine=min_cosine,
        min_top1_agreement=min_top1_agreement,
        use_library=use_library,
    )


def sensitivity(
    model: ModelSource,
    calib,
    *,
    eval_data=None,
    calib_samples: int | None = None,
    sparsities: Sequence[float] | None = None,
    bits: Sequence[int] | None = None,
    method: str = "calibrated",
    calibration=None,
    progress: bool = False,
):
    """Per-layer output error (and top-1 with labelled ``eval_data``) vs sparsity and vs bits.

    Returns a :class:`onnx_dc.calibration.sensitivity.SensitivityReport` (``to_dict()`` is the
    JSON of ``onnx-dc sensitivity``; :func:`onnx_dc.calibration.sensitivity.plot_sensitivity` plots it).
    """
    from onnx_dc.api.calibrated import sensitivity as _sensitivity
    from onnx_dc.calibration.data import DEFAULT_MAX_SAMPLES
    from onnx_dc.calibration.sensitivity import DEFAULT_BITS, DEFAULT_SPARSITIES

    return _sensitivity(
        model, calib, eval_data=eval_data,
        calib_samples=DEFAULT_MAX_SAMPLES if calib_samples is None else calib_samples,
        sparsities=DEFAULT_SPARSITIES if sparsities is None else sparsities,
        bits=DEFAULT_BITS if bits is None else bits,
        method=method, options=calibration, progress=progress,
    )
