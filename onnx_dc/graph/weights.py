"""Finding the weights of an ONNX model that Deep Compression can compress.

A *weight* is a floating-point constant tensor: an initializer or the value of
a ``Constant`` node, in the main graph or in any subgraph (If/Loop/Scan
bodies). Every use of it is recorded as a :class:`Consumer`, including uses
from inside subgraphs through outer-scope references, so a tensor shared by
several nodes is found (and compressed) once.

Each weight gets a kind that selects its default settings:

* ``fc``: the weight of a fully connected layer, input B of ``MatMul`` or
  ``Gemm`` (or the weights of com.microsoft ``Attention`` / ``FusedMatMul``);
* ``conv``: the kernel W of ``Conv`` or ``ConvTranspose``;
* ``other``: anything else (``Gather`` embeddings, LSTM/GRU weights, scales...).

The op that uses a weight is not always its direct consumer (a Conv kernel
behind a ``Transpose`` or ``Reshape``); the kind follows such shape-only ops.
Biases (input C of ``Gemm``, input B of ``Conv``/``ConvTranspose``, the bias
inputs of com.microsoft fused operators) are marked
with :attr:`Weight.is_bias` and left dense by the converter, as in the paper.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx

from onnx_dc.graph.model_io import attribute_subgraphs
from onnx_dc.graph.tensor_store import tensor_array

WeightKind = Literal["fc", "conv", "other"]
ConsumerRole = Literal["matmul_b", "gemm_b", "conv_w", "contrib_fc", "bias", "other", "graph_output"]

KINDS: tuple[str, ...] = ("fc", "conv", "other")

FLOAT_TYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.BFLOAT16: "bfloat16",
}

# Ops that only move or reshape their first input: a weight passing through them
# keeps the kind of the op that finally uses it.
_SHAPE_ONLY_OPS = frozenset(
    {"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast", "CastLike"}
)


@dataclass(eq=False)
class GraphScope:
    """One graph of the model and where it sits: ``path`` is ``()`` for the main graph,
    otherwise the (node name or index, attribute name) steps down from it."""

    graph: onnx.GraphProto
    path: tuple[str, ...]
    parent: GraphScope | None

    @property
    def depth(self) -> int:
        """0 for the main graph, 1 for its direct subgraphs, and so on."""
        return len(self.path)

    def describe(self) -> str:
        """A readable location, e.g. ``main graph`` or ``If_0/then_branch``."""
        return "main graph" if not self.path else "/".join(self.path)


@dataclass(eq=False)
class Consumer:
    """One use of a weight: input ``input_index`` of ``node`` in ``scope``.

    ``node`` is ``None`` (and ``input_index`` -1) when the weight is itself an
    output of ``scope``'s graph.
    """

    scope: GraphScope
    node: onnx.NodeProto | None
    input_index: int
    role: ConsumerRole

    @property
    def activation_name(self) -> str | None:
        """Name of the activation multiplied by the weight (MatMul/Gemm A, Conv X), else None."""
        if self.node is None or self.role not in ("matmul_b", "gemm_b", "conv_w"):
            return None
        return self.node.input[0] if self.node.input else None


@dataclass(eq=False)
class Weight:
    """A floating-point constant tensor of the model and everything that uses it."""

    name: str
    source: Literal["initializer", "constant"]
    scope: GraphScope
    tensor: onnx.TensorProto
    constant_node: onnx.NodeProto | None
    kind: WeightKind
    is_bias: bool
    consumers: list[Consumer] = field(default_factory=list)
    is_graph_input: bool = False
    feeds_resize: bool = False
    """The weight reaches a ``Resize``'s data input, directly or through shape-only ops (a position table
    interpolated to the input's size)."""

    @property
    def dtype(self) -> str:
        """numpy dtype name of the elements: float32, float16, float64 or bfloat16."""
        return FLOAT_TYPES[self.tensor.data_type]

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's dimensions."""
        return tuple(int(d) for d in self.tensor.dims)

    @property
    def n_elements(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def size_bytes(self) -> int:
        """Dense size of the tensor in bytes."""
        return self.n_elements * (8 if self.dtype == "float64" else 4 if self.dtype == "float32" else 2)

    def to_array(self) -> np.ndarray:
        """The tensor's values as a numpy array of its dtype and shape (a memory map of an anchored
        reference, :func:`onnx_dc.graph.tensor_store.tensor_array`)."""
        return tensor_array(self.tensor)


def find_weights(model: onnx.ModelProto, *, min_elements: int = 0) -> list[Weight]:
    """Every floating-point constant tensor of ``model`` with at least ``min_elements`` elements.

    Weights are listed in graph order (main graph first, then subgraphs depth
    first; initializers before Constant nodes within a graph). Tensors nothing
    uses are skipped. The returned objects reference the protos inside
    ``model``; the rewrite step edits them in place.
    """
    main = GraphScope(model.graph, (), None)
    weights: dict[tuple[int, str], Weight] = {}
    order: list[Weight] = []
    graph_inputs = {vi.name for vi in model.graph.input}
    _collect(main, weights, order, graph_inputs)
    _resolve_uses(main, [], weights)
    result = []
    for weight in order:
        if not weight.consumers or weight.n_elements < min_elements:
            continue
        uses = [
            use for c in weight.consumers if c.node is not None
            for use in _uses_behind_shape_ops(c.scope.graph, c.node, c.input_index)
        ]
        weight.kind = _kind_of(uses)
        weight.is_bias = all(c.role == "bias" for c in weight.consumers)
        weight.feeds_resize = _feeds_resize(uses)
        result.append(weight)
    return result


def iter_scopes(model: onnx.ModelProto) -> Iterator[GraphScope]:
    """Every graph of the model (main graph first, then subgraphs depth first) as a scope."""
    yield from _iter_scopes(GraphScope(model.graph, (), None))


def _iter_scopes(scope: GraphScope) -> Iterator[GraphScope]:
    yield scope
    for index, node in enumerate(scope.graph.node):
        for attr in node.attribute:
            for sub in attribute_subgraphs(attr):
                yield from _iter_scopes(GraphScope(sub, scope.path + (_step(node, index, attr, sub),), scope))


def _step(node: onnx.NodeProto, index: int, attr: onnx.AttributeProto, sub: onnx.GraphProto) -> str:
    label = node.name or f"{node.op_type}#{index}"
    if attr.type == onnx.AttributeProto.GRAPHS:
        return f"{label}/{attr.name}[{list(attr.graphs).index(sub)}]"
    return f"{label}/{attr.name}"


def _collect(
    scope: GraphScope,
    weights: dict[tuple[int, str], Weight],
    order: list[Weight],
    graph_inputs: set[str],
) -> None:
    key = id(scope.graph)
    for tensor in scope.graph.initializer:
        if tensor.data_type in FLOAT_TYPES and tensor.name:
            w = Weight(
                name=tensor.name,
                source="initializer",
                scope=scope,
                tensor=tensor,
                constant_node=None,
                kind="other",
                is_bias=False,
                is_graph_input=scope.parent is None and tensor.name in graph_inputs,
            )
            weights[(key, tensor.name)] = w
            order.append(w)
    for node in scope.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            value = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
            if value is not None and value.t.data_type in FLOAT_TYPES and node.output[0]:
                w = Weight(
                    name=node.output[0],
                    source="constant",
                    scope=scope,
                    tensor=value.t,
                    constant_node=node,
                    kind="other",
                    is_bias=False,
                )
                weights[(key, node.output[0])] = w
                order.append(w)
    for index, node in enumerate(scope.graph.node):
        for attr in node.attribute:
            for sub in attribute_subgraphs(attr):
                _collect(GraphScope(sub, scope.path + (_step(node, index, attr, sub),), scope), weights, order, graph_inputs)


def _resolve_uses(scope: GraphScope, outer: list[tuple[GraphScope, set[str]]], weights: dict[tuple[int, str], Weight]) -> None:
    """Record every use of a weight, resolving names to the innermost scope that defines them."""
    graph = scope.graph
    local: set[str] = {vi.name for vi in graph.input}
    local.update(t.name for t in graph.initializer)
    for node in graph.node:
        local.update(o for o in node.output if o)
    chain = [(scope, local)] + outer

    def lookup(name: str) -> Weight | None:
        for owner, names in chain:
            if name in names:
                return weights.get((id(owner.graph), name))
        return None

    for index, node in enumerate(graph.node):
        for slot, name in enumerate(node.input):
            if not name:
                continue
            weight = lookup(name)
            if weight is not None:
                weight.consumers.append(Consumer(scope, node, slot, _role(node, slot)))
        for attr in node.attribute:
            for sub in attribute_subgraphs(attr):
                _resolve_uses(GraphScope(sub, scope.path + (_step(node, index, attr, sub),), scope), chain, weights)
    for output in graph.output:
        weight = lookup(output.name)
        if weight is not None:
            weight.consumers.append(Consumer(scope, None, -1, "graph_output"))


# com.microsoft fused operators (onnxruntime's transformer optimizer): inputs that are a layer's
# matrix (kind fc, compressed and decompressed at session start) or its bias (left dense).
_CONTRIB_INPUTS: dict[str, tuple[str, ...]] = {
    "Attention": ("input", "weights", "bias", "mask_index", "past", "attention_bias", "past_sequence_length"),
    "EmbedLayerNormalization": (
        "input_ids", "segment_ids", "word_embedding", "position_embedding", "segment_embedding", "gamma", "beta",
        "mask", "position_ids",
    ),
    "SkipLayerNormalization": ("input", "skip", "gamma", "beta", "bias"),
    "SkipSimplifiedLayerNormalization": ("input", "skip", "gamma", "bias"),
    "BiasGelu": ("A", "B"),
    "FastGelu": ("X", "bias"),
    "BiasAdd": ("X", "bias", "skip"),
    "FusedMatMul": ("A", "B"),
    "MultiHeadAttention": ("query", "key", "value", "bias"),
    "LayerNormalization": ("X", "Scale", "B"),
    "SimplifiedLayerNormalization": ("X", "scale"),
}
_CONTRIB_FC = {("Attention", 1), ("FusedMatMul", 1)}
_CONTRIB_BIAS = {("Attention", 2), ("SkipLayerNormalization", 4), ("SkipSimplifiedLayerNormalization", 3),
                 ("BiasGelu", 1), ("FastGelu", 1), ("BiasAdd", 1), ("MultiHeadAttention", 3)}


def describe_use(consumer: Consumer) -> str:
    """What the weight is to its consumer, e.g. ``LayerNormalization input 'Scale'`` or
    ``com.microsoft Attention input 'weights'``; ``graph output`` for a graph output."""
    node = consumer.node
    if node is None:
        return "graph output"
    domain = "" if node.domain in ("", "ai.onnx") else node.domain + " "
    names: tuple[str, ...] = ()
    if node.domain == "com.microsoft":
        names = _CONTRIB_INPUTS.get(node.op_type, ())
    elif not domain:
        try:
            names = tuple(i.name for i in onnx.defs.get_schema(node.op_type, domain="").inputs)
        except onnx.defs.SchemaError:
            names = ()
    slot = consumer.input_index
    label = names[min(slot, len(names) - 1)] if names else str(slot)
    return f"{domain}{node.op_type} input {label!r}"


def _role(node: onnx.NodeProto, slot: int) -> ConsumerRole:
    if node.domain == "com.microsoft":
        if (node.op_type, slot) in _CONTRIB_FC:
            return "contrib_fc"
        return "bias" if (node.op_type, slot) in _CONTRIB_BIAS else "other"
    if node.domain not in ("", "ai.onnx"):
        return "other"
    op = node.op_type
    if op == "MatMul" and slot == 1:
        return "matmul_b"
    if op == "Gemm" and slot == 1:
        return "gemm_b"
    if op == "Gemm" and slot == 2:
        return "bias"
    if op in ("Conv", "ConvTranspose") and slot == 1:
        return "conv_w"
    if op in ("Conv", "ConvTranspose") and slot == 2:
        return "bias"
    return "other"


def _kind_of(uses: Sequence[_ShapeOpUse]) -> WeightKind:
    roles = {_role(use.node, use.slot) for use in uses}
    if "conv_w" in roles:
        return "conv"
    if roles & {"matmul_b", "gemm_b", "contrib_fc"}:
        return "fc"
    return "other"


def _feeds_resize(uses: Sequence[_ShapeOpUse]) -> bool:
    """A use is a ``Resize``'s data input, reached through the data inputs of shape-only ops only."""
    return any(
        use.node.op_type == "Resize" and use.node.domain in ("", "ai.onnx") and use.slot == 0 and use.through_data
        and use.depth <= 8
        for use in uses
    )


@dataclass(frozen=True)
class _ShapeOpUse:
    """Input ``slot`` of ``node``, a weight's consumer (``depth`` 0) or a use behind ``depth`` shape-only ops
    (``through_data``: each of them entered by its data input, slot 0)."""

    node: onnx.NodeProto
    slot: int
    depth: int
    through_data: bool


def _uses_behind_shape_ops(
    graph: onnx.GraphProto, node: onnx.NodeProto, slot: int, depth: int = 0, through_data: bool = True
) -> Iterator[_ShapeOpUse]:
    """Input ``slot`` of ``node``, then, when ``node`` is a standard shape-only op at most 8 deep, every use of
    its outputs, recursively (same graph only)."""
    yield _ShapeOpUse(node, slot, depth, through_data)
    if depth > 8 or node.op_type not in _SHAPE_ONLY_OPS or node.domain not in ("", "ai.onnx"):
        return
    produced = set(node.output)
    for other in graph.node:
        for index, name in enumerate(other.input):
            if name in produced:
                yield from _uses_behind_shape_ops(graph, other, index, depth + 1, through_data and slot == 0)
