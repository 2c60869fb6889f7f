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

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_dc.errors import ContainerError, ModelError
from onnx_dc.fusion import fuse_relu, mark_sparse_inputs, unfuse_relu
from onnx_dc.model_io import unique_name
from onnx_dc.weights import Consumer, GraphScope, Weight, iter_scopes

DOMAIN = "ai.onnx_dc"
OPSET_VERSION = 1
MATMUL_OP = "DCMatMul"
CONV_OP = "DCConv"
# Operators that read a container as input 1 and compute with it directly.
_FUSED_OPS = frozenset({MATMUL_OP, CONV_OP})
# onnxruntime custom operators declare their output type statically, so the
# runtime has one decompress operator per element type (docs/OPERATORS.md).
DECOMPRESS_OPS: dict[int, str] = {
    onnx.TensorProto.FLOAT: "DCDecompress",
    onnx.TensorProto.FLOAT16: "DCDecompressFloat16",
    onnx.TensorProto.DOUBLE: "DCDecompressDouble",
    onnx.TensorProto.BFLOAT16: "DCDecompressBFloat16",
}
_DECOMPRESS_NAMES = frozenset(DECOMPRESS_OPS.values())
CONTAINER_SUFFIX = "__dc"

META_NAME = "onnx_dc.name"  # on a container: the original tensor's name
META_KIND = "onnx_dc.kind"  # on a container: fc / conv / other
META_OP = "onnx_dc.op"  # on a DCMatMul node: MatMul or Gemm; on a DCConv node: Conv
META_ATTRS = "onnx_dc.attrs"  # on a DCMatMul node: attributes the original Gemm set explicitly
META_ADDED = "onnx_dc.added"  # on value_info entries the converter added
META_SOURCE = "onnx_dc.source"  # on a container: initializer / constant

_DEFAULT_ALPHA = 1.0
_DEFAULT_BETA = 1.0


@dataclass
class RewriteSummary:
    """What :func:`apply_compression` did."""

    containers: dict[str, str] = field(default_factory=dict)  # weight name -> container name
    matmul_nodes: int = 0
    conv_nodes: int = 0
    decompress_nodes: int = 0
    fused_relus: int = 0  # Relu nodes folded into DCMatMul (onnx_dc.fusion)
    sparse_inputs: int = 0  # DCMatMul nodes marked sparse_input (their X is a ReLU output)


@dataclass(eq=False)
class ContainerRef:
    """A container tensor found in a compressed model and the nodes that read it."""

    name: str
    original_name: str
    kind: str
    scope: GraphScope
    tensor: onnx.TensorProto
    constant_node: onnx.NodeProto | None
    readers: list[tuple[GraphScope, onnx.NodeProto]] = field(default_factory=list)

    @property
    def data(self) -> bytes:
        """The container's bytes."""
        if self.tensor.HasField("raw_data"):
            return self.tensor.raw_data
        return numpy_helper.to_array(self.tensor).tobytes()


def apply_compression(model: onnx.ModelProto, compressed: Sequence[tuple[Weight, bytes]]) -> RewriteSummary:
    """Replace each weight by its container and rewire its consumers, editing ``model`` in place.

    ``compressed`` pairs weights found by :func:`onnx_dc.weights.find_weights`
    on this same ``model`` with their container bytes.
    """
    summary = RewriteSummary()
    if not compressed:
        return summary
    value_types = _inferred_value_types(model)
    taken = _value_names(model)
    node_names = _node_names(model)
    constants = _constant_types(model)
    for weight, container in compressed:
        cname = unique_name(weight.name + CONTAINER_SUFFIX, taken)
        summary.containers[weight.name] = cname
        ctensor = _container_tensor(weight, cname, container)
        fused = [
            c
            for c in weight.consumers
            if _fusable(c, weight, constants, value_types) or _conv_fusable(c, weight, value_types)
        ]
        needs_dense = len(fused) < len(weight.consumers)
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
    summary.fused_relus = fuse_relu(model)
    summary.sparse_inputs = mark_sparse_inputs(model)
    _declare_domain(model)
    return summary


