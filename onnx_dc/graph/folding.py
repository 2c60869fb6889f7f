"""Folding normalisations into the layer before them, before the weights are compressed.

:func:`fold_normalizations` is the converter's first step on its copy of the
model (docs/USAGE.md, "The compressed graph"). It folds, into the weight and
bias of the ``Conv``, ``ConvTranspose``, ``Gemm`` or ``MatMul`` (with its bias
``Add``) whose output it alone reads:

* an inference ``BatchNormalization`` with constant float32 ``scale``, ``B``,
  ``mean`` and ``var`` (``y = scale * (x - mean) / sqrt(var + epsilon) + B``);
* a ``Mul`` by a constant per-output-channel scale (``[C, 1, 1]``,
  ``[1, C, 1, 1]`` or a scalar after a convolution; ``[N]`` or a scalar after
  a ``Gemm`` / ``MatMul``);
* an ``Add`` of a constant per-channel shift after a convolution or a
  ``Gemm`` (after a ``MatMul`` such an ``Add`` is the bias the rewrite fuses
  into ``DCMatMul``).

Repeated until nothing is left, so ``Conv -> BatchNormalization -> Mul -> Add``
becomes one ``Conv``. The folded weights are the ones compressed, so the
compressed model computes ``W * s`` from its container instead of running
the normalisation as a separate node (onnxruntime folds BatchNormalization
into a Conv only when the weight is an initializer, which a container is
not). The model stays equivalent to float rounding; ``decompress`` gives
back the folded model.

Nothing is folded when a tensor it would change is used elsewhere (a weight
shared by two layers, a weight that is also a graph input or output), when
the layer's output has other readers, or when the normalisation is not in
inference form; every ``BatchNormalization`` after such a layer that stays
is listed with its reason in :attr:`FoldSummary.skipped` (the report's notes).
Everything runs in float64 and is stored as float32; other element types
are left alone.
"""

from __future__ import annotations

import os

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_dc.graph.graph_index import (
    GraphIndex,
    attributes,
    inferred_value_types,
    is_default_domain,
    model_value_names,
)
from onnx_dc.graph.model_io import iter_graphs, unique_name

__all__ = ["Fold", "FoldSummary", "SkippedFold", "fold_normalizations"]

_LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_BN_ATTRIBUTES = frozenset({"epsilon", "momentum", "training_mode", "spatial", "is_test", "consumed_inputs"})


@dataclass(frozen=True)
class Fold:
    """One normalisation folded into a layer's weight (and bias)."""

    layer: str  # e.g. "Conv 'conv1'"
    absorbed: str  # e.g. "BatchNormalization 'bn1'"
    weight: str
    bias: str | None

    def describe(self) -> str:
        """One line for the report, e.g. ``folded BatchNormalization 'bn1' into Conv 'conv1' (weight 'w', bias 'b')``."""
        bias = f", bias {self.bias!r}" if self.bias else ""
        return f"folded {self.absorbed} into {self.layer} (weight {self.weight!r}{bias})"


@dataclass(frozen=True)
class SkippedFold:
    """A BatchNormalization after a layer that was left as it is, and why."""

    node: str
    layer: str
    reason: str

    def describe(self) -> str:
        """One line for the report."""
        return f"{self.node} after {self.layer} not folded: {self.reason}"


@dataclass
class FoldSummary:
    """What :func:`fold_normalizations` folded and which BatchNormalizations it left."""

    folds: list[Fold] = field(default_factory=list)
    skipped: list[SkippedFold] = field(default_factory=list)

    def notes(self) -> list[str]:
        """The report's notes: one line per fold and per BatchNormalization left in place."""
        return [f.describe() for f in self.folds] + [s.describe() for s in self.skipped]


