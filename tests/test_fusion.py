"""Relu fusion and sparse-input marking around DCMatMul (onnx_dc/graph/fusion.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import graph_builders as gb
from graph_builders import compress_all, ops_library  # noqa: F401  (fixture)
from onnx_dc.graph.fusion import fuse_relu, mark_sparse_inputs, unfuse_relu
from onnx_dc.graph.operators import DOMAIN, MATMUL_OP
from onnx_dc.graph.restore import decompress_model


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: h.get_attribute_value(a) for a in node.attribute}


def run(model: onnx.ModelProto, feeds, library: str | None = None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_mlp_relu_fused_and_relu_inputs_marked():
    model = gb.mlp()
    compressed, _ = compress_all(model, sparsity=0.9)
    nodes = {n.name: n for n in compressed.graph.node}
    # relu2 reads only fc2's output: folded into fc2. relu1 follows an Add: kept.
    assert "relu2" not in nodes and "relu1" in nodes
    assert attrs(nodes["fc2"])["relu"] == 1 and list(nodes["fc2"].output) == ["r2"]
    assert "relu" not in attrs(nodes["fc1"]) and "relu" not in attrs(nodes["fc3"])
    # fc2 reads relu1's output, fc3 reads fc2's fused Relu: both skip zero activations.
    assert attrs(nodes["fc2"])["sparse_input"] == 1 and attrs(nodes["fc3"])["sparse_input"] == 1
    assert "sparse_input" not in attrs(nodes["fc1"])
    onnx.checker.check_model(compressed, full_check=True)


def test_round_trip_restores_the_relu(ops_library):
    model = gb.mlp()
    compressed, _ = compress_all(model, sparsity=0.9)
    restored = onnx.ModelProto()
    restored.CopyFrom(compressed)
    decompress_model(restored)
    assert [n.op_type for n in restored.graph.node] == [n.op_type for n in model.graph.node]
    assert [n.name for n in restored.graph.node] == [n.name for n in model.graph.node]
    assert [list(n.output) for n in restored.graph.node] == [list(n.output) for n in model.graph.node]
    feeds = gb.inputs_for(model)
    (got,), (want,) = run(compressed, feeds, ops_library), run(restored, feeds)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _chain(relu_input_is_output: bool = False, second_reader: bool = False) -> onnx.ModelProto:
    """x -> DCMatMul -> h -> Relu -> y (+ optionally h as a graph output or read twice)."""
    rng = np.random.default_rng(0)
    container = np.frombuffer(gb.uniform_container(rng.standard_normal((8, 6)).astype(np.float32)), np.uint8)
    nodes = [
        h.make_node(MATMUL_OP, ["x", "w__dc"], ["h"], name="fc", domain=DOMAIN),
        h.make_node("Relu", ["h"], ["y"], name="act"),
    ]
    outputs = [h.make_tensor_value_info("y", T.FLOAT, None)]
    if relu_input_is_output:
        outputs.append(h.make_tensor_value_info("h", T.FLOAT, None))
    if second_reader:
        nodes.append(h.make_node("Neg", ["h"], ["z"], name="neg"))
        outputs.append(h.make_tensor_value_info("z", T.FLOAT, None))
    graph = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", T.FLOAT, [1, 8])], outputs,
                         [nh.from_array(container.copy(), "w__dc")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17), h.make_opsetid(DOMAIN, 1)])


@pytest.mark.parametrize("case", ["graph_output", "two_readers"])
def test_relu_not_fused_when_the_product_is_used_elsewhere(case):
    model = _chain(relu_input_is_output=case == "graph_output", second_reader=case == "two_readers")
    assert fuse_relu(model) == 0
    assert [n.op_type for n in model.graph.node][:2] == [MATMUL_OP, "Relu"]


def test_fuse_then_unfuse_is_the_identity():
    model = _chain()
    original = model.SerializeToString()
    assert fuse_relu(model) == 1
    assert [n.op_type for n in model.graph.node] == [MATMUL_OP]
    assert list(model.graph.node[0].output) == ["y"] and attrs(model.graph.node[0])["relu"] == 1
    assert unfuse_relu(model) == 1
    assert model.SerializeToString() == original


def test_unfuse_without_metadata_names_a_fresh_value():
    model = _chain()
    fuse_relu(model)
    del model.graph.node[0].metadata_props[:]
    assert unfuse_relu(model) == 1
    matmul, relu = model.graph.node
    assert relu.op_type == "Relu" and list(relu.output) == ["y"] and relu.input[0] == matmul.output[0] != "y"


def test_sparse_input_through_flatten():
    """A ReLU output stays mostly zero through data-movement ops such as Flatten."""
    model = _chain()
    model.graph.node.extend([
        h.make_node("Flatten", ["y"], ["f"], name="flat"),
        h.make_node(MATMUL_OP, ["f", "w__dc"], ["o"], name="fc2", domain=DOMAIN),
        h.make_node("Sigmoid", ["o"], ["s"], name="sig"),
        h.make_node(MATMUL_OP, ["s", "w__dc"], ["o2"], name="fc3", domain=DOMAIN),
    ])
    assert mark_sparse_inputs(model) == 1
    marked = {n.name for n in model.graph.node if attrs(n).get("sparse_input") == 1}
    assert marked == {"fc2"}
    assert mark_sparse_inputs(model) == 0  # idempotent