def find_containers(model: onnx.ModelProto) -> list[ContainerRef]:
    """Every container read by a ``DCMatMul``, ``DCConv`` or ``DCDecompress`` node of the model, in graph order."""
    refs: dict[tuple[int, str], ContainerRef] = {}
    order: list[ContainerRef] = []
    for scope, node, definition in _dc_nodes_with_container(model):
        if definition is None:
            raise ModelError(
                f"node {node.name or node.op_type!r} in {scope.describe()}: its container "
                f"{node.input[1 if node.op_type in _FUSED_OPS else 0]!r} is not a constant tensor of the model"
            )
        def_scope, name, tensor, constant_node = definition
        key = (id(def_scope.graph), name)
        ref = refs.get(key)
        if ref is None:
            meta = {e.key: e.value for e in tensor.metadata_props}
            original = meta.get(META_NAME) or (
                name[: -len(CONTAINER_SUFFIX)] if name.endswith(CONTAINER_SUFFIX) else name
            )
            ref = ContainerRef(name, original, meta.get(META_KIND, ""), def_scope, tensor, constant_node)
            refs[key] = ref
            order.append(ref)
        ref.readers.append((scope, node))
    # List containers in the order their tensors appear in the model (layer order, usually).
    position: dict[tuple[int, str], int] = {}
    for scope in iter_scopes(model):
        for t in scope.graph.initializer:
            position.setdefault((id(scope.graph), t.name), len(position))
        for node in scope.graph.node:
            if node.op_type == "Constant" and node.output:
                position.setdefault((id(scope.graph), node.output[0]), len(position))
    order.sort(key=lambda ref: position.get((id(ref.scope.graph), ref.name), len(position)))
    return order


def decompress_model(model: onnx.ModelProto) -> int:
    """Turn a compressed model back into standard ONNX in place; returns the number of containers decoded.

    ``DCMatMul`` nodes become the original ``MatMul``/``Gemm``, ``DCConv`` nodes
    ``Conv`` (with the same attributes), ``DCDecompress``
    outputs become dense initializers (or ``Constant`` nodes, where the weight
    was one) holding the quantized weights, and the ``ai.onnx_dc`` opset is
    dropped. Raises :class:`ContainerError` naming the tensor when a container
    is corrupted.
    """
    from onnx_dc.container import decode_container

    unfuse_relu(model)
    refs = find_containers(model)
    taken = _value_names(model)
    for ref in refs:
        try:
            dense = decode_container(ref.data)
        except ContainerError as exc:
            raise ContainerError(f"container {ref.name!r} (tensor {ref.original_name!r}): {exc}") from None
        own = [n for s, n in ref.readers if n.op_type in _DECOMPRESS_NAMES and s.graph is ref.scope.graph]
        nested = [(s, n) for s, n in ref.readers if n.op_type in _DECOMPRESS_NAMES and s.graph is not ref.scope.graph]
        matmuls = [n for _, n in ref.readers if n.op_type in _FUSED_OPS]
        primary: str | None = None
        if own:
            primary = own[0].output[0]
        elif matmuls:
            primary = ref.original_name if ref.original_name not in taken else unique_name(ref.original_name, taken)
            taken.add(primary)
        # The dense tensor takes the container's place (same initializer slot or Constant node).
        if primary is not None:
            _replace_container(model, ref, _dense_tensor(ref, dense, primary))
        else:
            _remove_container(model, ref)
        graph = ref.scope.graph
        for node in own[1:]:  # further decompressions of the same container: aliases of the first
            node.CopyFrom(helper.make_node("Identity", [primary], list(node.output), name=node.name))
        if own:
            del graph.node[_index_of(graph, own[0])]
        for scope, node in nested:
            tensor = _dense_tensor(ref, dense, node.output[0])
            if ref.constant_node is not None:
                node.CopyFrom(_constant_node(ref.constant_node, tensor, node.output[0]))
            else:
                del scope.graph.node[_index_of(scope.graph, node)]
                scope.graph.initializer.append(tensor)
        for node in matmuls:
            if node.op_type == CONV_OP:
                _from_dc_conv(node, primary)
            else:
                _from_dc_matmul(node, primary)
    _drop_added_value_info(model)
    if not any(node.domain == DOMAIN for scope in iter_scopes(model) for node in scope.graph.node):
        keep = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep)
    return len(refs)


