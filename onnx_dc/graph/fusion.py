"""Graph fusions around ``DCMatMul`` / ``DCConv``: bias ``Add``, ``Relu`` and other activations, ReLU inputs.

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

* :func:`fuse_bias`: a bias ``Add`` after a ``DCMatMul`` made from a MatMul
  becomes its bias input (the runtime adds it while the output is in cache).
* :func:`fuse_activations`: the activations
  :mod:`onnx_dc.graph.activations` recognises become the ``activation`` /
  ``activation_params`` attributes, only for the kinds the runtime
  implements (:data:`onnx_dc.graph.operators.RUNTIME_ACTIVATIONS`).

The nodes :func:`fuse_bias` and :func:`fuse_activations` remove are recorded,
serialized, in the fused node's ``metadata_props`` (``onnx_dc.absorbed.N``),
so :func:`unfuse_absorbed` puts back exactly those nodes (and the scalar
initializers only they read, at their positions).

All work on every graph of the model (If/Loop/Scan bodies included) and only
ever look at nodes of one graph at a time.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterable

import onnx
from onnx import helper, numpy_helper

from onnx_dc.codec.container_reader import read_container_info
from onnx_dc.errors import OnnxDcError
from onnx_dc.graph import operators
from onnx_dc.graph.activations import BiasMatch, find_activations_in_graph, match_bias_add
from onnx_dc.graph.graph_index import GraphIndex
from onnx_dc.graph.model_io import attribute_subgraphs, iter_graphs, unique_name
from onnx_dc.graph.operators import (
    _FUSED_OPS,
    DECOMPRESS_OPS,
    DOMAIN,
    MATMUL_OP,
    META_ABSORBED,
    META_OP,
)

__all__ = [
    "set_matmul_precision",
    "fuse_activations",
    "fuse_bias",
    "fuse_relu",
    "mark_sparse_inputs",
    "unfuse_absorbed",
    "unfuse_relu",
]

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


# ----------------------------------------------------------------------------- absorbed nodes: bias Add, activations


def fuse_bias(model: onnx.ModelProto) -> int:
    """Move the bias ``Add`` after each ``DCMatMul`` (from a MatMul) into its bias input; returns how many.

    The ``Add`` must alone read the product and add a float32 ``[N]`` tensor:
    a constant, or the output of a ``DCDecompress`` of such a tensor. The runtime adds it while the output is in cache; results are
    the same to float rounding. :func:`unfuse_absorbed` restores the ``Add``.
    """
    fused = 0
    for graph in _graphs(model):
        index = GraphIndex.build(graph)
        for node in list(graph.node):
            if node.op_type != MATMUL_OP or node.domain != DOMAIN or (len(node.input) > 2 and node.input[2]):
                continue
            meta = {e.key: e.value for e in node.metadata_props}
            if meta.get(META_OP, "MatMul") != "MatMul" or _int_attribute(node, "relu") or _has_attribute(node, "activation"):
                continue
            columns = _container_columns(index, node)
            match = match_bias_add(index, node, columns) or _decompressed_bias(index, node, columns)
            if match is None:
                continue
            _absorb(graph, node, [match.add], [], undo="bias", bias=True)
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = match.bias
            fused += 1
    return fused


def fuse_activations(model: onnx.ModelProto, kinds: dict[str, frozenset[str]] | None = None) -> int:
    """Fold each activation :func:`~onnx_dc.graph.activations.find_activations` finds into its node.

    Only kinds listed for the node's operator in ``kinds`` (default:
    :data:`onnx_dc.graph.operators.RUNTIME_ACTIVATIONS`, what the runtime
    implements) are fused: the node gets ``activation`` (the kind) and, for
    Clip, HardSigmoid and LeakyRelu, ``activation_params``; a com.microsoft
    BiasGelu/FastGelu bias moves to DCMatMul's bias input. Returns how many.
    """
    allowed = operators.RUNTIME_ACTIVATIONS if kinds is None else kinds
    if not any(allowed.values()):
        return 0  # nothing to look for (the runtime implements no fused activation yet)
    fused = 0
    for graph in _graphs(model):
        for match in find_activations_in_graph(graph, _FUSED_OPS):
            node = match.node
            if match.kind not in allowed.get(node.op_type, frozenset()) or _int_attribute(node, "relu"):
                continue
            _absorb(
                graph, node, list(match.nodes), list(match.constants),
                undo="activation", output=match.output, bias=match.bias is not None,
            )
            node.attribute.append(helper.make_attribute("activation", operators.ACTIVATION_ATTRIBUTE[match.kind]))
            if match.params:
                node.attribute.append(helper.make_attribute("activation_params", [float(p) for p in match.params]))
            if match.bias is not None:
                while len(node.input) < 3:
                    node.input.append("")
                node.input[2] = match.bias
            fused += 1
    return fused


def unfuse_absorbed(model: onnx.ModelProto, undo: str) -> int:
    """Restore the nodes absorbed by the last fusions of kind ``undo`` (``bias`` or ``activation``) exactly."""
    restored = 0
    for graph in _graphs(model):
        for node in [n for n in graph.node if _last_absorbed(n) is not None]:
            while True:
                entry = _last_absorbed(node)
                if entry is None:
                    break
                record = onnx.GraphProto()
                record.ParseFromString(base64.b64decode(entry.value))
                info = json.loads(record.doc_string)
                if info.get("undo") != undo:
                    break
                node.output[0] = record.name
                after = next(i for i, n in enumerate(graph.node) if n is node) + 1
                for offset, absorbed in enumerate(record.node):
                    graph.node.insert(after + offset, absorbed)
                for position, tensor in sorted(zip(info["initializer_positions"], record.initializer, strict=True), key=lambda p: p[0]):
                    graph.initializer.insert(position, tensor)
                if info.get("bias"):
                    del node.input[2:]
                for name in info.get("attributes", []):
                    _remove_attribute(node, name)
                keep = [e for e in node.metadata_props if e.key != entry.key]
                del node.metadata_props[:]
                node.metadata_props.extend(keep)
                restored += 1
    return restored


def _absorb(graph, node, nodes, initializers, *, undo: str, output: str | None = None, bias: bool = False) -> None:
    """Remove ``nodes`` (and private ``initializers``), recording them on ``node`` for :func:`unfuse_absorbed`."""
    record = onnx.GraphProto(name=node.output[0])
    record.node.extend(nodes)
    names = [t.name for t in graph.initializer]
    positions = sorted(names.index(name) for name in initializers)
    record.initializer.extend(graph.initializer[p] for p in positions)
    info: dict = {"undo": undo, "initializer_positions": positions, "bias": bias}
    if undo == "activation":
        info["attributes"] = ["activation", "activation_params"]
    record.doc_string = json.dumps(info)
    for position in reversed(positions):
        del graph.initializer[position]
    for absorbed in nodes:
        graph.node.remove(absorbed)
    node.output[0] = output or nodes[-1].output[0]
    count = sum(1 for e in node.metadata_props if e.key.startswith(META_ABSORBED + "."))
    entry = node.metadata_props.add()
    entry.key, entry.value = f"{META_ABSORBED}.{count + 1}", base64.b64encode(record.SerializeToString()).decode()


def _last_absorbed(node: onnx.NodeProto):
    entries = [e for e in node.metadata_props if e.key.startswith(META_ABSORBED + ".")]
    return max(entries, key=lambda e: int(e.key.rsplit(".", 1)[1])) if entries else None


def _has_attribute(node: onnx.NodeProto, name: str) -> bool:
    return any(a.name == name for a in node.attribute)


def _container_columns(index: GraphIndex, node: onnx.NodeProto) -> int | None:
    """N of a DCMatMul (trans_b = 0) from its container's header, None when unknown."""
    tensor = index.constants.get(node.input[1]) if len(node.input) > 1 else None
    if tensor is None or _int_attribute(node, "trans_b"):
        return None
    try:
        shape = read_container_info(numpy_helper.to_array(tensor)).shape
    except OnnxDcError:
        return None
    return int(shape[1]) if len(shape) == 2 else None


