"""Converting a model with a per-tensor compressor: the step every compression ends with.

:func:`compress_model` plans every weight (:mod:`onnx_dc.graph.settings`),
runs the per-tensor compressor on those to compress (by default the plain
Deep Compression pipeline, :func:`onnx_dc.codec.tensor.compress_tensor`),
rewrites the graph around the containers (:mod:`onnx_dc.graph.rewrite`),
checks the result with ``onnx.checker``, reports it and writes it atomically.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnx_dc.api.parallel import check_jobs, compress_plans
from onnx_dc.api.recipe import METADATA_KEY, Recipe
from onnx_dc.api.report import ModelReport, format_bytes, model_report
from onnx_dc.codec.tensor import EncodedTensor
from onnx_dc.errors import ModelError
from onnx_dc.graph.defaults import TRANSFORMER_DEFAULTS
from onnx_dc.graph.folding import fold_normalizations
from onnx_dc.graph.fusion import set_matmul_precision
from onnx_dc.graph.model_io import (
    ModelSource,
    SavedModel,
    check_output_path,
    load_model,
    model_file_bytes,
    save_model,
    tensor_bytes,
)
from onnx_dc.graph.operators import MODEL_META_RUNTIME, MODEL_META_VERSION, RUNTIME_HINT
from onnx_dc.graph.restore import is_compressed
from onnx_dc.graph.rewrite import RewriteSummary, apply_compression
from onnx_dc.graph.settings import ResolvedSettings, TensorPlan
from onnx_dc.graph.shared import share_duplicate_weights
from onnx_dc.graph.tensor_store import (
    PLACEHOLDER,
    all_tensors,
    has_references,
    materialize,
    open_model,
    stored_bytes,
    structure_of,
)
from onnx_dc.graph.transformers import transformer_evidence
from onnx_dc.graph.weights import Weight, describe_use, find_weights
from onnx_dc.progress import progress_bar, running, stage_line

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
    jobs: int | None = None,
    source_dir: str | os.PathLike | None = None,
) -> CompressionResult:
    """Compress every weight the recipe selects with ``tensor_compressor`` and convert the graph around them.

    First :func:`prepare_model` folds normalisations into the layers before
    them and stores duplicated weights once (``prepared``: the notes of a
    :func:`prepare_model` the caller already ran on ``model``, which then is
    not prepared again). ``recipe``'s per-tensor settings plan every weight;
    the compressor (default: the plain pipeline,
    :func:`onnx_dc.codec.tensor.encode_tensor`, run on ``jobs`` worker
    processes, default every core; the result does not depend on ``jobs``)
    turns each planned weight into a container. A model given as a path is
    read one tensor at a time from its file
    (:func:`onnx_dc.graph.tensor_store.open_model`). A tensor whose container would not be smaller stays dense
    (:func:`not_smaller_reason`). The recipe, the onnx-dc version and how to
    run the model are recorded in its metadata (:func:`record_recipe`,
    :func:`record_runtime_metadata`). Written atomically to ``output`` when given.
    ``source_dir``: ``model`` is a ModelProto from :func:`~onnx_dc.graph.tensor_store.open_model` whose
    references are relative to it; it is converted in place instead of being copied.
    """
    if jobs is not None:
        check_jobs(jobs)  # before any progress line: a bad option is the only thing said
    if output is not None:
        check_output_path(output, [model] if not isinstance(model, onnx.ModelProto) else [])
    with running("loading"):
        proto, source_dir = (model, Path(source_dir)) if source_dir is not None else _open(model, progress)
    refuse_compressed_input(proto, model)
    original_file_bytes = _source_size_bytes(model)
    transformer = transformer_evidence(proto)
    notes = prepare_model(proto, source_dir) if prepared is None else list(prepared)
    weights = find_weights(proto, min_elements=0)
    plans = recipe.settings().plan(weights, transformer=transformer is not None)
    if transformer is not None:
        notes.append(transformer_defaults_note(transformer))
    todo = [p for p in plans if p.settings is not None]
    compressed: dict[str, object] = {}
    pairs: list[tuple[Weight, bytes]] = []
    emptied: list[str] = []
    left_dense: dict[str, str] = {}  # weight name -> why its container was not used
    with running("compressing"), _progress(progress, todo) as tick, contextlib.closing(
        compress_plans(todo, source_dir, tensor_compressor, jobs, on_wait=lambda i, p: tick(i, p.weight.name))
    ) as results:  # closing: the worker processes stop at once when anything goes wrong
        for plan, result in results:
            weight = plan.weight
            tick.finished(weight)
            reason = not_smaller_reason(weight.size_bytes, result.container)
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
    kept = {name: int(getattr(result, "n_kept", -1)) for name, result in compressed.items()}
    for result in compressed.values():  # the pairs hold each container until it is in the model
        if isinstance(result, EncodedTensor):
            result.container_source = b""
    summary = apply_compression(proto, _drain(pairs) if pairs else [], kept=kept)
    _point_at_containers(proto, summary, compressed)
    set_matmul_precision(proto, recipe.precision)
    record_recipe(proto, recipe)
    record_runtime_metadata(proto)
    if source_dir is not None and output is None:
        materialize(proto, source_dir)  # the result holds everything: read the dense weights left on disk
    warnings = emptied + _check_written_model(proto, model)
    report = model_report(
        proto,
        original_file_bytes=original_file_bytes,
        compressed_file_bytes=_serialized_size(proto) if output is None else None,  # else: the file's size
        skip_reasons=reasons,
    )
    report.notes.extend(notes)
    report.notes.extend(emptied)
    report.notes.extend(f"{name} left dense: {reason}" for name, reason in left_dense.items())
    saved = None
    if output is not None:  # the last step: nothing can fail after the output is in place
        with running("writing"):
            size = tensor_bytes(proto)
            if size >= _LONG_STEP_BYTES:
                stage_line(progress, f"writing {output} ({format_bytes(size)})")
            saved = save_model(proto, output, external_data=external_data, source_dir=source_dir)
        report.compressed_file_bytes = saved.size_bytes
    else:
        report.notes.append("compressed size: serialized size (the model was not written to a file)")
    return CompressionResult(proto, report, plans, recipe, compressed, summary, saved, warnings)


# Loading and writing report a stage of their own from this much tensor data on.
_LONG_STEP_BYTES = 256 << 20


def prepare_model(model: onnx.ModelProto, source_dir: str | os.PathLike | None = None) -> list[str]:
    """The converter's pre-passes on its copy of the model, in place; returns the report's notes about them.

    BatchNormalization and per-channel Mul/Add after a layer are folded into
    its weight and bias (:func:`onnx_dc.graph.folding.fold_normalizations`),
    then initializers that repeat another one, or its transpose (a tied LM
    head), read that one instead (:func:`onnx_dc.graph.shared.share_duplicate_weights`).
    The model computes the same outputs (to float rounding for the folds).
    ``source_dir``: where the model's external data references point (a model
    from :func:`onnx_dc.graph.tensor_store.open_model`).
    """
    notes = fold_normalizations(model, source_dir=source_dir).notes()
    notes += [shared.describe() for shared in share_duplicate_weights(model, source_dir=source_dir)]
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


def transformer_defaults_note(evidence: str) -> str:
    """The report's note on a model recognised as a transformer (``evidence`` from ``transformer_evidence``)."""
    parts = []
    for kind, values in TRANSFORMER_DEFAULTS.items():
        pruning = f"{values['sparsity']:.0%} pruned" if values["sparsity"] else "unpruned"
        parts.append(f"{kind} {pruning} {values['bits']}-bit")
    return (f"transformer ({evidence}): weights without a rule take the transformer defaults ({', '.join(parts)}; "
            "measured at least as faithful as int8 quantize_dynamic on all-MiniLM-L6-v2)")


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