def has_custom_ops(model: onnx.ModelProto) -> bool:
    """True when some node of the model (any graph) is in the ``ai.onnx_dc`` domain."""
    return any(node.domain == DOMAIN for scope in iter_scopes(model) for node in scope.graph.node)


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
) -> bool:
    """Whether this use can run as DCMatMul straight on the container (docs/OPERATORS.md)."""
    node = consumer.node
    if node is None or consumer.role not in ("matmul_b", "gemm_b"):
        return False
    if weight.tensor.data_type != onnx.TensorProto.FLOAT or len(weight.shape) != 2:
        return False
    if not node.input or node.input[0] == weight.name:
        return False
    if consumer.role == "matmul_b":
        return True
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if int(attrs.get("transA", 0)) != 0:
        return False
    if len(node.input) < 3 or not node.input[2]:
        return True
    bias = node.input[2]
    if bias == weight.name:
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
    n_cols = weight.shape[0] if int(attrs.get("transB", 0)) else weight.shape[1]
    return elem_type == onnx.TensorProto.FLOAT and shape in ([n_cols], [1, n_cols], [1], [1, 1], [])


def _to_dc_matmul(consumer: Consumer, cname: str, value_types) -> None:
    node = consumer.node
    assert node is not None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inputs = [node.input[0], cname]
    if consumer.role == "gemm_b" and len(node.input) > 2 and node.input[2]:
        inputs.append(node.input[2])
    new = helper.make_node(MATMUL_OP, inputs, list(node.output), name=node.name, domain=DOMAIN)
    if consumer.role == "gemm_b":
        new.attribute.extend(
            [
                helper.make_attribute("trans_b", int(attrs.get("transB", 0))),
                helper.make_attribute("alpha", float(attrs.get("alpha", _DEFAULT_ALPHA))),
                helper.make_attribute("beta", float(attrs.get("beta", _DEFAULT_BETA))),
            ]
        )
    _copy_doc_string(node, new)
    for entry in node.metadata_props:
        new.metadata_props.add().CopyFrom(entry)
    meta = new.metadata_props.add()
    meta.key, meta.value = META_OP, node.op_type
    if consumer.role == "gemm_b":
        meta = new.metadata_props.add()
        meta.key, meta.value = META_ATTRS, ",".join(sorted(attrs))
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


