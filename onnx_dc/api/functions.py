"""The Python API: ``compress``, ``decompress``, ``inspect``, ``validate``.

Every function accepts a model as a path (external data is loaded from beside
it) or as an ``onnx.ModelProto`` (never modified), and, where it writes a
model, writes it atomically. User mistakes raise
:class:`~onnx_dc.errors.OnnxDcError` subclasses with a one-line message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnx_dc.api.convert import (
    CompressionResult,
    ProgressCallback,
    TensorCompressor,
    _check_written_model,
    _source_size_bytes,
    compress_model,
)
from onnx_dc.api.report import ModelReport, model_report
from onnx_dc.api.validate import ValidationReport, validate_models
from onnx_dc.errors import SettingsError
from onnx_dc.graph.model_io import (
    ModelSource,
    check_output_path,
    load_model,
    save_model,
)
from onnx_dc.graph.restore import decompress_model
from onnx_dc.graph.settings import (
    SettingValue,
    parse_settings,
)


def compress(
    model: ModelSource,
    output: str | os.PathLike | None = None,
    *,
    sparsity: SettingValue = None,
    quality: SettingValue = None,
    bits: SettingValue = None,
    index_bits: SettingValue = None,
    init: SettingValue = None,
    exclude: str | Sequence[str] | None = None,
    min_elements: int | None = None,
    seed: int = 0,
    progress: bool | ProgressCallback = False,
    external_data: bool | None = None,
    tensor_compressor: TensorCompressor | None = None,
    calib=None,
    calib_samples: int | None = None,
    calibration=None,
    min_cosine: float | None = None,
    max_drop: float | None = None,
    drop_margin_se: float | None = None,
    eval_data=None,
    search_sparsities: Sequence[float] | None = None,
    search_bits: Sequence[int] | None = None,
) -> CompressionResult:
    """Compress the weights of an ONNX model with Deep Compression.

    Settings take one value for every tensor, a ``KEY=VALUE,...`` string or a
    dict keyed by kind (``fc``, ``conv``, ``other``), tensor name or glob; see
    :mod:`onnx_dc.graph.settings` for the grammar and the per-kind defaults. When
    ``output`` is given the model is written there atomically (with external
    data when over 2 GB or ``external_data=True``). ``progress=True`` shows a
    tqdm bar per tensor; a callable gets ``(done, total, tensor_name)``.
    ``tensor_compressor`` replaces the per-tensor pipeline (used by calibrated
    compression); by default :func:`onnx_dc.codec.tensor.compress_tensor`.

    With ``calib`` (an ``.npz`` keyed by input name, a dict of arrays or an
    iterable of feeds; at most ``calib_samples`` samples, default 4096) the layers
    are fitted to calibration data with the options ``calibration``
    (:class:`onnx_dc.calibration.options.CalibrationOptions`); with a budget,
    ``min_cosine`` and/or ``max_drop`` (percentage points of top-1, needs
    ``eval_data`` with ``labels``), the per-layer sparsity and bits are searched
    over ``search_sparsities`` x ``search_bits``; ``drop_margin_se`` makes the
    searched configuration meet ``max_drop`` by that many standard errors of
    its measured drop. See docs/CALIBRATION.md and
    :mod:`onnx_dc.api.calibrated`.
    """
    settings = parse_settings(
        sparsity=sparsity,
        quality=quality,
        bits=bits,
        index_bits=index_bits,
        init=init,
        exclude=exclude,
        min_elements=min_elements,
        seed=seed,
    )
    if calib is not None:
        from onnx_dc.api.calibrated import compress_calibrated
        from onnx_dc.calibration.data import DEFAULT_MAX_SAMPLES

        if tensor_compressor is not None:
            raise SettingsError("tensor_compressor cannot be combined with calib")
        return compress_calibrated(
            model, settings, calib, output=output, options=calibration,
            calib_samples=DEFAULT_MAX_SAMPLES if calib_samples is None else calib_samples,
            min_cosine=min_cosine, max_drop=max_drop, eval_data=eval_data,
            drop_margin_se=0.0 if drop_margin_se is None else drop_margin_se,
            search_sparsities=search_sparsities, search_bits=search_bits,
            progress=progress, external_data=external_data,
        )
    if any(
        v is not None
        for v in (calib_samples, calibration, min_cosine, max_drop, drop_margin_se, eval_data, search_sparsities,
                  search_bits)
    ):
        raise SettingsError("calibration options (budget, --eval, --calib-samples...) need calibration data (--calib)")
    return compress_model(
        model,
        settings,
        output=output,
        progress=progress,
        external_data=external_data,
        tensor_compressor=tensor_compressor,
    )


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
    """The per-layer report of a compressed model (the table ``compress`` prints)."""
    proto = load_model(model)
    size = _source_size_bytes(model)
    report = model_report(proto, compressed_file_bytes=size)
    return report


def validate(
    original: ModelSource,
    compressed: ModelSource,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    *,
    max_abs_diff: float | None = None,
    min_cosine: float | None = None,
    use_library: bool | None = None,
) -> ValidationReport:
    """Run both models on the same inputs and compare their outputs (see :mod:`onnx_dc.api.validate`)."""
    return validate_models(
        load_model(original),
        load_model(compressed),
        inputs=inputs,
        max_abs_diff=max_abs_diff,
        min_cosine=min_cosine,
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
