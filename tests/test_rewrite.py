"""Tests for onnx_dc.graph.rewrite: the compressed graph, and decompressing it back to standard ONNX.

The containers here are made directly with onnx_dc.codec.container (a plain uniform
codebook), so these tests exercise the graph rewriting on its own.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import graph_builders as gb
from graph_builders import compress_all, ops_library, uniform_container  # noqa: F401  (fixture)
from onnx_dc.codec.container_reader import decode_container
from onnx_dc.errors import ContainerError, ModelError
from onnx_dc.graph.model_io import iter_graphs
from onnx_dc.graph.operators import CONV_OP, DOMAIN, MATMUL_OP
from onnx_dc.graph.rewrite import apply_compression
from onnx_dc.graph.restore import decompress_model, find_containers, has_custom_ops
from onnx_dc.graph.weights import find_weights


def quantized_reference(model: onnx.ModelProto, containers: dict[str, bytes]) -> onnx.ModelProto:
    """The original model with each weight's values replaced by the container's dense tensor."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for weight in find_weights(out):
        if weight.name in containers:
            weight.tensor.CopyFrom(nh.from_array(decode_container(containers[weight.name]), weight.tensor.name))
    return out


def skeleton(model: onnx.ModelProto) -> bytes:
    """The model without tensor values: everything the round trip must restore exactly."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for graph in iter_graphs(out.graph):
        for t in graph.initializer:
            t.ClearField("raw_data")
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    a.t.ClearField("raw_data")
    return out.SerializeToString()


def run(model: onnx.ModelProto, feeds, library: str | None = None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for g in iter_graphs(model.graph) for n in g.node]


@pytest.mark.parametrize("name", sorted(gb.ALL_BUILDERS))
def test_compressed_model_is_valid_and_decompresses_to_the_original_structure(name):
    model = gb.ALL_BUILDERS[name]()
    compressed, containers = compress_all(model)
    onnx.checker.check_model(compressed, full_check=True)
    onnx.shape_inference.infer_shapes(compressed, check_type=True, strict_mode=True)
    assert has_custom_ops(compressed)
    assert any(o.domain == DOMAIN and o.version == 1 for o in compressed.opset_import)
    assert {ref.original_name for ref in find_containers(compressed)} == set(containers)

    restored = onnx.ModelProto()
    restored.CopyFrom(compressed)
    assert decompress_model(restored) == len(containers)
    onnx.checker.check_model(restored, full_check=True)
    assert not has_custom_ops(restored)
    assert skeleton(restored) == skeleton(model)
    reference = quantized_reference(model, containers)
    assert restored.SerializeToString() == reference.SerializeToString()
    feeds = gb.inputs_for(model)
    for got, want in zip(run(restored, feeds), run(reference, feeds)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", sorted(gb.ALL_BUILDERS))
def test_custom_ops_give_the_decompressed_outputs(name, ops_library):
    model = gb.ALL_BUILDERS[name]()
    compressed, _ = compress_all(model)
    restored = onnx.ModelProto()
    restored.CopyFrom(compressed)
    decompress_model(restored)
    feeds = gb.inputs_for(model)
    for got, want in zip(run(compressed, feeds, ops_library), run(restored, feeds)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=1e-4, atol=1e-4)


def test_mlp_rewrite_details():
    model = gb.mlp()
    compressed, _ = compress_all(model, sparsity=0.9)
    nodes = {n.name: n for n in compressed.graph.node}
    # MatMul and both Gemms run on the containers; b1 (an Add operand) is decompressed and becomes fc1's bias
    # (the Add fused, tests/test_fusion.py); b2 stays dense.
    assert nodes["fc1"].op_type == MATMUL_OP and list(nodes["fc1"].input) == ["x", "w1__dc", "b1"]
    assert "fc1_bias" not in nodes and "relu1" not in nodes
    assert nodes["fc2"].op_type == MATMUL_OP and list(nodes["fc2"].input) == ["r1", "w2__dc", "b2"]
    attrs = {a.name: h.get_attribute_value(a) for a in nodes["fc2"].attribute}
    # relu2 is folded into fc2, whose X is relu1's output (tests/test_fusion.py).
    assert attrs == {"trans_b": 1, "alpha": 1.0, "beta": 1.0, "relu": 1, "sparse_input": 1}
    assert {a.name: h.get_attribute_value(a) for a in nodes["fc3"].attribute}["alpha"] == 0.5
    assert nodes["fc2"].doc_string == "fc2 doc"
    assert compressed.graph.node[0].op_type == "DCDecompress" and list(compressed.graph.node[0].output) == ["b1"]
    inits = {t.name: t for t in compressed.graph.initializer}
    assert set(inits) == {"w1__dc", "b1__dc", "w2__dc", "b2", "w3__dc"}
    assert inits["w1__dc"].data_type == T.UINT8 and len(inits["w1__dc"].dims) == 1
    meta = {e.key: e.value for e in inits["w1__dc"].metadata_props}
    assert meta["onnx_dc.name"] == "w1" and meta["onnx_dc.kind"] == "fc"
    # Model-level properties survive.
    assert compressed.producer_name == "graph_builders" and compressed.producer_version == "1.2"
    assert compressed.doc_string == "model doc" and compressed.graph.doc_string == "graph doc"
    assert [(e.key, e.value) for e in compressed.metadata_props] == [("labels", "t-shirt,trouser,pullover")]
    assert [vi.name for vi in compressed.graph.input] == ["x"]
    assert compressed.graph.output[0].SerializeToString() == model.graph.output[0].SerializeToString()
    # value_info gives the types and shapes of the new nodes' outputs.
    infos = {vi.name: vi for vi in compressed.graph.value_info}
    assert infos["b1"].type.tensor_type.elem_type == T.FLOAT
    assert [d.dim_value for d in infos["b1"].type.tensor_type.shape.dim] == [300]
    dims = infos["h1"].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and dims[1].dim_value == 300


def test_shared_initializer_is_one_container_used_by_both_paths():
    compressed, _ = compress_all(gb.shared_weight())
    containers = [t.name for t in compressed.graph.initializer]
    assert containers == ["shared__dc", "square__dc"]
    readers = {ref.original_name: sorted(n.op_type for _, n in ref.readers) for ref in find_containers(compressed)}
    # the MatMul behind Transpose(shared) reads the container too, with trans_b = 1
    assert readers == {"shared": ["DCMatMul", "DCMatMul"], "square": ["DCMatMul", "DCMatMul"]}
    nodes = {n.name: n for n in compressed.graph.node}
    assert "Transpose" not in op_types(compressed)
    assert list(nodes["use_transposed"].input) == ["c", "shared__dc"]
    assert {a.name: h.get_attribute_value(a) for a in nodes["use_transposed"].attribute}["trans_b"] == 1


def test_if_branches_keep_weights_where_they_were():
    compressed, _ = compress_all(gb.if_model())
    branch = compressed.graph.node[0]
    graphs = {a.name: a.g for a in branch.attribute}
    assert [t.name for t in compressed.graph.initializer] == ["outer.weight__dc"]
    assert [t.name for t in graphs["then_branch"].initializer] == ["then.weight__dc"]
    then_nodes = [(n.op_type, list(n.input)) for n in graphs["then_branch"].node]
    assert then_nodes == [(MATMUL_OP, ["x", "outer.weight__dc"]), (MATMUL_OP, ["t1", "then.weight__dc"])]
    else_nodes = [(n.op_type, list(n.output)) for n in graphs["else_branch"].node]
    assert else_nodes == [("Constant", ["else.weight__dc"]), (MATMUL_OP, ["e1"]), (MATMUL_OP, ["else_out"])]


def test_constant_weights_stay_constant_nodes():
    compressed, _ = compress_all(gb.constant_weights())
    ops = [(n.op_type, list(n.output)) for n in compressed.graph.node]
    assert ops[:2] == [("Constant", ["conv.w__dc"]), ("DCConv", ["r"])]  # its Relu fused
    assert ("Constant", ["fc.w__dc"]) in ops and (MATMUL_OP, ["y"]) in ops
    assert not compressed.graph.initializer


def test_float16_and_lstm_use_the_generic_path():
    compressed, _ = compress_all(gb.float16_mlp())
    assert op_types(compressed) == ["DCDecompressFloat16", "DCDecompressFloat16", "MatMul", "Relu", "MatMul"]
    compressed, _ = compress_all(gb.lstm())
    assert op_types(compressed).count("DCDecompress") == 4
    assert op_types(compressed)[-3:] == ["Slice", "Concat", "LSTM"]


def _gemm_model(*, bias_shape, trans_a=0):
    rng = np.random.default_rng(0)
    w = nh.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w")
    inits = [w]
    inputs = ["a", "w"]
    if bias_shape is not None:
        inits.append(nh.from_array(rng.standard_normal(bias_shape).astype(np.float32), "c"))
        inputs.append("c")
    a_shape = [8, 3] if trans_a else [3, 8]
    graph = h.make_graph(
        [h.make_node("Gemm", inputs, ["y"], name="gemm", transA=trans_a, beta=0.5)],
        "g",
        [h.make_tensor_value_info("a", T.FLOAT, a_shape)],
        [h.make_tensor_value_info("y", T.FLOAT, [3, 6])],
        inits,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("bias_shape", "trans_a", "fused"),
    [
        (None, 0, True),
        ([6], 0, True),
        ([1, 6], 0, True),
        ([1], 0, True),
        ([1, 1], 0, True),
        ([], 0, True),
        ([3, 6], 0, False),
        ([3, 1], 0, False),
        ([6], 1, False),
    ],
)
def test_gemm_runs_fused_only_when_the_operator_supports_it(bias_shape, trans_a, fused, ops_library):
    model = _gemm_model(bias_shape=bias_shape, trans_a=trans_a)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weight = next(w for w in find_weights(out) if w.name == "w")
    apply_compression(out, [(weight, uniform_container(weight.to_array()))])
    assert (MATMUL_OP in op_types(out)) == fused
    assert ("Gemm" in op_types(out)) == (not fused)
    onnx.checker.check_model(out, full_check=True)
    restored = onnx.ModelProto()
    restored.CopyFrom(out)
    decompress_model(restored)
    assert skeleton(restored) == skeleton(model)
    feeds = {"a": np.random.default_rng(2).standard_normal([8, 3] if trans_a else [3, 8]).astype(np.float32)}
    np.testing.assert_allclose(run(out, feeds, ops_library)[0], run(restored, feeds)[0], rtol=1e-5, atol=1e-5)


def test_corrupted_container_names_the_tensor():
    compressed, _ = compress_all(gb.mlp())
    t = next(t for t in compressed.graph.initializer if t.name == "w2__dc")
    raw = bytearray(t.raw_data)
    raw[40] ^= 0xFF
    t.raw_data = bytes(raw)
    with pytest.raises(ContainerError, match="w2__dc.*tensor 'w2'"):
        decompress_model(compressed)


def test_container_that_is_not_a_constant_is_refused():
    graph = h.make_graph(
        [h.make_node("DCDecompress", ["blob"], ["w"], domain=DOMAIN), h.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [1, 4]), h.make_tensor_value_info("blob", T.UINT8, [100])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, 4])],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid(DOMAIN, 1)])
    with pytest.raises(ModelError, match="'blob' is not a constant tensor"):
        decompress_model(model)


def test_other_version_of_the_domain_is_refused():
    model = gb.mlp()
    model.opset_import.append(h.make_opsetid(DOMAIN, 2))
    weight = find_weights(model)[0]
    with pytest.raises(ModelError, match="version 2"):
        apply_compression(model, [(weight, uniform_container(weight.to_array()))])


def test_names_never_collide():
    model = gb.mlp()
    model.graph.node[1].output[0] = "w1__dc"  # a value already called like the container would be
    model.graph.node[2].input[0] = "w1__dc"
    compressed, _ = compress_all(model)
    assert "w1__dc_1" in {t.name for t in compressed.graph.initializer}
    onnx.checker.check_model(compressed, full_check=True)
    restored = onnx.ModelProto()
    restored.CopyFrom(compressed)
    decompress_model(restored)
    assert skeleton(restored) == skeleton(model)


def _conv_model(*, group: int = 1, dtype: int = T.FLOAT, extra: dict | None = None) -> onnx.ModelProto:
    """x [N, 4, 9, 9] -> Conv(W [8, 4/group, 3, 3], bias, pads, strides) -> y."""
    rng = np.random.default_rng(1)
    np_dtype = np.float32 if dtype == T.FLOAT else np.float16
    w = nh.from_array(rng.standard_normal((8, 4 // group, 3, 3)).astype(np_dtype), "w")
    b = nh.from_array(rng.standard_normal(8).astype(np_dtype), "b")
    attrs = {"pads": [1, 0, 1, 2], "strides": [2, 1], "group": group, **(extra or {})}
    node = h.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", doc_string="conv doc", **attrs)
    graph = h.make_graph(
        [node], "conv", [h.make_tensor_value_info("x", dtype, ["N", 4, 9, 9])],
        [h.make_tensor_value_info("y", dtype, ["N", 8, 5, 9])], [w, b],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_conv_becomes_dc_conv_with_the_same_attributes():
    model = _conv_model(extra={"dilations": [1, 1], "kernel_shape": [3, 3]})
    compressed, containers = compress_all(model, sparsity=0.5)
    onnx.checker.check_model(compressed, full_check=True)
    (node,) = [n for n in compressed.graph.node if n.name == "conv"]
    assert node.op_type == CONV_OP and node.domain == DOMAIN and node.doc_string == "conv doc"
    assert list(node.input) == ["x", "w__dc", "b"] and set(containers) == {"w"}  # the 1-D bias stays dense
    original = {a.name: h.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert {a.name: h.get_attribute_value(a) for a in node.attribute} == original
    assert {e.key: e.value for e in node.metadata_props}["onnx_dc.op"] == "Conv"
    assert not any(n.op_type.startswith("DCDecompress") for n in compressed.graph.node)
    restored = onnx.ModelProto()
    restored.CopyFrom(compressed)
    assert decompress_model(restored) == 1
    assert skeleton(restored) == skeleton(model)
    assert restored.SerializeToString() == quantized_reference(model, containers).SerializeToString()


@pytest.mark.parametrize("group", [2, 4])
def test_grouped_and_depthwise_convs_become_dc_conv(group):
    model = _conv_model(group=group)
    compressed, containers = compress_all(model, sparsity=0.5)
    assert [n.op_type for n in compressed.graph.node] == [CONV_OP]
    assert {a.name: h.get_attribute_value(a) for a in compressed.graph.node[0].attribute}["group"] == group
    restored = onnx.ModelProto()
    restored.CopyFrom(compressed)
    decompress_model(restored)
    assert restored.SerializeToString() == quantized_reference(model, containers).SerializeToString()


def test_float16_conv_keeps_decompress():
    model = _conv_model(dtype=T.FLOAT16)
    compressed, _ = compress_all(model, sparsity=0.5)
    assert [n.op_type for n in compressed.graph.node] == ["DCDecompressFloat16", "Conv"]
    restored = onnx.ModelProto()
    restored.CopyFrom(compressed)
    decompress_model(restored)
    assert skeleton(restored) == skeleton(model)


def test_1d_and_3d_convs_keep_decompress():
    rng = np.random.default_rng(3)
    for weight_shape, x_shape, y_shape in (((4, 2, 3), ["N", 2, 9], ["N", 4, 7]), ((4, 2, 1, 2, 2), ["N", 2, 3, 4, 4], ["N", 4, 3, 3, 3])):
        w = nh.from_array(rng.standard_normal(weight_shape).astype(np.float32), "w")
        node = h.make_node("Conv", ["x", "w"], ["y"], name="conv")
        graph = h.make_graph(
            [node], "g", [h.make_tensor_value_info("x", T.FLOAT, x_shape)],
            [h.make_tensor_value_info("y", T.FLOAT, y_shape)], [w],
        )
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
        compressed, _ = compress_all(model, sparsity=0.5)
        assert [n.op_type for n in compressed.graph.node] == ["DCDecompress", "Conv"]


def test_conv_with_a_weight_that_is_also_its_input_keeps_decompress():
    w = nh.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    node = h.make_node("Conv", ["w", "w"], ["y"], name="conv")
    graph = h.make_graph([node], "g", [], [h.make_tensor_value_info("y", T.FLOAT, [1, 1, 1, 1])], [w])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    compressed, _ = compress_all(model, sparsity=0.0)
    assert [n.op_type for n in compressed.graph.node] == ["DCDecompress", "Conv"]


@pytest.mark.parametrize("group", [1, 2, 4])
def test_dc_conv_runs_like_the_decompressed_conv(ops_library, group):
    model = _conv_model(group=group)
    compressed, _ = compress_all(model, sparsity=0.5)
    restored = onnx.ModelProto()
    restored.CopyFrom(compressed)
    decompress_model(restored)
    x = np.random.default_rng(2).standard_normal((3, 4, 9, 9)).astype(np.float32)
    (got,) = run(compressed, {"x": x}, ops_library)
    (want,) = run(restored, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
