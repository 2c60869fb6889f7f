"""Converting a model with a per-tensor compressor: the step every compression ends with.

:func:`compress_model` plans every weight (:mod:`onnx_dc.graph.settings`),
runs the per-tensor compressor on those to compress (by default the plain
Deep Compression pipeline, :func:`onnx_dc.codec.tensor.compress_tensor`),
rewrites the graph around the containers (:mod:`onnx_dc.graph.rewrite`),
checks the result with ``onnx.checker``, reports it and writes it atomically.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnx_dc.api.recipe import METADATA_KEY, Recipe
from onnx_dc.api.report import ModelReport, format_bytes, model_report
from onnx_dc.errors import InvalidTensorError, ModelError
from onnx_dc.graph import model_io
from onnx_dc.graph.folding import fold_normalizations
from onnx_dc.graph.fusion import set_matmul_precision
from onnx_dc.graph.model_io import (
    ModelSource,
    SavedModel,
    check_output_path,
    external_data_files,
    load_model,
    save_model,
    tensor_bytes,
)
from onnx_dc.graph.operators import MODEL_META_RUNTIME, MODEL_META_VERSION, RUNTIME_HINT
from onnx_dc.graph.restore import is_compressed
from onnx_dc.graph.rewrite import RewriteSummary, apply_compression
from onnx_dc.graph.settings import ResolvedSettings, TensorPlan
from onnx_dc.graph.shared import share_duplicate_weights
from onnx_dc.graph.weights import Weight, describe_use, find_weights
from onnx_dc.progress import progress_bar, stage_line

__all__ = [
    "CompressionResult",
    "TensorCompressor",
    "compress_model",
    "not_smaller_reason",
    "prepare_model",
    "record_recipe",
    "record_runtime_metadata",
    "refuse_compressed_input",
]


# (weight, its values, its resolved settings) -> onnx_dc.codec.tensor.CompressedTensor.
TensorCompressor = Callable[[Weight, np.ndarray, ResolvedSettings], object]
ProgressCallback = Callable[[int, int, str], None]


@dataclass
class CompressionResult:
    """The compressed model, its per-layer report and what was decided for each weight."""

    model: onnx.ModelProto
    report: ModelReport
    plans: list[TensorPlan]
    recipe: Recipe  # reproduces this model (with a search: the settings it chose)
    compressed: dict[str, object] = field(default_factory=dict)  # weight name -> CompressedTensor
    rewrite: RewriteSummary | None = None
    saved: SavedModel | None = None
    warnings: list[str] = field(default_factory=list)
    calibration: object | None = None  # with calib=: CalibratedCompression, or AutotuneResult with a budget


def compress_model(
    model: ModelSource,
    recipe: Recipe,
    *,
    output: str | os.PathLike | None = None,
    progress: bool | ProgressCallback = False,
    external_data: bool | None = None,
    tensor_compressor: TensorCompressor | None = None,
    prepared: list[str] | None = None,
) -> CompressionResult:
    """Compress every weight the recipe selects with ``tensor_compressor`` and convert the graph around them.

    First :func:`prepare_model` folds normalisations into the layers before
    them and stores duplicated weights once (``prepared``: the notes of a
    :func:`prepare_model` the caller already ran on ``model``, which then is
    not prepared again). ``recipe``'s per-tensor settings plan every weight;
    the compressor (default: the plain pipeline,
    :func:`onnx_dc.codec.tensor.compress_tensor`) turns each planned weight into
    a container; a tensor whose container would not be smaller stays dense
    (:func:`not_smaller_reason`). The recipe, the onnx-dc version and how to
    run the model are recorded in its metadata (:func:`record_recipe`,
    :func:`record_runtime_metadata`). Written atomically to ``output`` when given.
    """
    if output is not None:
        check_output_path(output, [model] if not isinstance(model, onnx.ModelProto) else [])
    proto = load_model(model)
    refuse_compressed_input(proto, model)
    original_file_bytes = _source_size_bytes(model)
    notes = prepare_model(proto) if prepared is None else list(prepared)
    weights = find_weights(proto, min_elements=0)
    plans = recipe.settings().plan(weights)
    todo = [p for p in plans if p.settings is not None]
    compressor = tensor_compressor or _compress_with_core
    compressed: dict[str, object] = {}
    pairs: list[tuple[Weight, bytes]] = []
    emptied: list[str] = []
    left_dense: dict[str, str] = {}  # weight name -> why its container was not used
    with _progress(progress, len(todo)) as tick:
        for index, plan in enumerate(todo):
            weight = plan.weight
            tick(index, weight.name)
            values = weight.to_array()
            try:
                result = compressor(weight, values, plan.settings)
            except InvalidTensorError as exc:
                raise InvalidTensorError(f"tensor {weight.name!r}: {exc}") from None
            reason = not_smaller_reason(values, result.container)
            if reason is not None:  # the tensor stays as it is
                left_dense[weight.name] = reason
                continue
            compressed[weight.name] = result
            pairs.append((weight, bytes(result.container)))
            if keeps_no_weights(result):
                emptied.append(f"tensor {weight.name!r} keeps no weights ({_pruning_source(plan.settings)}): "
                               "it is all zeros now")
        tick(len(todo), "")
    plans = [TensorPlan(p.weight, None, left_dense[p.weight.name]) if p.weight.name in left_dense else p for p in plans]
    # what each dense tensor is to its readers, said of the graph as the user wrote it (before the rewrite)
    reasons = {p.weight.name: f"{_uses(p.weight)}: {p.skip_reason}" for p in plans if p.skip_reason}
    summary = apply_compression(proto, pairs)
    set_matmul_precision(proto, recipe.precision)
    record_recipe(proto, recipe)
    record_runtime_metadata(proto)
    warnings = emptied + _check_written_model(proto, model)
    report = model_report(
        proto,
        original_file_bytes=original_file_bytes,
        compressed_file_bytes=_serialized_size(proto),
        skip_reasons=reasons,
    )
    report.notes.extend(notes)
    report.notes.extend(emptied)
    report.notes.extend(f"{name} left dense: {reason}" for name, reason in left_dense.items())
    saved = None
    if output is not None:  # the last step: nothing can fail after the output is in place
        saved = save_model(proto, output, external_data=external_data)
        report.compressed_file_bytes = saved.size_bytes
    else:
        report.notes.append("compressed size: serialized size (the model was not written to a file)")
    return CompressionResult(proto, report, plans, recipe, compressed, summary, saved, warnings)


def prepare_model(model: onnx.ModelProto) -> list[str]:
    """The converter's pre-passes on its copy of the model, in place; returns the report's notes about them.

    BatchNormalization and per-channel Mul/Add after a layer are folded into
    its weight and bias (:func:`onnx_dc.graph.folding.fold_normalizations`),
    then initializers that repeat another one, or its transpose (a tied LM
    head), read that one instead (:func:`onnx_dc.graph.shared.share_duplicate_weights`).
    The model computes the same outputs (to float rounding for the folds).
    """
    notes = fold_normalizations(model).notes()
    notes += [shared.describe() for shared in share_duplicate_weights(model)]
    return notes


def refuse_compressed_input(proto: onnx.ModelProto, source: ModelSource) -> None:
    """Raise :class:`ModelError` when the model to compress was already compressed by onnx-dc.

    Compressing it again would re-quantize what it left dense (biases) and grow the file;
    the user wants the original model, or ``onnx-dc decompress`` first.
    """
    if is_compressed(proto):
        what = "the model" if isinstance(source, onnx.ModelProto) else str(source)
        raise ModelError(
            f"{what} is already compressed by onnx-dc (it holds ai.onnx_dc operators or containers): compress the "
            "original model, or turn this one back into standard ONNX first with onnx-dc decompress"
        )


def record_recipe(model: onnx.ModelProto, recipe: Recipe) -> None:
    """Write ``recipe`` into the model's ``metadata_props`` (replacing a recorded one)."""
    for index in reversed(range(len(model.metadata_props))):
        if model.metadata_props[index].key == METADATA_KEY:
            del model.metadata_props[index]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, recipe.to_json()


