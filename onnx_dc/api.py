"""The Python API: ``compress``, ``decompress``, ``inspect``, ``validate``.

Every function accepts a model as a path (external data is loaded from beside
it) or as an ``onnx.ModelProto`` (never modified), and, where it writes a
model, writes it atomically. User mistakes raise
:class:`~onnx_dc.errors.OnnxDcError` subclasses with a one-line message.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnx_dc.errors import InvalidTensorError, ModelError, SettingsError
from onnx_dc import model_io
from onnx_dc.model_io import (
    ModelSource,
    SavedModel,
    check_output_path,
    external_data_files,
    load_model,
    save_model,
    tensor_bytes,
)
from onnx_dc.report import ModelReport, model_report
from onnx_dc.rewrite import RewriteSummary, apply_compression, decompress_model
from onnx_dc.settings import CompressionSettings, ResolvedSettings, SettingValue, TensorPlan, parse_settings
from onnx_dc.validate import ValidationReport, validate_models
from onnx_dc.weights import Weight, find_weights

# (weight, its values, its resolved settings) -> onnx_dc.tensor.CompressedTensor.
TensorCompressor = Callable[[Weight, np.ndarray, ResolvedSettings], object]
ProgressCallback = Callable[[int, int, str], None]


@dataclass
class CompressionResult:
    """The compressed model, its per-layer report and what was decided for each weight."""

    model: onnx.ModelProto
    report: ModelReport
    plans: list[TensorPlan]
    compressed: dict[str, object] = field(default_factory=dict)  # weight name -> CompressedTensor
    rewrite: RewriteSummary | None = None
    saved: SavedModel | None = None
    warnings: list[str] = field(default_factory=list)
    calibration: object | None = None  # with calib=: CalibratedCompression, or AutotuneResult with a budget


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
    :mod:`onnx_dc.settings` for the grammar and the per-kind defaults. When
    ``output`` is given the model is written there atomically (with external
    data when over 2 GB or ``external_data=True``). ``progress=True`` shows a
    tqdm bar per tensor; a callable gets ``(done, total, tensor_name)``.
    ``tensor_compressor`` replaces the per-tensor pipeline (used by calibrated
    compression); by default :func:`onnx_dc.tensor.compress_tensor`.

    With ``calib`` (an ``.npz`` keyed by input name, a dict of arrays or an
    iterable of feeds; at most ``calib_samples`` samples, default 4096) the layers
    are fitted to calibration data with the options ``calibration``
    (:class:`onnx_dc.calibrated.CalibrationOptions`); with a budget,
    ``min_cosine`` and/or ``max_drop`` (percentage points of top-1, needs
    ``eval_data`` with ``labels``), the per-layer sparsity and bits are searched
    over ``search_sparsities`` x ``search_bits``; ``drop_margin_se`` makes the
    searched configuration meet ``max_drop`` by that many standard errors of
    its measured drop. See docs/CALIBRATION.md and
    :mod:`onnx_dc.calibrate`.
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
        from onnx_dc.calibrate import compress_calibrated
        from onnx_dc.calibration import DEFAULT_MAX_SAMPLES

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


def compress_model(
    model: ModelSource,
    settings: CompressionSettings,
    *,
    output: str | os.PathLike | None = None,
    progress: bool | ProgressCallback = False,
    external_data: bool | None = None,
    tensor_compressor: TensorCompressor | None = None,
) -> CompressionResult:
    """:func:`compress` with already parsed :class:`~onnx_dc.settings.CompressionSettings`."""
    if output is not None:
        check_output_path(output, [model] if not isinstance(model, onnx.ModelProto) else [])
    proto = load_model(model)
    original_file_bytes = _source_size_bytes(model)
    weights = find_weights(proto, min_elements=0)
    plans = settings.plan(weights)
    todo = [p for p in plans if p.settings is not None]
    compressor = tensor_compressor or _compress_with_core
    compressed: dict[str, object] = {}
    pairs: list[tuple[Weight, bytes]] = []
    with _progress(progress, len(todo)) as tick:
        for index, plan in enumerate(todo):
            weight = plan.weight
            tick(index, weight.name)
            values = weight.to_array()
            try:
                result = compressor(weight, values, plan.settings)
            except InvalidTensorError as exc:
                raise InvalidTensorError(f"tensor {weight.name!r}: {exc}") from None
            compressed[weight.name] = result
            pairs.append((weight, bytes(result.container)))
        tick(len(todo), "")
    summary = apply_compression(proto, pairs)
    warnings = _check_written_model(proto, model)
    reasons = {p.weight.name: p.skip_reason for p in plans if p.skip_reason}
    report = model_report(
        proto,
        original_file_bytes=original_file_bytes,
        compressed_file_bytes=_serialized_size(proto),
        skip_reasons=reasons,
    )
    saved = None
    if output is not None:  # the last step: nothing can fail after the output is in place
        saved = save_model(proto, output, external_data=external_data)
        report.compressed_file_bytes = saved.size_bytes
    else:
        report.notes.append("compressed size: serialized size (the model was not written to a file)")
    return CompressionResult(proto, report, plans, compressed, summary, saved, warnings)


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
    """Run both models on the same inputs and compare their outputs (see :mod:`onnx_dc.validate`)."""
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

    Returns a :class:`onnx_dc.sensitivity.SensitivityReport` (``to_dict()`` is the
    JSON of ``onnx-dc sensitivity``; :func:`onnx_dc.sensitivity.plot_sensitivity` plots it).
    """
    from onnx_dc.calibrate import sensitivity as _sensitivity
    from onnx_dc.calibration import DEFAULT_MAX_SAMPLES
    from onnx_dc.sensitivity import DEFAULT_BITS, DEFAULT_SPARSITIES

    return _sensitivity(
        model, calib, eval_data=eval_data,
        calib_samples=DEFAULT_MAX_SAMPLES if calib_samples is None else calib_samples,
        sparsities=DEFAULT_SPARSITIES if sparsities is None else sparsities,
        bits=DEFAULT_BITS if bits is None else bits,
        method=method, options=calibration, progress=progress,
    )