def fold_normalizations(model: onnx.ModelProto, *, source_dir: str | os.PathLike | None = None) -> FoldSummary:
    """Fold BatchNormalization and per-channel Mul/Add into the preceding layers of ``model``, in place.

    Works on every graph of the model (subgraphs included, each with its own
    constants). Returns what was folded and which BatchNormalizations after a
    layer were left, with the reason. ``source_dir``: where the model's external
    data references point (a folded weight is then written into the model).
    """
    summary = FoldSummary()
    taken = model_value_names(model)
    ranks = _LazyRanks(model)
    for graph in list(iter_graphs(model.graph)):
        skipped: dict[tuple[str, str], SkippedFold] = {}
        while True:  # one pass folds every normalisation right after a layer; a chain takes a pass per link
            index = GraphIndex.build(graph, source_dir=source_dir)
            steps: list[_Step] = []
            for node in graph.node:
                step = _plan(node, index, ranks, graph is model.graph)
                if isinstance(step, SkippedFold):
                    skipped[_key(node)] = step
                elif step is not None:
                    steps.append(step)
            if not steps:
                break
            released: list[str] = []
            for step in steps:
                fold, names = _apply(step, index, model, taken)
                summary.folds.append(fold)
                skipped.pop(_key(step.node), None)
                released += names
            _drop_unused(graph, released)
        summary.skipped.extend(skipped.values())
    return summary


def _key(node: onnx.NodeProto) -> tuple[str, str]:
    return node.name, node.output[0] if node.output else ""


# ----------------------------------------------------------------------------- planning


@dataclass
class _Step:
    """A fold decided: ``node`` (BN, Mul or Add) applies ``y = scale * x + shift`` per output channel of ``layer``."""

    node: onnx.NodeProto
    layer: onnx.NodeProto
    bias_add: onnx.NodeProto | None  # a MatMul's bias Add between the layer and ``node``
    scale: np.ndarray  # [C] float64
    shift: np.ndarray  # [C] float64
    replace_with_add: bool = False  # a BN after a bias-less MatMul becomes an Add of the shift


class _LazyRanks:
    """Ranks of main-graph values from ONNX shape inference, computed on first use."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.types: dict | None = None

    def rank(self, name: str) -> int | None:
        if self.types is None:
            self.types = inferred_value_types(self.model)
        vtype = self.types.get(((), name))
        if vtype is None or not vtype.HasField("tensor_type") or not vtype.tensor_type.HasField("shape"):
            return None
        return len(vtype.tensor_type.shape.dim)


def _describe(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else node.op_type


def _plan(node: onnx.NodeProto, index: GraphIndex, ranks: _LazyRanks, main: bool) -> _Step | SkippedFold | None:
    """The fold ``node`` allows, the reason a BatchNormalization after a layer is kept, or None."""
    if not is_default_domain(node) or node.op_type not in ("BatchNormalization", "Mul", "Add") or not node.input:
        return None
    if node.op_type == "BatchNormalization":
        x = node.input[0]
    else:
        if len(node.input) != 2:
            return None
        constant_slots = [i for i in (0, 1) if index.is_float32_constant(node.input[i])]
        if len(constant_slots) != 1:
            return None
        x = node.input[1 - constant_slots[0]]
    layer, bias_add = _layer_of(x, index)
    if layer is None:
        return None
    channels, channel_axis, out_rank = _channels(layer, index, ranks if main else None)
    reason = _layer_problem(layer, bias_add, x, index, channels)
    if reason is None:
        if node.op_type == "BatchNormalization":
            result = _batch_norm(node, index, channels, channel_axis, out_rank, layer)
        else:
            result = _scale_shift(node, index, channels, channel_axis, out_rank, layer, bias_add)
        if isinstance(result, str):
            reason = result
        else:
            scale, shift = result
            replace = layer.op_type == "MatMul" and bias_add is None and bool(np.any(shift))
            return _Step(node, layer, bias_add, scale, shift, replace)
    if node.op_type == "BatchNormalization" and reason:
        return SkippedFold(_describe(node), _describe(layer), reason)
    return None


def _layer_of(x: str, index: GraphIndex) -> tuple[onnx.NodeProto | None, onnx.NodeProto | None]:
    """The layer node producing ``x``, directly or through a MatMul's constant bias Add."""
    producer = index.producers.get(x)
    if producer is None or not is_default_domain(producer):
        return None, None
    if producer.op_type in _LAYER_OPS:
        return producer, None
    if producer.op_type == "Add" and len(producer.input) == 2:
        for slot in (0, 1):
            inner = index.producers.get(producer.input[slot])
            other = producer.input[1 - slot]
            if (
                inner is not None
                and inner.op_type == "MatMul"
                and is_default_domain(inner)
                and index.is_float32_constant(other)
                and index.constant(other).ndim <= 1
            ):
                return inner, producer
    return None, None


