"""Rewriting an ONNX graph around compressed weights, and back.

Compression (:func:`apply_compression`) replaces each compressed weight by its
container, a 1-D ``uint8`` tensor named ``<weight>__dc``, held where the weight
was (an initializer of the same graph, or the value of the same ``Constant``
node), and rewires its consumers:

* a ``MatMul`` whose B is the 2-D float32 weight, and a ``Gemm`` (B the weight,
  ``transA=0``, C absent or broadcasting per column) become ``DCMatMul``
  (domain ``ai.onnx_dc``), which multiplies straight from the container;
* a 2-D ``Conv`` whose W is the 4-D float32 weight becomes ``DCConv`` (same
  attributes), which convolves straight from the container, when
  :func:`conv_runs_as_dc_conv` says so (docs/OPERATORS.md, "DCConv");
* every other use (other Conv kernels, embeddings, LSTM weights, float16 tensors,
  weights reached through Reshape/Transpose/Slice, graph outputs...) reads the
  output of one ``DCDecompress`` node (``DCDecompressFloat16``,
  ``DCDecompressDouble``, ``DCDecompressBFloat16`` for other element types)
  whose output has the weight's original name, so those consumers are
  untouched.

The converted model declares the ``ai.onnx_dc`` opset, carries ``value_info``
for the new nodes' outputs so ``onnx.checker`` and shape inference accept it,
and keeps everything else (metadata, doc strings, producer, opsets, inputs and
outputs). Enough is recorded in ``metadata_props`` of the containers and nodes
(keys starting with ``onnx_dc.``) for :func:`decompress_model` to restore the
original ops with dense (quantized) weights, a standard ONNX model that runs on
plain onnxruntime.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_dc.errors import ModelError
from onnx_dc.graph import operators
from onnx_dc.graph.fusion import fuse_activations, fuse_bias, fuse_relu, mark_sparse_inputs
from onnx_dc.graph.graph_index import GraphIndex, model_value_names
from onnx_dc.graph.graph_index import inferred_value_types as _inferred_value_types
from onnx_dc.graph.model_io import unique_name
from onnx_dc.graph.operators import (
    _DECOMPRESS_NAMES,
    CONTAINER_SUFFIX,
    CONV_OP,
    DECOMPRESS_OPS,
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DOMAIN,
    GATHER_OP,
    MATMUL_OP,
    META_ADDED,
    META_ATTRS,
    META_KEPT,
    META_KIND,
    META_NAME,
    META_OP,
    META_SOURCE,
    META_TRANSPOSE,
    OPSET_VERSION,
)
from onnx_dc.graph.weights import Consumer, Weight, iter_scopes


@dataclass
class RewriteSummary:
    """What :func:`apply_compression` did."""

    containers: dict[str, str] = field(default_factory=dict)  # weight name -> container name
    matmul_nodes: int = 0
    conv_nodes: int = 0
    decompress_nodes: int = 0
    gather_nodes: int = 0  # Gather on a weight as DCGather (only with the switch on)
    absorbed_transposes: int = 0  # Transpose nodes of a weight read by DCMatMul with trans_b
    fused_biases: int = 0  # bias Adds moved into DCMatMul's bias input (onnx_dc.graph.fusion)
    fused_relus: int = 0  # Relu nodes folded into DCMatMul
    fused_activations: int = 0  # other activations folded in (only kinds the runtime implements)
    sparse_inputs: int = 0  # DCMatMul nodes marked sparse_input (their X is a ReLU output)


def apply_compression(
    model: onnx.ModelProto,
    compressed: Iterable[tuple[Weight, bytes]],
    *,
    gather: bool | None = None,
    kept: Mapping[str, int] | None = None,
) -> RewriteSummary:
    """Replace each weight by its container and rewire its consumers, editing ``model`` in place.

    ``compressed`` pairs weights found by :func:`onnx_dc.graph.weights.find_weights`
    on this same ``model`` with their container bytes (a sequence, or an iterator
    that lets each container go once it is in the model). ``gather`` turns
    ``Gather`` on a float32 weight (axis 0) into ``DCGather`` (default:
    :data:`onnx_dc.graph.operators.RUNTIME_HAS_GATHER`). ``kept`` (weight name ->
    weights kept) is recorded on the containers for the per-layer report.
    """
    summary = RewriteSummary()
    if isinstance(compressed, Sequence) and not compressed:
        return summary
    gather = operators.RUNTIME_HAS_GATHER if gather is None else gather
    indexes: dict[int, GraphIndex] = {}
    value_types = _inferred_value_types(model)
    taken = model_value_names(model)
    node_names = _node_names(model)
    constants = _constant_types(model)
    for weight, container in compressed:
        cname = unique_name(weight.name + CONTAINER_SUFFIX, taken)
        summary.containers[weight.name] = cname
        ctensor = _container_tensor(weight, cname, container)
        if kept is not None and kept.get(weight.name, -1) >= 0:
            entry = ctensor.metadata_props.add()
            entry.key, entry.value = META_KEPT, str(kept[weight.name])
        fused = [
            c
            for c in weight.consumers
            if _fusable(c, weight, constants, value_types) or _conv_fusable(c, weight, value_types)
        ]
        transposes = {
            id(c): readers
            for c in weight.consumers
            if (readers := _transposed_readers(c, weight, constants, value_types, indexes)) is not None
        }
        gathers = [c for c in weight.consumers if gather and _gather_fusable(c, weight)]
        needs_dense = len(fused) + len(transposes) + len(gathers) < len(weight.consumers)
        graph = weight.scope.graph
        data_type = weight.tensor.data_type
        dense_type = helper.make_tensor_value_info(weight.name, data_type, list(weight.shape))
        if weight.source == "initializer":
            _replace_initializer(model, weight, ctensor)
            insert_at = _count_leading_decompress(graph)
        else:
            node = weight.constant_node
            assert node is not None
            for attr in node.attribute:
                if attr.name == "value":
                    value_name = attr.t.name  # the Constant's own tensor name is kept
                    attr.t.CopyFrom(ctensor)
                    attr.t.name = value_name
            node.output[0] = cname
            insert_at = _index_of(graph, node) + 1
        if needs_dense:
            decompress = helper.make_node(
                DECOMPRESS_OPS[data_type],
                [cname],
                [weight.name],
                name=unique_name(weight.name + "__decompress", node_names),
                domain=DOMAIN,
            )
            graph.node.insert(insert_at, decompress)
            _set_value_info(graph, dense_type)
            summary.decompress_nodes += 1
        for consumer in fused:
            if consumer.role == "conv_w":
                _to_dc_conv(consumer, cname, value_types)
                summary.conv_nodes += 1
            else:
                _to_dc_matmul(consumer, cname, value_types)
                summary.matmul_nodes += 1
        for consumer in weight.consumers:
            for reader in transposes.get(id(consumer), []):
                _to_dc_matmul(reader, cname, value_types, transpose=consumer.node)
                summary.matmul_nodes += 1
            if id(consumer) in transposes:
                consumer.scope.graph.node.remove(consumer.node)
                summary.absorbed_transposes += 1
        for consumer in gathers:
            _to_dc_gather(consumer, cname, value_types)
            summary.gather_nodes += 1
    summary.fused_biases = fuse_bias(model)
    summary.fused_relus = fuse_relu(model)
    summary.fused_activations = fuse_activations(model)
    summary.sparse_inputs = mark_sparse_inputs(model)
    _declare_domain(model)
    return summary


# ----------------------------------------------------------------------------- compression helpers


def _container_tensor(weight: Weight, cname: str, container: bytes) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(np.frombuffer(container, dtype=np.uint8), cname)
    _copy_doc_string(weight.tensor, tensor)
    for entry in weight.tensor.metadata_props:
        tensor.metadata_props.add().CopyFrom(entry)
    for key, value in ((META_NAME, weight.name), (META_KIND, weight.kind), (META_SOURCE, weight.source)):
        entry = tensor.metadata_props.add()
        entry.key, entry.value = key, value
    return tensor


def _replace_initializer(model: onnx.ModelProto, weight: Weight, ctensor: onnx.TensorProto) -> None:
    graph = weight.scope.graph
    index = next(i for i, t in enumerate(graph.initializer) if t is weight.tensor or t.name == weight.name)
    graph.initializer[index].CopyFrom(ctensor)
    if weight.is_graph_input:
        inputs = list(graph.input)
        position = next(i for i, vi in enumerate(inputs) if vi.name == weight.name)
        del graph.input[position]
        if model.ir_version < 4:  # IR <= 3: every initializer must also be a graph input
            graph.input.insert(
                position,
                helper.make_tensor_value_info(ctensor.name, onnx.TensorProto.UINT8, list(ctensor.dims)),
            )


def _fusable(
    consumer: Consumer,
    weight: Weight,
    constants: dict[str, tuple[list[int], int]],
    value_types: dict[tuple[tuple[str, ...], str], onnx.TypeProto],
    *,
    transposed: bool = False,
) -> bool:
    """Whether this use can run as DCMatMul straight on the container (docs/OPERATORS.md).

    ``transposed``: the use reads the weight through a ``Transpose`` (its B is the weight transposed).
    """
    node = consumer.node
    if node is None or consumer.role not in ("matmul_b", "gemm_b"):
        return False
    if weight.tensor.data_type != onnx.TensorProto.FLOAT or len(weight.shape) != 2:
        return False
    b_name = node.input[consumer.input_index]
    b_shape = weight.shape[::-1] if transposed else weight.shape
    if not node.input or node.input[0] == b_name:
        return False
    if consumer.role == "matmul_b":
        return True
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if int(attrs.get("transA", 0)) != 0:
        return False
    if len(node.input) < 3 or not node.input[2]:
        return True
    bias = node.input[2]
    if bias in (weight.name, b_name):
        return False
    if bias in constants:
        shape, elem_type = constants[bias]
    else:
        vtype = value_types.get((consumer.scope.path, bias))
        if vtype is None or not vtype.HasField("tensor_type") or not vtype.tensor_type.HasField("shape"):
            return False
        dims = vtype.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            return False
        shape, elem_type = [d.dim_value for d in dims], vtype.tensor_type.elem_type
    n_cols = b_shape[0] if int(attrs.get("transB", 0)) else b_shape[1]
    return elem_type == onnx.TensorProto.FLOAT and shape in ([n_cols], [1, n_cols], [1], [1, 1], [])


def _to_dc_matmul(consumer: Consumer, cname: str, value_types, transpose: onnx.NodeProto | None = None) -> None:
    """``consumer``'s MatMul / Gemm as DCMatMul on container ``cname``; ``transpose``: the Transpose it read the weight through."""
    node = consumer.node
    assert node is not None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inputs = [node.input[0], cname]
    if consumer.role == "gemm_b" and len(node.input) > 2 and node.input[2]:
        inputs.append(node.input[2])
    new = helper.make_node(MATMUL_OP, inputs, list(node.output), name=node.name, domain=DOMAIN)
    trans_b = int(attrs.get("transB", 0))
    if transpose is not None:
        trans_b = 1 - trans_b
    if consumer.role == "gemm_b":
        new.attribute.extend(
            [
                helper.make_attribute("trans_b", trans_b),
                helper.make_attribute("alpha", float(attrs.get("alpha", DEFAULT_ALPHA))),
                helper.make_attribute("beta", float(attrs.get("beta", DEFAULT_BETA))),
            ]
        )
    elif transpose is not None:
        new.attribute.append(helper.make_attribute("trans_b", 1))
    _copy_doc_string(node, new)
    for entry in node.metadata_props:
        new.metadata_props.add().CopyFrom(entry)
    meta = new.metadata_props.add()
    meta.key, meta.value = META_OP, node.op_type
    if consumer.role == "gemm_b":
        meta = new.metadata_props.add()
        meta.key, meta.value = META_ATTRS, ",".join(sorted(attrs))
    if transpose is not None:
        meta = new.metadata_props.add()
        meta.key, meta.value = META_TRANSPOSE, base64.b64encode(transpose.SerializeToString()).decode()
    node.CopyFrom(new)
    _declare_output_type(consumer, value_types)


