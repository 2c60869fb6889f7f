"""Restoring a compressed model: finding its containers and turning it back into standard ONNX.

:func:`find_containers` lists the containers of a model converted by
:func:`onnx_dc.graph.rewrite.apply_compression` (with the original name, kind
and consumers recorded in their metadata); :func:`decompress_model` decodes
each one and restores the original operators (``MatMul``, ``Gemm``, ``Conv``,
the fused ``Relu``) with dense, quantized weights, so that the model runs on
plain onnxruntime.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_dc.errors import ContainerError, ModelError
from onnx_dc.graph.fusion import unfuse_absorbed, unfuse_relu
from onnx_dc.graph.graph_index import model_value_names
from onnx_dc.graph.model_io import unique_name
from onnx_dc.graph.operators import (
    _DECOMPRESS_NAMES,
    _FUSED_OPS,
    CONTAINER_SUFFIX,
    CONV_OP,
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    DOMAIN,
    GATHER_OP,
    META_ADDED,
    META_ATTRS,
    META_KIND,
    META_NAME,
    META_OP,
    META_TRANSPOSE,
    MODEL_META_RUNTIME,
)
from onnx_dc.graph.rewrite import _copy_doc_string, _index_of
from onnx_dc.graph.tensor_store import tensor_bytes_of
from onnx_dc.graph.weights import GraphScope, iter_scopes

_CONTAINER_FIRST = _DECOMPRESS_NAMES | {GATHER_OP}  # operators reading the container as input 0

__all__ = [
    "ContainerRef",
    "decompress_model",
    "find_containers",
    "has_custom_ops",
    "is_compressed",
]




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
    base_dir: Path | None = None  # where external data is (a model from onnx_dc.graph.tensor_store)

    @property
    def data(self) -> bytes:
        """The container's bytes (read from its file when it is external data)."""
        return tensor_bytes_of(self.tensor, self.base_dir)


def find_containers(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> list[ContainerRef]:
    """Every container read by a ``DCMatMul``, ``DCConv``, ``DCGather`` or ``DCDecompress`` node of the model, in graph order.

    ``base_dir``: the directory external data references are relative to (their bytes are read on demand).
    """
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
            ref = ContainerRef(name, original, meta.get(META_KIND, ""), def_scope, tensor, constant_node,
                               base_dir=None if base_dir is None else Path(base_dir))
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
    dropped, and with it the model's ``onnx_dc.runtime`` hint (``onnx_dc.version`` and
    the recipe stay). Raises :class:`ContainerError` naming the tensor when a container
    is corrupted.
    """
    from onnx_dc.codec.container_reader import decode_container

    unfuse_absorbed(model, "activation")  # the reverse of apply_compression's fusions
    unfuse_relu(model)
    unfuse_absorbed(model, "bias")
    refs = find_containers(model)
    taken = model_value_names(model, value_info=False)
    for ref in refs:
        try:
            dense = decode_container(ref.data)
        except ContainerError as exc:
            raise ContainerError(f"container {ref.name!r} (tensor {ref.original_name!r}): {exc}") from None
        own = [n for s, n in ref.readers if n.op_type in _DECOMPRESS_NAMES and s.graph is ref.scope.graph]
        nested = [(s, n) for s, n in ref.readers if n.op_type in _DECOMPRESS_NAMES and s.graph is not ref.scope.graph]
        matmuls = [(s, n) for s, n in ref.readers if n.op_type in _FUSED_OPS or n.op_type == GATHER_OP]
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
        for scope, node in matmuls:
            if node.op_type == CONV_OP:
                _from_dc_conv(node, primary)
            elif node.op_type == GATHER_OP:
                _from_dc_gather(node, primary)
            else:
                _from_dc_matmul(node, _restore_transpose(scope.graph, node, primary))
    _drop_added_value_info(model)
    if not any(node.domain == DOMAIN for scope in iter_scopes(model) for node in scope.graph.node):
        keep = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep)
        # The run-time hint is no longer true; the version and the recipe stay as provenance.
        kept = [entry for entry in model.metadata_props if entry.key != MODEL_META_RUNTIME]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
    return len(refs)


def has_custom_ops(model: onnx.ModelProto) -> bool:
    """True when some node of the model (any graph) is in the ``ai.onnx_dc`` domain."""
    return any(node.domain == DOMAIN for scope in iter_scopes(model) for node in scope.graph.node)


def is_compressed(model: onnx.ModelProto) -> bool:
    """True when the model holds anything onnx-dc writes: ``ai.onnx_dc`` nodes or opset, or container tensors."""
    if has_custom_ops(model) or any(opset.domain == DOMAIN for opset in model.opset_import):
        return True
    for scope in iter_scopes(model):
        tensors = list(scope.graph.initializer) + [
            attr.t for node in scope.graph.node if node.op_type == "Constant" for attr in node.attribute if attr.name == "value"
        ]
        if any(entry.key == META_NAME for tensor in tensors for entry in tensor.metadata_props):
            return True
    return False


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
            if node.domain == DOMAIN and (node.op_type in _FUSED_OPS or node.op_type in _CONTAINER_FIRST):
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


def _restore_transpose(graph: onnx.GraphProto, node: onnx.NodeProto, dense_name: str) -> str:
    """For a DCMatMul that absorbed a ``Transpose`` of its weight: put that node back (once); its output's name."""
    meta = {e.key: e.value for e in node.metadata_props}
    if META_TRANSPOSE not in meta:
        return dense_name
    transpose = onnx.NodeProto()
    transpose.ParseFromString(base64.b64decode(meta[META_TRANSPOSE]))
    transpose.input[0] = dense_name
    if not any(transpose.output[0] in n.output for n in graph.node):
        graph.node.insert(_index_of(graph, node), transpose)
    return transpose.output[0]


def _from_dc_gather(node: onnx.NodeProto, dense_name: str) -> None:
    meta = {e.key: e.value for e in node.metadata_props}
    new = helper.make_node("Gather", [dense_name, node.input[1]], list(node.output), name=node.name)
    for item in filter(None, meta.get(META_ATTRS, "").split(",")):
        key, value = item.split("=", 1)
        new.attribute.append(helper.make_attribute(key, int(value)))
    _copy_doc_string(node, new)
    for entry in node.metadata_props:
        if not entry.key.startswith("onnx_dc."):
            new.metadata_props.add().CopyFrom(entry)
    node.CopyFrom(new)


def _from_dc_matmul(node: onnx.NodeProto, dense_name: str) -> None:
    meta = {e.key: e.value for e in node.metadata_props}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    trans_b = int(attrs.get("trans_b", 0))
    if META_TRANSPOSE in meta:  # the weight is read through its Transpose again
        trans_b = 1 - trans_b if meta.get(META_OP) == "Gemm" else 0
    alpha = float(attrs.get("alpha", DEFAULT_ALPHA))
    beta = float(attrs.get("beta", DEFAULT_BETA))
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
