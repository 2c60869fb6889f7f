"""Fusions around DCMatMul / DCConv (onnx_dc/graph/fusion.py): bias Add, Relu, other activations behind the switch, sparse inputs."""

from __future__ import annotations

import graph_builders as gb
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graph_builders import compress_all, ops_library  # noqa: F401  (fixture)
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnx_dc.graph.activations import ACTIVATION_KINDS
from onnx_dc.graph.fusion import fuse_activations, fuse_relu, mark_sparse_inputs, unfuse_absorbed, unfuse_relu
from onnx_dc.graph.operators import ACTIVATION_ATTRIBUTE, CONV_OP, DOMAIN, MATMUL_OP
from onnx_dc.graph.restore import decompress_model


def attrs(node: onnx.NodeProto) -> dict:
    values = {a.name: h.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def run(model: onnx.ModelProto, feeds, library: str | None = None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_mlp_relu_fused_and_relu_inputs_marked():
    model = gb.mlp()
    compressed, _ = compress_all(model, sparsity=0.9)
    nodes = {n.name: n for n in compressed.graph.node}
    # relu2 reads only fc2's output: folded into fc2. relu1 follows fc1's bias Add, which becomes fc1's bias input.
    assert "relu2" not in nodes and "relu1" not in nodes and "fc1_bias" not in nodes
    assert attrs(nodes["fc2"])["relu"] == 1 and list(nodes["fc2"].output) == ["r2"]
    assert attrs(nodes["fc1"])["relu"] == 1 and list(nodes["fc1"].input) == ["x", "w1__dc", "b1"]
    assert "relu" not in attrs(nodes["fc3"])
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


# ----------------------------------------------------------------------------- bias Add and activations


def _bias_model(*, bias_first: bool, rank: int = 3) -> onnx.ModelProto:
    """x [N, T, 32] -> MatMul(w [32, 48]) -> Add(b [48]) -> Tanh: a transformer-style projection."""
    rng = np.random.default_rng(3)
    add_inputs = ["b", "h"] if bias_first else ["h", "b"]
    shape = ["B", "N", "T"][3 - (rank - 1):] + [32]
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        h.make_node("Add", add_inputs, ["hb"], name="proj_bias"),
        h.make_node("Tanh", ["hb"], ["y"], name="act"),
    ]
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, shape)], [h.make_tensor_value_info("y", T.FLOAT, shape[:-1] + [48])],
        [nh.from_array(rng.standard_normal((32, 48)).astype(np.float32), "w"), nh.from_array(rng.standard_normal(48).astype(np.float32), "b")],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(("bias_first", "rank"), [(True, 3), (False, 3), (False, 2), (True, 4)])
def test_bias_add_becomes_the_dc_matmul_bias(bias_first, rank, ops_library):
    model = _bias_model(bias_first=bias_first, rank=rank)
    compressed, _ = compress_all(model, sparsity=0.5, min_elements=256)
    assert [n.op_type for n in compressed.graph.node] == [MATMUL_OP, "Tanh"]
    matmul = compressed.graph.node[0]
    assert list(matmul.input) == ["x", "w__dc", "b"] and list(matmul.output) == ["hb"]
    onnx.checker.check_model(compressed, full_check=True)
    shape = [2, 5, 3, 32][4 - rank:]
    feeds = {"x": np.random.default_rng(4).standard_normal(shape).astype(np.float32)}
    # outputs unchanged to float rounding: the same model with the Add put back, both through the library
    unfused = onnx.ModelProto()
    unfused.CopyFrom(compressed)
    assert unfuse_absorbed(unfused, "bias") == 1
    assert [n.op_type for n in unfused.graph.node] == [MATMUL_OP, "Add", "Tanh"]
    (got,), (want,) = run(compressed, feeds, ops_library), run(unfused, feeds, ops_library)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    # decompress restores the original nodes exactly
    restored = onnx.ModelProto()
    restored.CopyFrom(compressed)
    decompress_model(restored)
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in restored.graph.node] == [
        (n.op_type, n.name, list(n.input), list(n.output)) for n in model.graph.node
    ]