def _transposed_readers(consumer: Consumer, weight: Weight, constants, value_types, indexes) -> list[Consumer] | None:
    """The MatMul/Gemm uses behind a ``Transpose`` of the weight when DCMatMul (``trans_b``) can take all of them."""
    node = consumer.node
    if (
        node is None
        or node.op_type != "Transpose"
        or node.domain not in ("", "ai.onnx")
        or consumer.input_index != 0
        or len(weight.shape) != 2
        or weight.tensor.data_type != onnx.TensorProto.FLOAT
        or [helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"] not in ([], [[1, 0]])
        or len(node.output) != 1
    ):
        return None
    graph = consumer.scope.graph
    index = indexes.get(id(graph))
    if index is None:
        index = indexes[id(graph)] = GraphIndex.build(graph)
    value = node.output[0]
    readers = index.readers.get(value, [])
    if not readers or not index.is_private(value, len(readers)):
        return None
    uses = [Consumer(consumer.scope, r, slot, "matmul_b" if r.op_type == "MatMul" else "gemm_b") for r, slot in readers]
    for use, (reader, slot) in zip(uses, readers, strict=True):
        if slot != 1 or reader.op_type not in ("MatMul", "Gemm") or reader.domain not in ("", "ai.onnx"):
            return None
        if not _fusable(use, weight, constants, value_types, transposed=True):
            return None
    return uses


def _gather_fusable(consumer: Consumer, weight: Weight) -> bool:
    """Whether this use is an axis-0 ``Gather`` of a float32 weight that DCGather can run (proposed operator)."""
    node = consumer.node
    if node is None or node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or consumer.input_index != 0:
        return False
    if weight.tensor.data_type != onnx.TensorProto.FLOAT or not weight.shape or len(node.input) != 2:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return set(attrs) <= {"axis"} and int(attrs.get("axis", 0)) in (0, -len(weight.shape)) and node.input[1] != weight.name


def _to_dc_gather(consumer: Consumer, cname: str, value_types) -> None:
    node = consumer.node
    assert node is not None
    new = helper.make_node(GATHER_OP, [cname, node.input[1]], list(node.output), name=node.name, domain=DOMAIN)
    _copy_doc_string(node, new)
    for entry in node.metadata_props:
        new.metadata_props.add().CopyFrom(entry)
    explicit = ",".join(f"{a.name}={helper.get_attribute_value(a)}" for a in node.attribute)
    for key, value in ((META_OP, "Gather"), (META_ATTRS, explicit)):
        meta = new.metadata_props.add()
        meta.key, meta.value = key, value
    node.CopyFrom(new)
    _declare_output_type(consumer, value_types)


def conv_runs_as_dc_conv(weight_shape: Sequence[int], attributes: dict[str, object]) -> bool:
    """Whether a 2-D float32 ``Conv`` with this weight shape and these attributes becomes ``DCConv``.

    The policy measured in docs/OPERATORS.md ("DCConv"): every 2-D
    convolution (4-D weight), grouped and depthwise ones included, runs as
    ``DCConv``; it was at least as fast as ``DCDecompress`` + ``Conv`` on every
    model measured. 1-D and 3-D convolutions keep ``DCDecompress`` + ``Conv``.
    """
    return len(weight_shape) == 4


def _conv_fusable(consumer: Consumer, weight: Weight, value_types) -> bool:
    """Whether this use is a 2-D Conv's kernel that DCConv can run straight from the container."""
    node = consumer.node
    if node is None or consumer.role != "conv_w" or node.op_type != "Conv" or consumer.input_index != 1:
        return False
    if weight.tensor.data_type != onnx.TensorProto.FLOAT or len(weight.shape) != 4:
        return False
    if not node.input or node.input[0] == weight.name or (len(node.input) > 2 and node.input[2] == weight.name):
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if set(attrs) - _CONV_ATTRIBUTES:
        return False
    x_type = value_types.get((consumer.scope.path, node.input[0]))
    if x_type is not None and x_type.HasField("tensor_type"):
        tensor_type = x_type.tensor_type
        if tensor_type.elem_type not in (0, onnx.TensorProto.FLOAT):
            return False
        if tensor_type.HasField("shape") and len(tensor_type.shape.dim) != 4:
            return False
    return conv_runs_as_dc_conv(weight.shape, attrs)


_CONV_ATTRIBUTES = frozenset({"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"})


def _to_dc_conv(consumer: Consumer, cname: str, value_types) -> None:
    node = consumer.node
    assert node is not None
    inputs = [node.input[0], cname] + ([node.input[2]] if len(node.input) > 2 and node.input[2] else [])
    new = helper.make_node(CONV_OP, inputs, list(node.output), name=node.name, domain=DOMAIN)
    new.attribute.extend(node.attribute)  # ONNX Conv's attributes, unchanged
    _copy_doc_string(node, new)
    for entry in node.metadata_props:
        new.metadata_props.add().CopyFrom(entry)
    meta = new.metadata_props.add()
    meta.key, meta.value = META_OP, node.op_type
    node.CopyFrom(new)
    _declare_output_type(consumer, value_types)


def _declare_output_type(consumer: Consumer, value_types) -> None:
    """Give the rewritten node's output a value_info (the checker cannot infer custom operators' outputs)."""
    node = consumer.node
    assert node is not None
    graph = consumer.scope.graph
    output = node.output[0]
    if output and output not in {o.name for o in graph.output}:
        existing = next((vi for vi in graph.value_info if vi.name == output), None)
        if existing is None:
            vtype = value_types.get((consumer.scope.path, output))
            info = onnx.ValueInfoProto(name=output)
            if vtype is not None and vtype.HasField("tensor_type"):
                info.type.CopyFrom(vtype)
            else:
                info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            _set_value_info(graph, info)


def _copy_doc_string(source, target) -> None:
    """Copy a doc string only when there is one (an empty one would still be serialized)."""
    if source.HasField("doc_string"):
        target.doc_string = source.doc_string


def _set_value_info(graph: onnx.GraphProto, info: onnx.ValueInfoProto) -> None:
    entry = info.metadata_props.add()
    entry.key, entry.value = META_ADDED, "1"
    for i, vi in enumerate(graph.value_info):
        if vi.name == info.name:
            graph.value_info[i].CopyFrom(info)
            return
    graph.value_info.append(info)


def _declare_domain(model: onnx.ModelProto) -> None:
    for opset in model.opset_import:
        if opset.domain == DOMAIN:
            if opset.version != OPSET_VERSION:
                raise ModelError(
                    f"the model already imports domain {DOMAIN} at version {opset.version}; "
                    f"this converter writes version {OPSET_VERSION}"
                )
            return
    model.opset_import.append(helper.make_opsetid(DOMAIN, OPSET_VERSION))


def _count_leading_decompress(graph: onnx.GraphProto) -> int:
    count = 0
    for node in graph.node:
        if node.domain == DOMAIN and node.op_type in _DECOMPRESS_NAMES:
            count += 1
        else:
            break
    return count


def _index_of(graph: onnx.GraphProto, node: onnx.NodeProto) -> int:
    for i, candidate in enumerate(graph.node):
        if candidate is node:
            return i
    raise ModelError(f"internal: node {node.name!r} not found in its graph")


def _node_names(model: onnx.ModelProto) -> set[str]:
    return {node.name for scope in iter_scopes(model) for node in scope.graph.node if node.name}


def _constant_types(model: onnx.ModelProto) -> dict[str, tuple[list[int], int]]:
    """(dims, element type) of every initializer and Constant value, by name."""
    types: dict[str, tuple[list[int], int]] = {}
    for scope in iter_scopes(model):
        for t in scope.graph.initializer:
            types[t.name] = (list(t.dims), t.data_type)
        for node in scope.graph.node:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        types[node.output[0]] = (list(attr.t.dims), attr.t.data_type)
    return types
