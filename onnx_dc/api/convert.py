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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnx_dc.api.parallel import compress_plans
from onnx_dc.api.recipe import METADATA_KEY, Recipe
from onnx_dc.api.report import ModelReport, model_report
from onnx_dc.codec.tensor import EncodedTensor
from onnx_dc.errors import ModelError
from onnx_dc.graph.model_io import (
    ModelSource,
    SavedModel,
    check_output_path,
    external_data_files,
    load_model,
    save_model,
    tensor_bytes,
)
from onnx_dc.graph.rewrite import RewriteSummary, apply_compression
from onnx_dc.graph.settings import ResolvedSettings, TensorPlan
from onnx_dc.graph.tensor_store import (
    PLACEHOLDER,
    all_tensors,
    has_references,
    materialize,
    open_model,
    structure_of,
)
from onnx_dc.graph.weights import Weight, find_weights
from onnx_dc.progress import Progress, as_progress

__all__ = [
    "CompressionResult",
    "TensorCompressor",
    "compress_model",
    "record_recipe",
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
    progress: bool | ProgressCallback | Progress = False,
    external_data: bool | None = None,
    tensor_compressor: TensorCompressor | None = None,
    jobs: int | None = None,
) -> CompressionResult:
    """Compress every weight the recipe selects with ``tensor_compressor`` and convert the graph around them.

    ``recipe``'s per-tensor settings plan every weight; the compressor (default:
    the plain pipeline, :func:`onnx_dc.codec.tensor.encode_tensor`, run on
    ``jobs`` worker processes, default every core; the result does not depend on
    ``jobs``) turns each planned weight into a container. A model given as a path
    is read one tensor at a time from its file (:func:`onnx_dc.graph.tensor_store.open_model`).
    The recipe is recorded in the model's metadata. Written atomically to ``output`` when given.
    """
    if output is not None:
        check_output_path(output, [model] if not isinstance(model, onnx.ModelProto) else [])
    reporter = as_progress(progress)
    with reporter.stage("loading"):
        proto, source_dir = _open(model)
    original_file_bytes = _source_size_bytes(model)
    weights = find_weights(proto, min_elements=0)
    plans = recipe.settings().plan(weights)
    todo = [p for p in plans if p.settings is not None]
    compressed: dict[str, object] = {}
    pairs: list[tuple[Weight, bytes]] = []
    with _progress(progress, todo, reporter) as tick, contextlib.closing(
        compress_plans(todo, source_dir, tensor_compressor, jobs, on_wait=lambda i, p: tick(i, p.weight.name))
    ) as results:  # closing: the workers stop at once when anything goes wrong
        for plan, result in results:
            compressed[plan.weight.name] = result
            pairs.append((plan.weight, bytes(result.container)))
            tick.finished(plan.weight)
        tick(len(todo), "")
    kept = {name: int(getattr(result, "n_kept", -1)) for name, result in compressed.items()}
    for result in compressed.values():  # the pairs hold each container until it is in the model
        if isinstance(result, EncodedTensor):
            result.container_source = b""
    summary = apply_compression(proto, _drain(pairs) if pairs else [], kept=kept)
    _point_at_containers(proto, summary, compressed)
    record_recipe(proto, recipe)
    if source_dir is not None and output is None:
        materialize(proto, source_dir)  # the result holds everything: read the dense weights left on disk
    warnings = _check_written_model(proto, model)
    reasons = {p.weight.name: p.skip_reason for p in plans if p.skip_reason}
    report = model_report(
        proto,
        original_file_bytes=original_file_bytes,
        compressed_file_bytes=_serialized_size(proto) if output is None else None,  # else: the file's size
        skip_reasons=reasons,
    )
    saved = None
    if output is not None:  # the last step: nothing can fail after the output is in place
        with reporter.stage("writing", total_bytes=tensor_bytes(proto)) as stage:
            saved = save_model(proto, output, external_data=external_data, source_dir=source_dir)
            stage.advance(nbytes=saved.size_bytes)
        report.compressed_file_bytes = saved.size_bytes
    else:
        report.notes.append("compressed size: serialized size (the model was not written to a file)")
    return CompressionResult(proto, report, plans, recipe, compressed, summary, saved, warnings)


def record_recipe(model: onnx.ModelProto, recipe: Recipe) -> None:
    """Write ``recipe`` into the model's ``metadata_props`` (replacing a recorded one)."""
    for index in reversed(range(len(model.metadata_props))):
        if model.metadata_props[index].key == METADATA_KEY:
            del model.metadata_props[index]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, recipe.to_json()


def _open(model: ModelSource) -> tuple[onnx.ModelProto, Path | None]:
    """(the model, the directory its data references are relative to); a path is opened lazily."""
    if isinstance(model, onnx.ModelProto):
        return load_model(model), None
    if not isinstance(model, (str, os.PathLike)):
        return load_model(model), None  # load_model reports the wrong type
    proto = open_model(model)
    return proto, Path(model).resolve().parent


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
    """Per-tensor progress: a stage of the :class:`~onnx_dc.progress.Progress` reporter, or a user callback."""

    def __init__(self, progress: bool | ProgressCallback | Progress, todo: list[TensorPlan], reporter: Progress) -> None:
        self.callback = progress if callable(progress) and not isinstance(progress, Progress) else None
        self.total = len(todo)
        self.stage = reporter.stage(
            "compressing", total=self.total, unit="tensors",
            total_weights=sum(p.weight.n_elements for p in todo), total_bytes=sum(p.weight.size_bytes for p in todo),
        )

    def __enter__(self) -> _progress:
        self.stage.__enter__()
        return self

    def __call__(self, done: int, name: str) -> None:
        if self.callback is not None:
            self.callback(done, self.total, name)
        if name:
            self.stage.set_label(name)

    def finished(self, weight: Weight) -> None:
        self.stage.advance(weights=weight.n_elements, nbytes=weight.size_bytes)

    def __exit__(self, *exc: object) -> None:
        self.stage.__exit__(*exc)