def _layer_problem(layer, bias_add, x: str, index: GraphIndex, channels: int | None) -> str | None:
    """Why the layer's tensors or output may not change, or None."""
    if not index.is_private(x):
        return f"the output of {_describe(bias_add or layer)} is also read elsewhere (or is a graph output)"
    if bias_add is not None and not index.is_private(layer.output[0]):
        return f"the output of {_describe(layer)} is also read elsewhere"
    if len(layer.input) < 2:
        return "the layer has no weight input"
    weight = layer.input[1]
    if not index.is_float32_constant(weight) or channels is None:
        return f"its weight {weight!r} is not a float32 constant of the graph (or has an unexpected rank)"
    if not index.is_private(weight):
        return f"its weight {weight!r} is also used elsewhere (folding would change the other use)"
    if layer.input[0] == weight:
        return f"its weight {weight!r} is also its input"
    bias = _bias_name(layer, bias_add)
    if bias and not index.is_float32_constant(bias):
        return f"its bias {bias!r} is not a float32 constant of the graph"
    if bias and layer.op_type in ("Gemm", "MatMul"):
        shape = index.constant(bias).shape
        if shape not in ((channels,), (1, channels), (1,), ()):
            return f"its bias {bias!r} of shape {list(shape)} is not per output column"
    if layer.op_type == "Gemm" and float(attributes(layer).get("beta", 1.0)) == 0.0:
        return "Gemm beta is 0"
    return None


def _bias_name(layer: onnx.NodeProto, bias_add: onnx.NodeProto | None) -> str:
    if bias_add is not None:
        return next(name for name in bias_add.input if name != layer.output[0])
    return layer.input[2] if len(layer.input) > 2 else ""


def _channels(layer: onnx.NodeProto, index: GraphIndex, ranks: _LazyRanks | None) -> tuple[int | None, int, int | None]:
    """(output channels, channel axis of the output, output rank or None) of a foldable layer."""
    weight = index.constants.get(layer.input[1]) if len(layer.input) > 1 else None
    if weight is None or weight.data_type != onnx.TensorProto.FLOAT:
        return None, 1, None
    dims = [int(d) for d in weight.dims]
    attrs = attributes(layer)
    if layer.op_type == "Conv" and len(dims) >= 3:
        return dims[0], 1, len(dims)
    if layer.op_type == "ConvTranspose" and len(dims) >= 3:
        return dims[1] * int(attrs.get("group", 1)), 1, len(dims)
    if layer.op_type == "Gemm" and len(dims) == 2:
        return (dims[0] if int(attrs.get("transB", 0)) else dims[1]), 1, 2
    if layer.op_type == "MatMul" and len(dims) == 2:
        rank = ranks.rank(layer.input[0]) if ranks is not None else None
        return dims[1], -1, rank
    return None, 1, None