def _decompressed_bias(index: GraphIndex, node: onnx.NodeProto, columns: int | None) -> BiasMatch | None:
    """A bias Add whose bias is the output of a DCDecompress of a float32 [N] container."""
    value = node.output[0]
    if columns is None or not index.is_private(value) or len(index.readers.get(value, [])) != 1:
        return None
    add, slot = index.readers[value][0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2 or len(add.output) != 1:
        return None
    bias = add.input[1 - slot]
    producer = index.producers.get(bias)
    if producer is None or producer.domain != DOMAIN or producer.op_type != DECOMPRESS_OPS[onnx.TensorProto.FLOAT]:
        return None
    container = index.constants.get(producer.input[0])
    try:
        info = read_container_info(numpy_helper.to_array(container)) if container is not None else None
    except OnnxDcError:
        return None
    if info is None or str(info.dtype) != "float32" or tuple(info.shape) != (columns,):
        return None
    return BiasMatch(node, add, bias, 1 - slot)


def set_matmul_precision(model: onnx.ModelProto, precision: str) -> int:
    """Write ``precision`` on every ``DCMatMul`` of the model (``"float"``: nothing written, the default); returns how many.

    The attribute changes arithmetic only, within about 1e-5 of the largest output
    (docs/OPERATORS.md, "DCMatMul"); :func:`onnx_dc.graph.restore.decompress_model` drops it with the node.
    """
    if precision not in operators.MATMUL_PRECISIONS:
        raise ValueError(f"unknown DCMatMul precision {precision!r}")
    if precision == "float":
        return 0
    count = 0
    for graph in _graphs(model):
        for node in graph.node:
            if node.op_type == MATMUL_OP and node.domain == DOMAIN and not _has_attribute(node, "precision"):
                node.attribute.append(helper.make_attribute("precision", precision))
                count += 1
    return count