def _uses(weight: Weight) -> str:
    """What the weight is to its readers, e.g. ``LayerNormalization input 'Scale'`` (at most two, then "...")."""
    uses = list(dict.fromkeys(describe_use(c) for c in weight.consumers))
    return ", ".join(uses[:2]) + (f" and {len(uses) - 2} more" if len(uses) > 2 else "")


def record_runtime_metadata(model: onnx.ModelProto) -> None:
    """Write ``onnx_dc.version`` and ``onnx_dc.runtime`` (how to run the model) into its ``metadata_props``.

    The producer fields stay the original's; onnxruntime's own error for an unregistered
    ``ai.onnx_dc`` operator does not say where the operators come from, the metadata does.
    """
    from onnx_dc import __version__

    values = {MODEL_META_VERSION: __version__, MODEL_META_RUNTIME: RUNTIME_HINT}
    kept = [entry for entry in model.metadata_props if entry.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def not_smaller_reason(values: np.ndarray, container: bytes) -> str | None:
    """Why a tensor is better left dense (its container would not be smaller than its values), or None."""
    if len(container) < values.nbytes:
        return None
    return (f"its container ({format_bytes(len(container))}) would not be smaller than the dense tensor "
            f"({format_bytes(values.nbytes)})")


def keeps_no_weights(tensor: object) -> bool:
    """True when a compressed tensor (:class:`onnx_dc.codec.tensor.CompressedTensor`) kept none of its weights."""
    mask = getattr(tensor, "mask", None)
    return mask is not None and np.size(mask) > 0 and not np.any(mask)


def _pruning_source(settings: ResolvedSettings) -> str:
    """The rule that chose a tensor's pruning, e.g. ``--quality fc3.weight=100.0``."""
    setting = "quality" if settings.quality is not None else "sparsity"
    return settings.sources.get(setting, f"{setting} {getattr(settings, setting)}")


def _compress_with_core(weight: Weight, values: np.ndarray, settings: ResolvedSettings):
    from onnx_dc.codec.tensor import compress_tensor

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
    """``progress=True``: a bar per tensor on a terminal, one stage line elsewhere; a callable; or nothing."""

    def __init__(self, progress: bool | ProgressCallback, total: int) -> None:
        self.progress = progress
        self.total = total
        self.bar = None

    def __enter__(self) -> Callable[[int, str], None]:
        stage_line(self.progress, f"compressing {self.total} tensor{'' if self.total == 1 else 's'}")
        self.bar = progress_bar(self.progress, self.total, unit="tensor", description="compressing")
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