def _batch_norm(node, index, channels, channel_axis, out_rank, layer) -> tuple[np.ndarray, np.ndarray] | str:
    attrs = attributes(node)
    if set(attrs) - _BN_ATTRIBUTES:
        return f"unsupported attributes {sorted(set(attrs) - _BN_ATTRIBUTES)}"
    if int(attrs.get("training_mode", 0)) != 0 or int(attrs.get("spatial", 1)) != 1:
        return "not in inference form (training_mode or spatial=0)"
    if len(node.input) != 5 or any(out for out in node.output[1:]):
        return "not in inference form (it has running-statistics outputs)"
    if channel_axis == -1 and out_rank != 2:
        return f"its channels are axis 1 of the {_describe(layer)} output, not its last axis (rank {out_rank or 'unknown'})"
    params = []
    for name in node.input[1:]:
        if not index.is_float32_constant(name):
            return f"its parameter {name!r} is not a float32 constant of the graph"
        value = index.constant(name).astype(np.float64)
        if value.shape != (channels,):
            return f"its parameter {name!r} has shape {list(value.shape)}, not [{channels}]"
        params.append(value)
    scale, bias, mean, var = params
    epsilon = float(attrs.get("epsilon", 1e-5))
    denominator = np.sqrt(var + epsilon)
    if not np.all(np.isfinite(denominator)) or np.any(denominator == 0):
        return "var + epsilon is not positive"
    factor = scale / denominator
    return factor, bias - mean * factor


def _scale_shift(node, index, channels, channel_axis, out_rank, layer, bias_add) -> tuple[np.ndarray, np.ndarray] | str:
    const_name = next(name for name in node.input if index.is_float32_constant(name))
    value = _per_channel(index.constant(const_name), channels, channel_axis, out_rank)
    if value is None:
        return "the constant is not per output channel"
    if node.op_type == "Mul":
        return value, np.zeros(channels)
    if layer.op_type == "MatMul" or bias_add is not None:
        return "a MatMul's bias"
    return np.ones(channels), value


def _per_channel(value: np.ndarray, channels: int, channel_axis: int, out_rank: int | None) -> np.ndarray | None:
    """``value`` as a [channels] float64 vector when multiplying or adding it acts per channel, else None."""
    value = np.asarray(value, np.float64)
    if value.size == 1 and (value.ndim <= 1 or (out_rank is not None and value.ndim <= out_rank)):
        return np.full(channels, float(value.reshape(-1)[0]))
    if channel_axis == -1:
        if value.ndim == 1 or (out_rank is not None and value.ndim <= out_rank and all(d == 1 for d in value.shape[:-1])):
            return value.reshape(-1) if value.shape[-1] == channels else None
        return None
    if out_rank is None or value.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - value.ndim) + value.shape
    if shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return value.reshape(-1)


# ----------------------------------------------------------------------------- applying


def _apply(step: _Step, index: GraphIndex, model: onnx.ModelProto, taken: set[str]) -> tuple[Fold, list[str]]:
    """Fold one step; returns the fold and the constants it stopped reading (dropped once unused)."""
    graph = index.graph
    layer, node = step.layer, step.node
    absorbed = _describe(node)
    weight_name = layer.input[1]
    weight = index.constant(weight_name).astype(np.float64)
    _write(index, weight_name, _scaled_weight(layer, weight, step.scale))
    old_bias = _bias_name(layer, step.bias_add)
    bias_name = _fold_bias(step, index, model, taken)
    old_value = (step.bias_add or layer).output[0]
    released = [name for name in node.input if name and name != old_value] + ([old_bias] if old_bias else [])
    if step.replace_with_add:
        shift_name = unique_name(f"{node.name or weight_name}.folded_bias", taken)
        _add_constant(graph, model, shift_name, step.shift, before=node)
        add = helper.make_node("Add", [old_value, shift_name], [node.output[0]], name=node.name)
        node.CopyFrom(add)
        bias_name = shift_name
    else:
        (step.bias_add or layer).output[0] = node.output[0]
        graph.node.remove(node)
        _drop_value_info(graph, old_value)
    return Fold(_describe(layer), absorbed, weight_name, bias_name), released