def not_smaller_reason(values: np.ndarray | int, container: bytes) -> str | None:
    """Why a tensor is better left dense (its container would not be smaller than its values), or None.

    ``values``: the tensor's values, or their size in bytes.
    """
    nbytes = values if isinstance(values, int) else values.nbytes
    if len(container) < nbytes:
        return None
    return (f"its container ({format_bytes(len(container))}) would not be smaller than the dense tensor "
            f"({format_bytes(nbytes)})")


def keeps_no_weights(tensor: object) -> bool:
    """True when a compressed tensor (:class:`onnx_dc.codec.tensor.CompressedTensor` or
    :class:`~onnx_dc.codec.tensor.EncodedTensor`) kept none of its weights."""
    if isinstance(tensor, EncodedTensor):
        return tensor.n_weights > 0 and tensor.n_kept == 0
    mask = getattr(tensor, "mask", None)
    return mask is not None and np.size(mask) > 0 and not np.any(mask)


def _pruning_source(settings: ResolvedSettings) -> str:
    """The rule that chose a tensor's pruning, e.g. ``--quality fc3.weight=100.0``."""
    setting = "quality" if settings.quality is not None else "sparsity"
    return settings.sources.get(setting, f"{setting} {getattr(settings, setting)}")


def _open(model: ModelSource, progress: object) -> tuple[onnx.ModelProto, Path | None]:
    """(the model, the directory its data references are relative to); a path is opened lazily."""
    if not isinstance(model, (str, os.PathLike)):
        return load_model(model), None  # a ModelProto is copied; load_model reports a wrong type
    path = Path(model)
    with contextlib.suppress(OSError):
        size = model_file_bytes(path)
        if size >= _LONG_STEP_BYTES:
            stage_line(progress, f"loading {path} ({format_bytes(size)}, one tensor at a time)")
    return open_model(path), path.resolve().parent


