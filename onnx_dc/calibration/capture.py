"""Running the model on calibration data and accumulating each layer's input statistics.

:func:`capture_statistics` runs the model with onnxruntime, with the layers'
inputs added as graph outputs on a copy, and accumulates per layer and block,
in float64: ``X^T X``, the column sums of ``X`` and the row count (and, for
sequential mode, the cross terms with a reference model's activations). Nothing
else is kept, so the memory is ``sum K^2`` numbers whatever the number of
samples; layers are captured in several passes when their statistics would
exceed ``max_memory_bytes``, and the samples per run are cut so that the
activations fetched in one run stay within what the budget leaves (at least an
eighth of it; one sample per run at the least). :func:`run_model` runs a model over the data and
:class:`WeightSwapRunner` runs one session with chosen weights replaced.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnx_dc.calibration.data import DEFAULT_BATCH_SIZE, CalibrationData
from onnx_dc.calibration.layer_problem import map_columns, single_threaded_blas
from onnx_dc.calibration.layers import _IM2COL_CHUNK_ELEMENTS, LayerSpec, _conv_geometry, _outer_names
from onnx_dc.errors import CalibrationError, ModelError, first_line
from onnx_dc.graph.linked_copy import write_linked_copy
from onnx_dc.graph.model_io import attribute_subgraphs
from onnx_dc.graph.tensor_store import has_references
from onnx_dc.progress import progress_bar

__all__ = [
    "DEFAULT_MAX_MEMORY_BYTES",
    "LayerStatistics",
    "capture_statistics",
    "reused_statistics",
    "run_model",
]


DEFAULT_MAX_MEMORY_BYTES = 1 << 30
"""Statistics kept in memory at once; more layers than that are captured in several passes."""
_NARROW_INPUTS = 512  # Gram updates of narrower layers run on one BLAS thread (see LayerStatistics.update)


# ---------------------------------------------------------------------------
# Statistics


@dataclass
class LayerStatistics:
    """Accumulated statistics of one layer's input (per block), float64.

    With ``a = [x, 1]`` the input row extended by a constant 1:

    Attributes:
        gram: per block, ``sum a a^T`` ``[K+1, K+1]`` (its last row/column are the
            column sums and the row count).
        cross: sequential mode only: per block, ``sum a a_ref^T`` with ``a_ref`` the
            reference (original) model's input for the same sample.
        n_rows: rows accumulated (samples times positions).
        n_samples: calibration samples seen.
    """

    layer: LayerSpec
    gram: list[np.ndarray]
    cross: list[np.ndarray] | None = None
    n_rows: int = 0
    n_samples: int = 0

    @classmethod
    def empty(cls, layer: LayerSpec, *, with_reference: bool = False) -> LayerStatistics:
        """Zero statistics for ``layer``."""
        k = layer.n_inputs + 1
        zeros = lambda: [np.zeros((k, k)) for _ in range(layer.groups)]  # noqa: E731
        return cls(layer, zeros(), zeros() if with_reference else None)

    def update(self, activation: np.ndarray, reference: np.ndarray | None = None) -> None:
        """Add one batch of the layer's input (and, in sequential mode, the reference model's).

        Patches are formed a few samples at a time, so the memory stays bounded
        whatever the batch size.
        """
        if reference is not None and self.cross is None:
            raise CalibrationError("statistics created without reference terms")
        # Narrow blocks (depthwise convolutions: many tiny products) run faster on one BLAS thread.
        narrow = self.layer.n_inputs + 1 < _NARROW_INPUTS
        with single_threaded_blas() if narrow else contextlib.nullcontext():
            chunks = _row_chunks(self.layer, activation, reference)
            while window := list(itertools.islice(chunks, _CHUNKS_AT_ONCE)):
                # Chunks are formed and multiplied in threads (map_columns), then added in order: the same sums.
                for grams, crosses, n_rows in map_columns(_chunk_products, window):
                    for g, product in enumerate(grams):
                        self.gram[g] += product
                        if crosses is not None:
                            self.cross[g] += crosses[g]  # type: ignore[index]
                    self.n_rows += n_rows

    def input_gram(self, block: int = 0, *, centered: bool = False) -> np.ndarray:
        """``X^T X`` of one block; ``centered``: of ``X`` minus its column means (the bias absorbs the mean)."""
        g = self.gram[block]
        k = g.shape[0] - 1
        if not centered:
            return g[:k, :k].copy()
        n = g[k, k]
        if n <= 0:
            return g[:k, :k].copy()
        s = g[k, :k]
        return g[:k, :k] - np.outer(s, s) / n

    def input_mean(self, block: int = 0) -> np.ndarray:
        """Column means of ``X`` (zeros when no rows were seen)."""
        g = self.gram[block]
        k = g.shape[0] - 1
        n = g[k, k]
        return g[k, :k] / n if n > 0 else np.zeros(k)


_CHUNKS_AT_ONCE = 2  # row chunks formed at once by LayerStatistics.update (at most this many threads)


def _chunk_products(chunk: Callable[[], tuple[list[np.ndarray], list[np.ndarray] | None]]):
    """``(a^T a per block, a^T r per block or None, rows)`` of one chunk of :func:`_row_chunks`."""
    blocks, ref_blocks = chunk()
    grams, crosses = [], None if ref_blocks is None else []
    for g, rows in enumerate(blocks):
        a = _extend(rows)
        grams.append(a.T @ a)
        if crosses is not None:
            crosses.append(a.T @ _extend(ref_blocks[g]))  # type: ignore[index]
    return grams, crosses, blocks[0].shape[0]


def _row_chunks(layer: LayerSpec, activation: np.ndarray, reference: np.ndarray | None):
    """Yield functions giving ``(blocks, reference blocks or None)`` over chunks of at most about
    ``_IM2COL_CHUNK_ELEMENTS`` values (called in the thread that multiplies them)."""
    activation = np.asarray(activation)
    if reference is not None:
        reference = np.asarray(reference)
        if reference.shape != activation.shape:
            raise CalibrationError(
                f"layer {layer.weight!r}: reference activation of shape {reference.shape}, expected {activation.shape}"
            )
    if layer.op == "Conv":
        geometry = _conv_geometry(activation.shape, **layer.conv, group=layer.groups)  # type: ignore[arg-type]
        per_sample = int(np.prod(geometry.out_shape)) * layer.n_inputs * layer.groups
        step = max(1, _IM2COL_CHUNK_ELEMENTS // max(1, per_sample))
        for start in range(0, activation.shape[0], step):
            yield lambda start=start: (
                layer.rows(activation[start : start + step]),
                layer.rows(reference[start : start + step]) if reference is not None else None,
            )
        return
    blocks = layer.rows(activation)
    ref_blocks = layer.rows(reference) if reference is not None else None
    step = max(1, _IM2COL_CHUNK_ELEMENTS // max(1, layer.n_inputs))
    for start in range(0, blocks[0].shape[0], step):
        yield lambda start=start: (
            [b[start : start + step] for b in blocks],
            None if ref_blocks is None else [b[start : start + step] for b in ref_blocks],
        )


def _extend(rows: np.ndarray) -> np.ndarray:
    out = np.empty((rows.shape[0], rows.shape[1] + 1))
    out[:, :-1] = rows
    out[:, -1] = 1.0
    return out


def capture_statistics(
    model: onnx.ModelProto,
    data: CalibrationData,
    layers: Sequence[LayerSpec],
    *,
    reference: onnx.ModelProto | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    progress: bool | Callable[[int, int], None] = False,
    description: str = "calibrating",
) -> dict[str, LayerStatistics]:
    """Run ``model`` on the calibration data and accumulate the statistics of each layer's input.

    Args:
        model: the model to run (not modified). Its graph must contain every
            layer's activation.
        data: the calibration samples.
        layers: from :func:`find_layers` (on ``model`` or on the model ``model`` was derived from).
        reference: sequential mode: the original model, run on the same samples;
            the cross terms with its activations are accumulated too.
        batch_size: samples per run when batchable.
        max_memory_bytes: the memory budget: statistics kept at once (beyond, layers are captured
            in several passes) plus the activations of one run (beyond, fewer samples per run).
        progress: ``True`` for progress on stderr (:mod:`onnx_dc.progress`), or a callable ``(done, total)``.

    Returns:
        Layer statistics keyed by weight name (a new dict; inside :func:`reused_statistics`
        the same statistics objects as an earlier identical capture).
    """
    cache_key = None
    if _REUSE_STACK and reference is None:
        cache_key = (id(model), id(data), frozenset(layer.weight for layer in layers), batch_size)
        cached = _REUSE_STACK[-1].get(cache_key)
        if cached is not None:
            return dict(cached[2])
    # Memory per layer, in statistics: the Gram and cross terms and the reference rows (the plan
    # of passes and the batch sizes, and so the order of the sums, follow from it).
    factor = 3 if reference is not None else 1
    passes: list[list[LayerSpec]] = [[]]
    used = 0
    for layer in layers:
        size = factor * layer.statistics_bytes
        if passes[-1] and used + size > max_memory_bytes:
            passes.append([])
            used = 0
        passes[-1].append(layer)
        used += size
    stats: dict[str, LayerStatistics] = {}
    total = _known_total(data) * len(passes)
    bar = _Progress(progress, total, description)
    try:
        for group in passes:
            if not group:
                continue
            names = list(dict.fromkeys(layer.activation for layer in group))
            current = {layer.weight: LayerStatistics.empty(layer, with_reference=reference is not None) for layer in group}
            runner = _Runner(model, names)
            ref_runner = _Runner(reference, names) if reference is not None else None
            sizer = _BatchSizer(batch_size, max_memory_bytes, factor, group, reference is not None)
            for feed, count in data.feeds(batch_size, sizes=sizer.next_size):
                values = runner.run(feed)
                ref_values = ref_runner.run(feed) if ref_runner is not None else None
                sizer.observe(count, values, ref_values)
                for layer in group:
                    current[layer.weight].update(
                        values[layer.activation], None if ref_values is None else ref_values[layer.activation]
                    )
                    current[layer.weight].n_samples += count
                bar.advance(count)
            stats.update(current)
    finally:
        bar.close()
    if cache_key is not None:
        _REUSE_STACK[-1][cache_key] = (model, data, dict(stats))  # model and data kept alive: their ids stay theirs
    return stats


_REUSE_STACK: list[dict] = []


class _BatchSizer:
    """Samples per run so that one run's activations fit in what the budget leaves beside the statistics.

    Before the first run the cost of a sample is estimated from the layers' widths (one
    row per sample, float32, a copy for the float64 update); afterwards from what the
    runs returned. The configured batch size is the upper bound.
    """

    def __init__(self, batch_size: int, budget: int, factor: int, group: Sequence[LayerSpec], with_reference: bool):
        statistics = sum(factor * layer.statistics_bytes for layer in group)
        self.allowed = max(budget - statistics, budget // 8)
        self.batch_size = batch_size
        copies = 2 if with_reference else 1
        self.per_sample = copies * sum(12 * layer.n_inputs * layer.groups for layer in group)

    def next_size(self) -> int:
        return max(1, min(self.batch_size, self.allowed // max(1, self.per_sample)))

    def observe(self, count: int, values: Mapping[str, np.ndarray], ref_values: Mapping[str, np.ndarray] | None) -> None:
        fetched = sum(np.asarray(v).nbytes for v in values.values())
        if ref_values is not None:
            fetched += sum(np.asarray(v).nbytes for v in ref_values.values())
        # float32 activations are widened to float64 rows a chunk at a time: count them once more.
        self.per_sample = max(self.per_sample, 2 * fetched // max(1, count))


@contextlib.contextmanager
def reused_statistics() -> Iterator[None]:
    """Inside the block, :func:`capture_statistics` of the same model and data objects, layers and
    batch size (without a reference model) runs once; later calls get the same statistics.

    For callers that capture twice from unchanged objects (the automatic search captures the
    original model's statistics for its candidates, and the final non-sequential compression
    of the chosen configuration captures them again). Neither the model nor the data may be
    modified inside the block; the statistics are freed when it ends.
    """
    _REUSE_STACK.append({})
    try:
        yield
    finally:
        _REUSE_STACK.pop()


def run_model(
    model: onnx.ModelProto,
    data: CalibrationData,
    *,
    outputs: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    library: str | None = None,
) -> dict[str, np.ndarray]:
    """Run ``model`` on all samples of ``data``; each output concatenated along axis 0 over the runs.

    ``outputs`` default to the model's graph outputs. ``library``: a custom operator library to register.
    """
    names = list(outputs) if outputs is not None else [o.name for o in model.graph.output]
    runner = _Runner(model, names, library=library)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed, _ in data.feeds(batch_size):
        values = runner.run(feed)
        for n in names:
            v = np.asarray(values[n])
            parts[n].append(v if v.ndim else v.reshape(1))
    return {n: np.concatenate(p, axis=0) if p else np.empty(0) for n, p in parts.items()}


class _Runner:
    """An onnxruntime session returning the given value names (added as graph outputs on a pruned copy)."""

    def __init__(self, model: onnx.ModelProto, names: Sequence[str], *, library: str | None = None) -> None:
        import onnxruntime as ort

        self.names = list(names)
        prepared = _with_outputs(model, self.names)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if library is not None:
            options.register_custom_ops_library(library)
        self._tmp: tempfile.TemporaryDirectory | None = None
        try:
            referenced = has_references(prepared)
            if referenced or prepared.ByteSize() > _SERIALIZE_LIMIT_BYTES:
                # The graph in a directory of its own, large weights beside it (linked where they stay in their
                # files); weights left in their files are mapped by onnxruntime and not prepacked (a prepacked
                # weight is a second copy in memory).
                self._tmp = tempfile.TemporaryDirectory(prefix="onnx-dc-calib-")
                path = write_linked_copy(prepared, self._tmp.name)
                del prepared
                if referenced:
                    options.add_session_config_entry("session.disable_prepacking", "1")
                self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            else:
                self.session = ort.InferenceSession(prepared.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types
            raise ModelError(f"onnxruntime cannot run the model for calibration: {first_line(exc)}") from None
        self.input_names = {i.name for i in self.session.get_inputs()}

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self.names, {k: v for k, v in feed.items() if k in self.input_names})
        except Exception as exc:
            raise CalibrationError(f"onnxruntime failed on the calibration data: {first_line(exc)}") from None
        return dict(zip(self.names, values))

    def __del__(self) -> None:
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()


_SERIALIZE_LIMIT_BYTES = 1_900_000_000




def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are ``names``, without the nodes they do not need."""
    graph = model.graph
    producers: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for out in node.output:
            if out:
                producers[out] = node
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | set(producers)
    missing = [n for n in names if n not in known]
    if missing:
        raise ModelError(f"the model has no value named {', '.join(map(repr, missing))}")
    needed_nodes: list[int] = []
    seen: set[int] = set()
    index_of = {id(node): i for i, node in enumerate(graph.node)}
    stack = [n for n in names]
    needed_values: set[str] = set()
    while stack:
        name = stack.pop()
        if name in needed_values:
            continue
        needed_values.add(name)
        node = producers.get(name)
        if node is None:
            continue
        i = index_of[id(node)]
        if i in seen:
            continue
        seen.add(i)
        needed_nodes.append(i)
        stack.extend(n for n in node.input if n)
        for attr in node.attribute:
            for sub in attribute_subgraphs(attr):
                stack.extend(_outer_names(sub))
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    g = copy.graph
    keep = sorted(seen)
    nodes = [g.node[i] for i in keep]
    del g.node[:]
    g.node.extend(nodes)
    inits = [t for t in g.initializer if t.name in needed_values]
    del g.initializer[:]
    g.initializer.extend(inits)
    types = _value_types(model)
    del g.output[:]
    for name in names:
        vi = types.get(name)
        if vi is None:
            vi = helper.make_empty_tensor_value_info(name)
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        g.output.append(vi)
    return copy