def test_bias_not_fused_when_not_per_column_or_product_shared():
    model = _bias_model(bias_first=False)
    model.graph.initializer[1].CopyFrom(nh.from_array(np.ones((5, 48), np.float32), "b"))  # [T, N]: not per column
    compressed, _ = compress_all(model, min_elements=256)
    assert [n.op_type for n in compressed.graph.node] == [MATMUL_OP, "Add", "Tanh"]
    model = _bias_model(bias_first=False)
    model.graph.node.append(h.make_node("Neg", ["h"], ["z"]))
    model.graph.output.append(h.make_tensor_value_info("z", T.FLOAT, ["N", "T", 48]))
    compressed, _ = compress_all(model, min_elements=256)
    assert [n.op_type for n in compressed.graph.node] == [MATMUL_OP, "Add", "Tanh", "Neg"]


ALL_KINDS = {MATMUL_OP: frozenset(ACTIVATION_KINDS), CONV_OP: frozenset(ACTIVATION_KINDS)}


def _gelu_erf_model() -> onnx.ModelProto:
    """TorchScript's exact GELU after a projection with its bias: MatMul, Add(b), Div, Erf, Add, Mul, Mul."""
    model = _bias_model(bias_first=True)
    del model.graph.node[2]
    scalars = {"sqrt2": 2**0.5, "one": 1.0, "half": 0.5}
    model.graph.node.extend([
        h.make_node("Constant", [], ["sqrt2"], name="c_sqrt2", value=nh.from_array(np.array(scalars["sqrt2"], np.float32))),
        h.make_node("Div", ["hb", "sqrt2"], ["d"], name="div"),
        h.make_node("Erf", ["d"], ["e"], name="erf"),
        h.make_node("Add", ["e", "one"], ["a"], name="add1"),
        h.make_node("Mul", ["hb", "a"], ["m"], name="mul"),
        h.make_node("Mul", ["m", "half"], ["y"], name="mul_half"),
    ])
    model.graph.initializer.extend([nh.from_array(np.array(scalars[k], np.float32), k) for k in ("one", "half")])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_activations_fuse_where_the_runtime_implements_them(ops_library):
    model = _gelu_erf_model()
    compressed, _ = compress_all(model, min_elements=256)  # DCMatMul implements GELU: fused by default
    (node,) = compressed.graph.node
    assert node.op_type == MATMUL_OP and attrs(node)["activation"] == "gelu"
    x = np.random.default_rng(1).standard_normal((3, 5, 32)).astype(np.float32)
    options = ort.SessionOptions()
    options.register_custom_ops_library(ops_library)
    fused = ort.InferenceSession(compressed.SerializeToString(), options).run(None, {"x": x})[0]
    plain = onnx.ModelProto()
    plain.CopyFrom(compressed)
    decompress_model(plain)
    reference = ort.InferenceSession(plain.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(fused, reference, rtol=1e-4, atol=1e-5)
    # a kind the runtime does not list is left as nodes
    unfused, _ = compress_all(model, min_elements=256)
    unfuse_absorbed(unfused, "activation")
    assert fuse_activations(unfused, {MATMUL_OP: frozenset(), CONV_OP: frozenset()}) == 0
    assert [n.op_type for n in unfused.graph.node][:2] == [MATMUL_OP, "Constant"]


def test_gelu_fused_behind_the_switch_and_restored_exactly():
    model = _gelu_erf_model()
    compressed, _ = compress_all(model, min_elements=256)
    before = compressed.SerializeToString()
    unfuse_absorbed(compressed, "activation")  # compress_all fused it already (DCMatMul implements GELU)
    before = compressed.SerializeToString()
    assert fuse_activations(compressed, ALL_KINDS) == 1
    (node,) = compressed.graph.node
    assert node.op_type == MATMUL_OP and attrs(node)["activation"] == "gelu" and "activation_params" not in attrs(node)
    assert list(node.input) == ["x", "w__dc", "b"] and list(node.output) == ["y"]
    assert [t.name for t in compressed.graph.initializer] == ["w__dc", "b"]  # the scalars went with their nodes
    onnx.checker.check_model(compressed, full_check=True)
    fused = compressed.SerializeToString()
    assert unfuse_absorbed(compressed, "activation") == 1
    assert compressed.SerializeToString() == before
    # decompress of the fused model gives the original graph
    restored = onnx.ModelProto()
    restored.ParseFromString(fused)
    decompress_model(restored)
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in restored.graph.node] == [
        (n.op_type, n.name, list(n.input), list(n.output)) for n in model.graph.node
    ]
    assert [t.name for t in restored.graph.initializer] == [t.name for t in model.graph.initializer]