def _compress_with_core(weight: Weight, values: np.ndarray, settings: ResolvedSettings):
    from onnx_dc.tensor import compress_tensor

    return compress_tensor(values, settings.to_tensor_settings())


def _source_size_bytes(model: ModelSource) -> int:
    if isinstance(model, onnx.ModelProto):
        return _serialized_size(model)
    path = Path(model)
    total = path.stat().st_size
    try:
        total += sum(p.stat().st_size for p in external_data_files(path))
    except (OSError, ValueError):
        pass
    return total


def _serialized_size(model: onnx.ModelProto) -> int:
    try:
        return model.ByteSize()
    except Exception:
        return tensor_bytes(model)


def _check_written_model(model: onnx.ModelProto, source: ModelSource) -> list[str]:
    """Run onnx.checker (full check) on a converted model; a failure the input did not have is a bug."""
    if tensor_bytes(model) > model_io.PROTOBUF_LIMIT_BYTES:
        return ["onnx.checker skipped: model over 2 GB"]
    try:
        onnx.checker.check_model(model, full_check=True)
        return []
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    try:
        original = load_model(source)
        onnx.checker.check_model(original, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ModelError):
        return [f"onnx.checker rejects the model, as it rejects the input: {message}"]
    raise ModelError(f"internal error: the converted model fails onnx.checker: {message}")


class _progress:
    """A tqdm bar on a terminal (``progress=True``), a user callback, or nothing."""

    def __init__(self, progress: bool | ProgressCallback, total: int) -> None:
        self.progress = progress
        self.total = total
        self.bar = None

    def __enter__(self) -> Callable[[int, str], None]:
        if self.progress is True:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="tensor", desc="compressing", leave=False)
        return self.tick

    def tick(self, done: int, name: str) -> None:
        if callable(self.progress):
            self.progress(done, self.total, name)
        elif self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(name, refresh=True)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
