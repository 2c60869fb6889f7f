"""A read-only index of one graph for pattern matching: producers, readers and constants by value name.

The converter's pre-passes (:mod:`~onnx_dc.graph.folding`,
:mod:`~onnx_dc.graph.shared`) and pattern matchers
(:mod:`~onnx_dc.graph.activations`, :mod:`~onnx_dc.graph.fusion`) look at
one graph at a time: which node produces a value, which nodes read it (reads
from inside subgraphs counted too, so a value a subgraph uses is never
treated as private), whether it is a graph output, and the constant tensor
behind a name (an initializer or a ``Constant`` node of this graph).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnx_dc.graph.model_io import attribute_subgraphs, iter_graphs
from onnx_dc.graph.tensor_store import structure_of, tensor_values
from onnx_dc.graph.weights import iter_scopes

__all__ = ["GraphIndex", "attributes", "inferred_value_types", "is_default_domain", "model_value_names"]


def is_default_domain(node: onnx.NodeProto) -> bool:
    """True for a node of the standard ONNX domain."""
    return node.domain in ("", "ai.onnx")


def attributes(node: onnx.NodeProto) -> dict[str, object]:
    """The node's attributes as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@dataclass(eq=False)
class GraphIndex:
    """Producers, readers, outputs and constants of ``graph`` (rebuild it after editing the graph)."""

    graph: onnx.GraphProto
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = field(default_factory=dict)
    uses: Counter[str] = field(default_factory=Counter)  # reads in this graph and in its subgraphs
    outputs: set[str] = field(default_factory=set)
    inputs: set[str] = field(default_factory=set)
    constants: dict[str, onnx.TensorProto] = field(default_factory=dict)
    constant_nodes: dict[str, onnx.NodeProto] = field(default_factory=dict)
    source_dir: str | os.PathLike | None = None  # where external data references point

    @classmethod
    def build(cls, graph: onnx.GraphProto, *, source_dir: str | os.PathLike | None = None) -> GraphIndex:
        """Index ``graph`` as it is now (``source_dir``: where its external data references point)."""
        index = cls(graph, source_dir=source_dir)
        index.outputs = {o.name for o in graph.output}
        index.inputs = {i.name for i in graph.input}
        for tensor in graph.initializer:
            index.constants[tensor.name] = tensor
        for node in graph.node:
            for out in node.output:
                if out:
                    index.producers[out] = node
            if node.op_type == "Constant" and is_default_domain(node) and len(node.output) == 1:
                value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
                if value is not None:
                    index.constants[node.output[0]] = value
                    index.constant_nodes[node.output[0]] = node
            for slot, name in enumerate(node.input):
                if name:
                    index.readers.setdefault(name, []).append((node, slot))
                    index.uses[name] += 1
            for attr in node.attribute:
                for sub in attribute_subgraphs(attr):
                    for inner in iter_graphs(sub):
                        for inner_node in inner.node:
                            index.uses.update(name for name in inner_node.input if name)
        return index

    def is_private(self, name: str, reader_count: int = 1) -> bool:
        """Whether ``name`` is read exactly ``reader_count`` times (subgraphs included) and is no graph output."""
        return self.uses[name] == reader_count and name not in self.outputs

    def constant(self, name: str) -> np.ndarray | None:
        """The values of a constant tensor of this graph (initializer or Constant node), else None.

        An initializer that is also a graph input can be overridden at run
        time, so it does not count as a constant.
        """
        tensor = self.constants.get(name)
        if tensor is None or name in self.inputs:
            return None
        return np.asarray(tensor_values(tensor, self.source_dir))

    def is_float32_constant(self, name: str) -> bool:
        """Whether ``name`` is a float32 constant tensor of this graph."""
        tensor = self.constants.get(name)
        return tensor is not None and name not in self.inputs and tensor.data_type == onnx.TensorProto.FLOAT


def model_value_names(model: onnx.ModelProto, *, value_info: bool = True) -> set[str]:
    """Every tensor name used anywhere in the model (all graphs): what a new name must avoid.

    ``value_info=False`` leaves out names that only a ``value_info`` entry mentions
    (an exporter may describe an initializer there; restoring it may take the name).
    """
    names: set[str] = set()
    for graph in iter_graphs(model.graph):
        names.update(vi.name for vi in graph.input)
        names.update(vi.name for vi in graph.output)
        if value_info:
            names.update(vi.name for vi in graph.value_info)
        names.update(t.name for t in graph.initializer)
        for node in graph.node:
            names.update(node.input)
            names.update(node.output)
    names.discard("")
    return names


def inferred_value_types(model: onnx.ModelProto) -> dict[tuple[tuple[str, ...], str], onnx.TypeProto]:
    """Types of every value ONNX shape inference can infer, keyed by (graph path, name).

    Inference runs on a copy of the model without its large tensors' bytes
    (:func:`onnx_dc.graph.tensor_store.structure_of`), so it costs little memory even for big models.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(structure_of(model), check_type=False, strict_mode=False)
    except Exception:  # inference is a best effort: value_info then carries only the element type
        return {}
    types: dict[tuple[tuple[str, ...], str], onnx.TypeProto] = {}
    for scope in iter_scopes(inferred):
        for vi in list(scope.graph.value_info) + list(scope.graph.output) + list(scope.graph.input):
            if vi.HasField("type"):
                types[(scope.path, vi.name)] = vi.type
    return types