@pytest.mark.parametrize(("pattern", "kind", "params"), [
    ("clip", "Clip", [0.0, 6.0]),
    ("leaky", "LeakyRelu", [0.1]),
    ("hardsigmoid", "HardSigmoid", [0.2, 0.5]),
    ("bias_gelu", "Gelu", None),
])
def test_activation_attributes_follow_the_contract(pattern, kind, params):
    model = _bias_model(bias_first=False)
    del model.graph.node[1:]
    model.graph.initializer.pop()
    out = model.graph.node[0].output[0]
    if pattern == "clip":
        node = h.make_node("Clip", [out, "lo", "hi"], ["y"], name="act")
        model.graph.initializer.extend([nh.from_array(np.array(0, np.float32), "lo"), nh.from_array(np.array(6, np.float32), "hi")])
    elif pattern == "leaky":
        node = h.make_node("LeakyRelu", [out], ["y"], name="act", alpha=0.1)
    elif pattern == "hardsigmoid":
        node = h.make_node("HardSigmoid", [out], ["y"], name="act")
    else:
        node = h.make_node("BiasGelu", [out, "bb"], ["y"], name="act", domain="com.microsoft")
        model.graph.initializer.append(nh.from_array(np.zeros(48, np.float32), "bb"))
        model.opset_import.append(h.make_opsetid("com.microsoft", 1))
    model.graph.node.append(node)
    compressed, _ = compress_all(model, min_elements=256)
    unfuse_absorbed(compressed, "activation")  # undo what the default fusion took (DCMatMul implements GELU)
    before = compressed.SerializeToString()
    assert fuse_activations(compressed, ALL_KINDS) == 1
    (fused,) = compressed.graph.node
    assert attrs(fused)["activation"] == ACTIVATION_ATTRIBUTE[kind]
    if params is None:
        assert "activation_params" not in attrs(fused) and list(fused.input) == ["x", "w__dc", "bb"]
    else:
        assert attrs(fused)["activation_params"] == pytest.approx(params)
    assert unfuse_absorbed(compressed, "activation") == 1
    assert compressed.SerializeToString() == before


def test_dc_conv_hard_swish_fused_behind_the_switch():
    rng = np.random.default_rng(5)
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"), h.make_node("HardSwish", ["c"], ["y"], name="hs")]
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 4, 6, 6])], [h.make_tensor_value_info("y", T.FLOAT, ["N", 8, 4, 4])],
        [nh.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w"), nh.from_array(rng.standard_normal(8).astype(np.float32), "b")],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 14)])
    compressed, _ = compress_all(model, min_elements=256)
    before = compressed.SerializeToString()
    assert fuse_activations(compressed, {CONV_OP: frozenset({"HardSwish"})}) == 1
    assert [n.op_type for n in compressed.graph.node] == [CONV_OP] and attrs(compressed.graph.node[0])["activation"] == "hard_swish"
    assert fuse_activations(compressed, {CONV_OP: frozenset({"HardSwish"})}) == 0  # idempotent
    unfuse_absorbed(compressed, "activation")
    assert compressed.SerializeToString() == before