def _value_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor name used anywhere in the model (all graphs)."""
    names: set[str] = set()
    for scope in iter_scopes(model):
        g = scope.graph
        names.update(vi.name for vi in g.input)
        names.update(vi.name for vi in g.output)
        names.update(vi.name for vi in g.value_info)
        names.update(t.name for t in g.initializer)
        for node in g.node:
            names.update(node.input)
            names.update(node.output)
    names.discard("")
    return names


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


def _inferred_value_types(model: onnx.ModelProto) -> dict[tuple[tuple[str, ...], str], onnx.TypeProto]:
    """Types of every value ONNX shape inference can infer, keyed by (graph path, name).

    Inference runs on the model with its large tensors' bytes temporarily
    detached (marked external), so it costs little memory even for big models.
    """
    try:
        with _detached_tensor_data(model):
            inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # inference is a best effort: value_info then carries only the element type
        return {}
    types: dict[tuple[tuple[str, ...], str], onnx.TypeProto] = {}
    for scope in iter_scopes(inferred):
        for vi in list(scope.graph.value_info) + list(scope.graph.output) + list(scope.graph.input):
            if vi.HasField("type"):
                types[(scope.path, vi.name)] = vi.type
    return types


@contextlib.contextmanager
def _detached_tensor_data(model: onnx.ModelProto, min_bytes: int = 4096) -> Iterator[None]:
    detached: list[tuple[onnx.TensorProto, bytes]] = []
    try:
        for scope in iter_scopes(model):
            tensors = list(scope.graph.initializer)
            for node in scope.graph.node:
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        tensors.append(attr.t)
            for t in tensors:
                if t.data_location != onnx.TensorProto.EXTERNAL and t.HasField("raw_data") and len(t.raw_data) >= min_bytes:
                    raw = t.raw_data
                    detached.append((t, raw))
                    t.ClearField("raw_data")
                    t.data_location = onnx.TensorProto.EXTERNAL
                    for key, value in (("location", "onnx_dc_detached.bin"), ("offset", "0"), ("length", str(len(raw)))):
                        entry = t.external_data.add()
                        entry.key, entry.value = key, value
        yield
    finally:
        for t, raw in detached:
            t.ClearField("external_data")
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = raw


# ----------------------------------------------------------------------------- decompression helpers


def _dc_nodes_with_container(model: onnx.ModelProto):
    """Yield (scope, node, definition) for each DC node; definition = (scope, name, tensor, constant node) or None."""

    def walk(scope: GraphScope, chain: list[tuple[GraphScope, dict]]):
        local: dict[str, tuple] = {}
        graph = scope.graph
        for vi in graph.input:
            local[vi.name] = ()
        for t in graph.initializer:
            local[t.name] = (scope, t.name, t, None)
        for node in graph.node:
            for out in node.output:
                if not out:
                    continue
                if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                    value = next(
                        (a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR),
                        None,
                    )
                    local[out] = (scope, out, value, node) if value is not None else ()
                else:
                    local[out] = ()
        full = [(scope, local)] + chain

        def lookup(name: str):
            for _, names in full:
                if name in names:
                    found = names[name]
                    return found if found else None
            return None

        for index, node in enumerate(graph.node):
            if node.domain == DOMAIN and (node.op_type in _FUSED_OPS or node.op_type in _DECOMPRESS_NAMES):
                slot = 1 if node.op_type in _FUSED_OPS else 0
                if len(node.input) <= slot or not node.input[slot]:
                    raise ModelError(f"node {node.name or node.op_type!r} in {scope.describe()} has no container input")
                definition = lookup(node.input[slot])
                if definition is not None and definition[2].data_type != onnx.TensorProto.UINT8:
                    definition = None
                yield scope, node, definition
            for attr in node.attribute:
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []
                for sub in subs:
                    label = node.name or f"{node.op_type}#{index}"
                    step = (
                        f"{label}/{attr.name}[{list(attr.graphs).index(sub)}]"
                        if attr.type == onnx.AttributeProto.GRAPHS
                        else f"{label}/{attr.name}"
                    )
                    yield from walk(GraphScope(sub, scope.path + (step,), scope), full)

    yield from walk(GraphScope(model.graph, (), None), [])


def _dense_tensor(ref: ContainerRef, dense: np.ndarray, name: str) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(dense, name)
    _copy_doc_string(ref.tensor, tensor)
    for entry in ref.tensor.metadata_props:
        if not entry.key.startswith("onnx_dc."):
            tensor.metadata_props.add().CopyFrom(entry)
    return tensor


def _constant_node(template: onnx.NodeProto, tensor: onnx.TensorProto, output: str) -> onnx.NodeProto:
    """A Constant node ``output`` = ``tensor`` with the name, doc string and metadata of ``template``."""
    constant = helper.make_node("Constant", [], [output], name=template.name)
    constant.attribute.append(helper.make_attribute("value", tensor))
    _copy_doc_string(template, constant)
    for entry in template.metadata_props:
        constant.metadata_props.add().CopyFrom(entry)
    return constant


def _replace_container(model: onnx.ModelProto, ref: ContainerRef, dense: onnx.TensorProto) -> None:
    """Put the dense tensor where the container was: same initializer slot, or same Constant node."""
    graph = ref.scope.graph
    if ref.constant_node is not None:
        output = dense.name
        dense.name = ref.tensor.name
        ref.constant_node.CopyFrom(_constant_node(ref.constant_node, dense, output))
        return
    index = next(i for i, t in enumerate(graph.initializer) if t is ref.tensor or t.name == ref.name)
    graph.initializer[index].CopyFrom(dense)
    for i, vi in enumerate(graph.input):
        if vi.name == ref.name:  # IR <= 3: initializers are graph inputs
            graph.input[i].CopyFrom(helper.make_tensor_value_info(dense.name, dense.data_type, list(dense.dims)))
            break


def _from_dc_matmul(node: onnx.NodeProto, dense_name: str) -> None:
    meta = {e.key: e.value for e in node.metadata_props}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    trans_b = int(attrs.get("trans_b", 0))
    alpha = float(attrs.get("alpha", _DEFAULT_ALPHA))
    beta = float(attrs.get("beta", _DEFAULT_BETA))
    has_bias = len(node.input) > 2 and bool(node.input[2])
    op = meta.get(META_OP)
    if op not in ("MatMul", "Gemm"):
        op = "MatMul" if (trans_b == 0 and alpha == 1.0 and beta == 1.0 and not has_bias) else "Gemm"
    inputs = [node.input[0], dense_name] + ([node.input[2]] if has_bias else [])
    new = helper.make_node(op, inputs, list(node.output), name=node.name)
    if op == "Gemm":
        explicit = set(filter(None, meta.get(META_ATTRS, "transB,alpha,beta").split(",")))
        values = {"transA": 0, "transB": trans_b, "alpha": alpha, "beta": beta}
        for key in ("alpha", "beta", "transA", "transB"):
            if key in explicit or (key == "transB" and trans_b) or (key == "alpha" and alpha != 1.0) or (
                key == "beta" and beta != 1.0
            ):
                new.attribute.append(helper.make_attribute(key, values[key]))
    _copy_doc_string(node, new)
    for entry in node.metadata_props:
        if not entry.key.startswith("onnx_dc."):
            new.metadata_props.add().CopyFrom(entry)
    node.CopyFrom(new)


def _from_dc_conv(node: onnx.NodeProto, dense_name: str) -> None:
    inputs = [node.input[0], dense_name] + ([node.input[2]] if len(node.input) > 2 and node.input[2] else [])
    new = helper.make_node("Conv", inputs, list(node.output), name=node.name)
    new.attribute.extend(node.attribute)
    _copy_doc_string(node, new)
    for entry in node.metadata_props:
        if not entry.key.startswith("onnx_dc."):
            new.metadata_props.add().CopyFrom(entry)
    node.CopyFrom(new)


def _remove_container(model: onnx.ModelProto, ref: ContainerRef) -> None:
    graph = ref.scope.graph
    if ref.constant_node is not None:
        del graph.node[_index_of(graph, ref.constant_node)]
        return
    for i, t in enumerate(graph.initializer):
        if t is ref.tensor or t.name == ref.name:
            del graph.initializer[i]
            break
    for i, vi in enumerate(graph.input):
        if vi.name == ref.name:
            del graph.input[i]
            break


def _drop_added_value_info(model: onnx.ModelProto) -> None:
    for scope in iter_scopes(model):
        keep = [vi for vi in scope.graph.value_info if not any(e.key == META_ADDED for e in vi.metadata_props)]
        if len(keep) != len(scope.graph.value_info):
            del scope.graph.value_info[:]
            scope.graph.value_info.extend(keep)