def _drain(pairs: list):
    """Yield the pairs, dropping each from the list once used (one container held twice at a time)."""
    pairs.reverse()
    while pairs:
        yield pairs.pop()


def _point_at_containers(model: onnx.ModelProto, summary: RewriteSummary, compressed: dict[str, object]) -> None:
    """Light results read their container from the model instead of holding a second copy."""
    tensors = {t.name: t for t in model.graph.initializer}
    for name, result in compressed.items():
        tensor = tensors.get(summary.containers.get(name, ""))
        if isinstance(result, EncodedTensor) and tensor is not None:
            result.container_source = lambda tensor=tensor: tensor.raw_data


def _source_size_bytes(model: ModelSource) -> int:
    if isinstance(model, onnx.ModelProto):
        return _serialized_size(model)
    try:
        return model_file_bytes(model)
    except (OSError, ValueError):
        return Path(model).stat().st_size


def _serialized_size(model: onnx.ModelProto) -> int:
    try:
        size = model.ByteSize()
    except Exception:
        return tensor_bytes(model)
    return size + sum(stored_bytes(t) for t in all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL)


def _check_written_model(model: onnx.ModelProto, source: ModelSource) -> list[str]:
    """Run onnx.checker (full check) on a converted model; a failure the input did not have is a bug."""
    try:
        _run_checker(model)
        return []
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    try:
        original = load_model(source)
        onnx.checker.check_model(original, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ModelError):
        return [f"onnx.checker rejects the model, as it rejects the input: {message}"]
    raise ModelError(f"internal error: the converted model fails onnx.checker: {message}")


_CHECK_IN_MEMORY_BYTES = 256 << 20


def _run_checker(model: onnx.ModelProto) -> None:
    """``onnx.checker`` (full check) without a second copy of a large model's weights.

    A large model is checked as a file holding only its structure, whose tensors refer to a
    sparse placeholder file of the right size (no disk space, no data in memory).
    """
    if tensor_bytes(model) <= _CHECK_IN_MEMORY_BYTES and not has_references(model):
        onnx.checker.check_model(model, full_check=True)
        return
    structure = structure_of(model)
    with tempfile.TemporaryDirectory(prefix="onnx-dc-check-") as directory:
        placeholder_size = max(
            (int(e.value) for t in all_tensors(structure) for e in t.external_data if e.key == "length"), default=0
        )
        with open(Path(directory) / PLACEHOLDER, "wb") as f:
            f.truncate(placeholder_size)
        path = Path(directory) / "model.onnx"
        path.write_bytes(structure.SerializeToString())
        del structure
        onnx.checker.check_model(str(path), full_check=True)


class _progress:
    """``progress=True``: a bar on a terminal (weights, their rate and the time left, the tensor, MB/s),
    one stage line elsewhere; a callable (``(done, total, name)`` per tensor); or nothing."""

    def __init__(self, progress: bool | ProgressCallback, todo: list[TensorPlan]) -> None:
        self.progress = progress
        self.total = len(todo)
        self.total_weights = sum(p.weight.n_elements for p in todo)
        self.bar = None
        self.nbytes = 0
        self.name = ""
        self.start = time.monotonic()

    def __enter__(self) -> _progress:
        stage_line(self.progress, f"compressing {self.total} tensor{'' if self.total == 1 else 's'}")
        self.bar = progress_bar(self.progress, self.total_weights, unit="weight", description="compressing",
                                unit_scale=True)
        return self

    def __call__(self, done: int, name: str) -> None:
        if callable(self.progress):
            self.progress(done, self.total, name)
        elif self.bar is not None and name:
            self.name = name
            self._postfix()

    def finished(self, weight: Weight) -> None:
        """One more tensor done."""
        self.nbytes += weight.size_bytes
        if self.bar is not None:
            self.bar.update(weight.n_elements)
            self._postfix()

    def _postfix(self) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.nbytes / elapsed / 1e6:.1f} MB/s, {self.name}", refresh=True)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