_VALUE_TYPES: collections.OrderedDict[bytes, dict[str, onnx.ValueInfoProto]] = collections.OrderedDict()
_VALUE_TYPES_KEPT = 8  # models whose inferred element types are kept (sequential captures: the working and the original)


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Value infos of the main graph (inferred where possible, without shapes: only the element type matters).

    Kept for the last few model structures (:func:`_structure_key`): a sequential capture
    asks again for every layer about models that differ only in initializer values.
    The returned dict is shared: callers copy its entries.
    """
    small = model.ByteSize() < _SERIALIZE_LIMIT_BYTES
    key = _structure_key(model, small)
    infos = _VALUE_TYPES.get(key)
    if infos is not None:
        _VALUE_TYPES.move_to_end(key)
        return infos
    infos = _inferred_value_types(model, small)
    _VALUE_TYPES[key] = infos
    while len(_VALUE_TYPES) > _VALUE_TYPES_KEPT:
        _VALUE_TYPES.popitem(last=False)
    return infos


def _structure_key(model: onnx.ModelProto, small: bool) -> bytes:
    """Digest of everything the inferred element types depend on: the model without initializer values."""
    skeleton = onnx.ModelProto()
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = model.graph
    skeleton.graph.node.extend(graph.node)
    skeleton.graph.input.extend(graph.input)
    skeleton.graph.output.extend(graph.output)
    skeleton.graph.value_info.extend(graph.value_info)
    skeleton.graph.sparse_initializer.extend(graph.sparse_initializer)
    for tensor in graph.initializer:
        skeleton.graph.initializer.append(
            onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        )
    return hashlib.sha256(skeleton.SerializeToString() + (b"small" if small else b"large")).digest()


def _inferred_value_types(model: onnx.ModelProto, small: bool) -> dict[str, onnx.ValueInfoProto]:
    infos: dict[str, onnx.ValueInfoProto] = {}
    try:
        if small:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        else:
            inferred = model
    except Exception:
        inferred = model
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            slim = onnx.ValueInfoProto()
            slim.name = vi.name
            slim.type.tensor_type.elem_type = vi.type.tensor_type.elem_type
            infos[vi.name] = slim
    return infos


def _known_total(data: CalibrationData) -> int:
    return data.n_samples if data.n_samples >= 0 else (data.max_samples or 0)


class _Progress:
    def __init__(self, progress: bool | Callable[[int, int], None], total: int, description: str) -> None:
        self.callback = progress if callable(progress) else None
        self.total = total
        self.done = 0
        self.bar = None
        self.bar = progress_bar(progress, total or None, unit="sample", description=description)

    def advance(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
