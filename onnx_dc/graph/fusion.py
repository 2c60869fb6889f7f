"""Graph fusions around ``DCMatMul``: a following ``Relu``, and inputs that are ReLU outputs.

Run by :func:`onnx_dc.graph.rewrite.apply_compression` after the weights are
rewired, undone by :func:`onnx_dc.graph.restore.decompress_model`
(docs/OPERATORS.md, "DCMatMul"):

* :func:`fuse_relu`: a ``Relu`` that is the only reader of a ``DCMatMul``
  output (and that output is not a graph output) is folded into the
  ``DCMatMul`` as ``relu = 1``: one node less per layer, the clamp done while
  the output is in cache. The ``Relu``'s name and the intermediate value's
  name are kept in ``metadata_props`` so :func:`unfuse_relu` restores the
  original nodes exactly.
* :func:`mark_sparse_inputs`: a ``DCMatMul`` whose ``X`` is a ReLU output
  (of a ``Relu`` node, or of a ``DCMatMul`` with ``relu = 1``, possibly
  through data-movement ops such as ``Flatten``) gets
  ``sparse_input = 1``: the runtime then holds its weight as row runs, whose
  kernels skip zero activations. The attribute changes speed only, never
  results.

Both work on every graph of the model (If/Loop/Scan bodies included) and only
ever look at nodes of one graph at a time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import onnx
from onnx import helper

from onnx_dc.graph.model_io import attribute_subgraphs, iter_graphs, unique_name
from onnx_dc.graph.operators import DOMAIN, MATMUL_OP

__all__ = ["fuse_relu", "mark_sparse_inputs", "unfuse_relu"]

META_RELU_NODE = "onnx_dc.relu_node"  # on a DCMatMul with relu=1: the fused Relu's name
META_RELU_INPUT = "onnx_dc.relu_input"  # ... and the name of the value between the two nodes
# Ops that only move data: a ReLU output stays mostly zero through them.
_DATA_MOVEMENT_OPS = frozenset({"Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose"})


def fuse_relu(model: onnx.ModelProto) -> int:
    """Fold each ``Relu`` that alone reads a ``DCMatMul`` output into it (``relu = 1``); returns how many."""
    fused = 0
    for graph in _graphs(model):
        uses = _uses(graph)
        outputs = {o.name for o in graph.output}
        producers = {out: node for node in graph.node for out in node.output if out}
        relus = [n for n in graph.node if n.op_type == "Relu" and n.domain in ("", "ai.onnx") and len(n.input) == 1]
        removed: list[onnx.NodeProto] = []
        for relu in relus:
            value = relu.input[0]
            producer = producers.get(value)
            if (
                producer is None
                or producer.op_type != MATMUL_OP
                or producer.domain != DOMAIN
                or _int_attribute(producer, "relu") != 0
                or uses[value] != 1
                or value in outputs
                or len(relu.output) != 1
                or not relu.output[0]
            ):
                continue
            _set_int_attribute(producer, "relu", 1)
            for key, meta_value in ((META_RELU_NODE, relu.name), (META_RELU_INPUT, value)):
                entry = producer.metadata_props.add()
                entry.key, entry.value = key, meta_value
            producer.output[0] = relu.output[0]
            producers[relu.output[0]] = producer
            removed.append(relu)
            fused += 1
        for relu in removed:
            graph.node.remove(relu)
    return fused


def mark_sparse_inputs(model: onnx.ModelProto) -> int:
    """Set ``sparse_input = 1`` on each ``DCMatMul`` whose ``X`` is a ReLU output; returns how many."""
    marked = 0
    for graph in _graphs(model):
        producers = {out: node for node in graph.node for out in node.output if out}
        for node in graph.node:
            if node.op_type != MATMUL_OP or node.domain != DOMAIN or not node.input:
                continue
            if _is_relu_output(node.input[0], producers) and _int_attribute(node, "sparse_input") == 0:
                _set_int_attribute(node, "sparse_input", 1)
                marked += 1
    return marked


def unfuse_relu(model: onnx.ModelProto) -> int:
    """Undo :func:`fuse_relu`: split each ``DCMatMul`` with ``relu = 1`` back into ``DCMatMul`` + ``Relu``."""
    restored = 0
    for graph in _graphs(model):
        index = 0
        while index < len(graph.node):
            node = graph.node[index]
            index += 1
            if node.op_type != MATMUL_OP or node.domain != DOMAIN or _int_attribute(node, "relu") != 1:
                continue
            meta = {e.key: e.value for e in node.metadata_props}
            taken = {v for n in graph.node for v in list(n.input) + list(n.output)}
            between = unique_name(meta.get(META_RELU_INPUT) or node.output[0] + "__matmul", taken)
            relu = helper.make_node("Relu", [between], [node.output[0]], name=meta.get(META_RELU_NODE, ""))
            node.output[0] = between
            _remove_attribute(node, "relu")
            keep = [e for e in node.metadata_props if e.key not in (META_RELU_NODE, META_RELU_INPUT)]
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
            graph.node.insert(index, relu)
            index += 1
            restored += 1
    return restored


def _graphs(model: onnx.ModelProto) -> Iterable[onnx.GraphProto]:
    return list(iter_graphs(model.graph))


def _uses(graph: onnx.GraphProto) -> Counter[str]:
    """How many times each value name is read in ``graph``, reads inside its subgraphs included."""
    counts: Counter[str] = Counter()
    for node in graph.node:
        counts.update(name for name in node.input if name)
        for attr in node.attribute:
            for sub in attribute_subgraphs(attr):
                for inner in iter_graphs(sub):
                    for inner_node in inner.node:
                        counts.update(name for name in inner_node.input if name)
    return counts


def _is_relu_output(name: str, producers: dict[str, onnx.NodeProto]) -> bool:
    seen: set[str] = set()
    while name in producers and name not in seen:
        seen.add(name)
        node = producers[name]
        if node.op_type == "Relu" and node.domain in ("", "ai.onnx"):
            return True
        if node.domain == DOMAIN and node.op_type == MATMUL_OP:
            return _int_attribute(node, "relu") == 1
        if node.op_type in _DATA_MOVEMENT_OPS and node.domain in ("", "ai.onnx") and node.input:
            name = node.input[0]
            continue
        return False
    return False


def _int_attribute(node: onnx.NodeProto, name: str) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(helper.get_attribute_value(attr))
    return 0


def _set_int_attribute(node: onnx.NodeProto, name: str, value: int) -> None:
    _remove_attribute(node, name)
    node.attribute.append(helper.make_attribute(name, value))


def _remove_attribute(node: onnx.NodeProto, name: str) -> None:
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)