def _scaled_weight(layer: onnx.NodeProto, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    attrs = attributes(layer)
    if layer.op_type == "Conv":
        return weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    if layer.op_type == "ConvTranspose":
        group = int(attrs.get("group", 1))
        grouped = weight.reshape((group, weight.shape[0] // group) + weight.shape[1:])
        factor = scale.reshape((group, 1, weight.shape[1]) + (1,) * (weight.ndim - 2))
        return (grouped * factor).reshape(weight.shape)
    if layer.op_type == "Gemm" and int(attrs.get("transB", 0)):
        return weight * scale[:, None]
    return weight * scale[None, :]


def _fold_bias(step: _Step, index: GraphIndex, model: onnx.ModelProto, taken: set[str]) -> str | None:
    """Scale and shift the layer's bias (creating one when needed); returns its name."""
    layer = step.layer
    if step.bias_add is not None:
        name = _bias_name(layer, step.bias_add)
        bias = index.constant(name).astype(np.float64)
        new = np.broadcast_to(bias.reshape(-1), step.scale.shape) * step.scale + step.shift
        return _store_bias(step.bias_add, list(step.bias_add.input).index(name), new, index, model, taken, layer)
    if step.replace_with_add or (not np.any(step.shift) and (len(layer.input) < 3 or not layer.input[2])):
        return None
    if layer.op_type == "Gemm":
        beta = float(attributes(layer).get("beta", 1.0))
        if len(layer.input) > 2 and layer.input[2]:
            c = index.constant(layer.input[2]).astype(np.float64)
            shape = c.shape if c.shape == (1, step.scale.size) else step.scale.shape
            new = (np.broadcast_to(c.reshape(-1), step.scale.shape) * step.scale + step.shift / beta).reshape(shape)
        else:
            new = step.shift / beta
        return _store_bias(layer, 2, new, index, model, taken, layer)
    if len(layer.input) > 2 and layer.input[2]:
        new = index.constant(layer.input[2]).astype(np.float64) * step.scale + step.shift
    else:
        new = step.shift
    return _store_bias(layer, 2, new, index, model, taken, layer)


def _store_bias(owner, slot, values, index, model, taken, layer) -> str:
    """Write ``values`` as input ``slot`` of ``owner``: in place when that tensor is private, else as a new one."""
    name = owner.input[slot] if slot < len(owner.input) else ""
    if name and index.is_private(name):
        _write(index, name, values)
        return name
    weight = layer.input[1]
    base = weight[: -len("weight")] + "bias" if weight.endswith("weight") else weight + "_bias"
    new_name = unique_name(base, taken)
    _add_constant(index.graph, model, new_name, values, before=layer, after_initializer=weight)
    while len(owner.input) <= slot:
        owner.input.append("")
    owner.input[slot] = new_name
    return new_name


def _write(index: GraphIndex, name: str, values: np.ndarray) -> None:
    """Replace the values of constant ``name`` in place (same name, doc string and metadata)."""
    tensor = index.constants[name]
    new = numpy_helper.from_array(np.ascontiguousarray(values, dtype=np.float32), tensor.name)
    new.doc_string = tensor.doc_string
    new.metadata_props.extend(tensor.metadata_props)
    tensor.CopyFrom(new)
    if not new.doc_string:
        tensor.ClearField("doc_string")


def _add_constant(graph, model, name, values, *, before, after_initializer: str | None = None) -> None:
    """A new float32 constant: an initializer (IR >= 4, after ``after_initializer``), else a Constant node."""
    tensor = numpy_helper.from_array(np.ascontiguousarray(values, dtype=np.float32), name)
    if model.ir_version >= 4:
        names = [t.name for t in graph.initializer]
        position = names.index(after_initializer) + 1 if after_initializer in names else len(names)
        graph.initializer.insert(position, tensor)
        return
    constant = helper.make_node("Constant", [], [name], value=tensor)
    graph.node.insert(list(graph.node).index(before), constant)


def _drop_value_info(graph: onnx.GraphProto, name: str) -> None:
    for i, vi in enumerate(graph.value_info):
        if vi.name == name:
            del graph.value_info[i]
            return


def _drop_unused(graph: onnx.GraphProto, names: list[str]) -> None:
    """Remove the constants among ``names`` that nothing reads any more."""
    index = GraphIndex.build(graph)
    for name in dict.fromkeys(names):
        if index.uses[name] or name in index.outputs or name in index.inputs:
            continue
        for i, tensor in enumerate(graph.initializer):
            if tensor.name == name:
                del graph.initializer[i]
                break
        node = index.constant_nodes.get(name)
        if node is not None:
            graph.node.remove(node)
