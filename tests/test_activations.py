"""The activation analysis after DCMatMul / DCConv (onnx_dc/graph/activations.py).

Each pattern is a small model ``x -> MatMul (or Conv) -> activation -> y``
compressed with graph_builders.compress_all; the analysis must name the kind,
its parameters and the nodes it would absorb, and the kind applied to the
product must give the original model's output as onnxruntime computes it.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graph_builders import compress_all
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnx_dc.graph import operators
from onnx_dc.graph.activations import FLT_MAX, activation_function, find_activations
from onnx_dc.graph.operators import CONV_OP, MATMUL_OP

SQRT2 = math.sqrt(2.0)


def scalar(name: str, value: float) -> onnx.TensorProto:
    return nh.from_array(np.array(value, np.float32), name)


def constant_node(name: str, value: float) -> onnx.NodeProto:
    return h.make_node("Constant", [], [name], name=f"const_{name}", value=scalar(f"{name}_value", value))


def matmul_model(pattern, *, opset: int = 17, extra_outputs=(), domains=()) -> onnx.ModelProto:
    """x [N, 16] -> MatMul(w [16, 24]) -> h -> pattern(h) -> y."""
    rng = np.random.default_rng(0)
    nodes, inits, out = pattern("h")
    nodes = [h.make_node("MatMul", ["x", "w"], ["h"], name="fc")] + nodes
    outputs = [h.make_tensor_value_info(out, T.FLOAT, ["N", 24])]
    outputs += [h.make_tensor_value_info(name, T.FLOAT, ["N", 24]) for name in extra_outputs]
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])], outputs,
        [nh.from_array((rng.standard_normal((16, 24)) * 0.8).astype(np.float32), "w")] + inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)] + [h.make_opsetid(d, 1) for d in domains])
    model.ir_version = 8
    return model


@pytest.fixture(autouse=True)
def analysis_only(monkeypatch):
    """These tests look at the graph before fusion: the converter fuses no activation here."""
    monkeypatch.setattr(operators, "RUNTIME_ACTIVATIONS", {MATMUL_OP: frozenset(), CONV_OP: frozenset()})


def check(model: onnx.ModelProto, kind: str, params=(), absorbed=None, op=MATMUL_OP):
    """The analysis of the compressed model finds ``kind`` and it reproduces the original's output."""
    compressed, _ = compress_all(model, sparsity=0.0, bits=8, min_elements=256)
    matches = find_activations(compressed)
    assert len(matches) == 1, [(m.kind, m.params) for m in matches]
    (match,) = matches
    assert match.node.op_type == op and match.kind == kind
    np.testing.assert_allclose(match.params, params, rtol=1e-6)
    if absorbed is not None:
        assert [n.op_type for n in match.nodes] == absorbed
    assert match.output == model.graph.output[0].name
    # the kind applied to the product equals what onnxruntime computes for the pattern
    x = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32) * 3
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    product = x.astype(np.float64) @ nh.to_array(model.graph.initializer[0]).astype(np.float64)
    want = activation_function(kind, tuple(params))(product)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    return match


def single(op: str, **attrs):
    return lambda v: ([h.make_node(op, [v], ["y"], name="act", **attrs)], [], "y")


@pytest.mark.parametrize(("op", "kind"), [("Sigmoid", "Sigmoid"), ("Tanh", "Tanh")])
def test_single_parameter_free_operators(op, kind):
    check(matmul_model(single(op)), kind, (), [op])


def test_relu_after_dc_matmul_is_already_fused():
    compressed, _ = compress_all(min_elements=256, model=matmul_model(single("Relu")))
    assert [n.op_type for n in compressed.graph.node] == [MATMUL_OP] and find_activations(compressed) == []


def test_hard_swish_operator():
    check(matmul_model(single("HardSwish"), opset=14), "HardSwish", (), ["HardSwish"])


def test_leaky_relu_and_hard_sigmoid_read_their_attributes():
    check(matmul_model(single("LeakyRelu", alpha=0.1)), "LeakyRelu", (0.1,))
    check(matmul_model(single("LeakyRelu")), "LeakyRelu", (0.01,))
    check(matmul_model(single("HardSigmoid", alpha=0.3, beta=0.4)), "HardSigmoid", (0.3, 0.4))
    check(matmul_model(single("HardSigmoid")), "HardSigmoid", (0.2, 0.5))


def test_clip_with_input_bounds_attribute_bounds_and_relu6():
    def relu6(v):
        return [h.make_node("Clip", [v, "lo", "hi"], ["y"], name="clip")], [scalar("lo", 0.0), scalar("hi", 6.0)], "y"

    match = check(matmul_model(relu6), "Clip", (0.0, 6.0), ["Clip"])
    assert match.constants == ("lo", "hi")

    def upper_only(v):
        nodes = [constant_node("hi", 1.5), h.make_node("Clip", [v, "", "hi"], ["y"], name="clip")]
        return nodes, [], "y"

    check(matmul_model(upper_only), "Clip", (-FLT_MAX, 1.5), ["Constant", "Clip"])
    check(matmul_model(single("Clip", min=-1.0, max=2.0), opset=10), "Clip", (-1.0, 2.0), ["Clip"])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_operator(approximate):
    kind = "Gelu" if approximate == "none" else "FastGelu"
    check(matmul_model(single("Gelu", approximate=approximate), opset=20), kind, (), ["Gelu"])


def test_hard_swish_as_x_times_hard_sigmoid():
    def pattern(v):
        return [
            h.make_node("HardSigmoid", [v], ["hs"], name="hsig", alpha=1.0 / 6, beta=0.5),
            h.make_node("Mul", ["hs", v], ["y"], name="mul"),
        ], [], "y"

    check(matmul_model(pattern), "HardSwish", (), ["HardSigmoid", "Mul"])


def test_paddle_hard_swish_and_hard_sigmoid():
    def paddle(v, *, then_mul=True):
        nodes = [
            h.make_node("Add", [v, "three"], ["a"], name="add3"),
            h.make_node("Clip", ["a", "zero", "six"], ["c"], name="relu6"),
            h.make_node("Div", ["c", "six"], ["d" if then_mul else "y"], name="div6"),
        ]
        if then_mul:
            nodes.append(h.make_node("Mul", [v, "d"], ["y"], name="mul"))
        return nodes, [scalar("three", 3.0), scalar("zero", 0.0), scalar("six", 6.0)], "y"

    match = check(matmul_model(paddle), "HardSwish", (), ["Add", "Clip", "Div", "Mul"])
    assert sorted(match.constants) == ["six", "three", "zero"]
    check(matmul_model(lambda v: paddle(v, then_mul=False)), "HardSigmoid", (1.0 / 6, 0.5), ["Add", "Clip", "Div"])


@pytest.mark.parametrize("order", ["x_first", "sigmoid_first"])
def test_silu(order):
    def pattern(v):
        inputs = [v, "s"] if order == "x_first" else ["s", v]
        return [h.make_node("Sigmoid", [v], ["s"], name="sig"), h.make_node("Mul", inputs, ["y"], name="mul")], [], "y"

    check(matmul_model(pattern), "SiLU", (), ["Sigmoid", "Mul"])


def test_gelu_erf_form_as_torchscript_and_as_half_first():
    def torchscript(v):  # Div(sqrt 2) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5), scalars in Constant nodes
        return [
            constant_node("r2", SQRT2), h.make_node("Div", [v, "r2"], ["d"]), h.make_node("Erf", ["d"], ["e"]),
            constant_node("one", 1.0), h.make_node("Add", ["e", "one"], ["a"]), h.make_node("Mul", [v, "a"], ["m"]),
            constant_node("half", 0.5), h.make_node("Mul", ["m", "half"], ["y"]),
        ], [], "y"

    check(matmul_model(torchscript), "Gelu", (), ["Constant", "Div", "Erf", "Constant", "Add", "Mul", "Constant", "Mul"])

    def half_first(v):  # 0.5 * x * (1 + erf(x * 0.7071))
        return [
            h.make_node("Mul", ["half", v], ["hx"]), h.make_node("Mul", [v, "inv"], ["d"]), h.make_node("Erf", ["d"], ["e"]),
            h.make_node("Add", ["one", "e"], ["a"]), h.make_node("Mul", ["hx", "a"], ["y"]),
        ], [scalar("half", 0.5), scalar("inv", 1 / SQRT2), scalar("one", 1.0)], "y"

    check(matmul_model(half_first), "Gelu", (), ["Mul", "Mul", "Erf", "Add", "Mul"])


@pytest.mark.parametrize("cube", ["pow", "mul"])
def test_gelu_tanh_form(cube):
    def pattern(v):
        if cube == "pow":
            nodes = [h.make_node("Pow", [v, "three"], ["c"])]
        else:
            nodes = [h.make_node("Mul", [v, v], ["sq"]), h.make_node("Mul", [v, "sq"], ["c"])]
        nodes += [
            h.make_node("Mul", ["k", "c"], ["kc"]), h.make_node("Add", [v, "kc"], ["inner"]),
            h.make_node("Mul", ["s", "inner"], ["si"]), h.make_node("Tanh", ["si"], ["t"]),
            h.make_node("Add", ["t", "one"], ["a"]), h.make_node("Mul", ["half", "a"], ["ha"]),
            h.make_node("Mul", [v, "ha"], ["y"]),
        ]
        inits = [scalar("three", 3.0), scalar("k", 0.044715), scalar("s", math.sqrt(2 / math.pi)), scalar("one", 1.0), scalar("half", 0.5)]
        return nodes, inits, "y"

    check(matmul_model(pattern), "FastGelu")


def test_com_microsoft_bias_gelu_and_fast_gelu_carry_their_bias():
    def bias_gelu(v):
        node = h.make_node("BiasGelu", [v, "b"], ["y"], name="bg", domain="com.microsoft")
        return [node], [nh.from_array(np.linspace(-1, 1, 24).astype(np.float32), "b")], "y"

    compressed, _ = compress_all(min_elements=256, model=matmul_model(bias_gelu, domains=["com.microsoft"]))
    (match,) = find_activations(compressed)
    assert (match.kind, match.bias, [n.op_type for n in match.nodes]) == ("Gelu", "b", ["BiasGelu"])

    def fast_gelu(v):
        return [h.make_node("FastGelu", [v], ["y"], name="fg", domain="com.microsoft")], [], "y"

    compressed, _ = compress_all(min_elements=256, model=matmul_model(fast_gelu, domains=["com.microsoft"]))
    (match,) = find_activations(compressed)
    assert (match.kind, match.bias) == ("FastGelu", None)


def test_no_match_when_the_product_or_an_inner_value_is_read_elsewhere():
    def relu_and_tap(v):
        return [h.make_node("Relu", [v], ["y"]), h.make_node("Neg", [v], ["z"])], [], "y"

    compressed, _ = compress_all(min_elements=256, model=matmul_model(relu_and_tap, extra_outputs=["z"]))
    assert find_activations(compressed) == []

    def silu_with_visible_sigmoid(v):
        return [h.make_node("Sigmoid", [v], ["s"]), h.make_node("Mul", [v, "s"], ["y"])], [], "y"

    compressed, _ = compress_all(min_elements=256, model=matmul_model(silu_with_visible_sigmoid, extra_outputs=["s"]))
    assert find_activations(compressed) == []


def test_no_match_for_scales_and_non_scalar_constants():
    def scale(v):
        return [h.make_node("Mul", [v, "half"], ["y"])], [scalar("half", 0.5)], "y"

    compressed, _ = compress_all(min_elements=256, model=matmul_model(scale))
    assert find_activations(compressed) == []

    def per_column_sigmoid_gate(v):  # x * sigmoid(x * c) with c per column: not a scalar function
        return [
            h.make_node("Mul", [v, "c"], ["vc"]), h.make_node("Sigmoid", ["vc"], ["s"]), h.make_node("Mul", [v, "s"], ["y"]),
        ], [nh.from_array(np.linspace(0.5, 2, 24).astype(np.float32), "c")], "y"

    compressed, _ = compress_all(min_elements=256, model=matmul_model(per_column_sigmoid_gate))
    assert find_activations(compressed) == []


def test_region_stops_at_the_largest_activation():
    """SiLU followed by a scale: the match is the SiLU, the scale stays."""
    def pattern(v):
        return [
            h.make_node("Sigmoid", [v], ["s"]), h.make_node("Mul", [v, "s"], ["silu"]),
            h.make_node("Mul", ["silu", "two"], ["y"]),
        ], [scalar("two", 2.0)], "y"

    compressed, _ = compress_all(min_elements=256, model=matmul_model(pattern))
    (match,) = find_activations(compressed)
    assert match.kind == "SiLU" and match.output == "silu" and len(match.nodes) == 2


def conv_model(pattern, opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    nodes, inits, out = pattern("c")
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1])] + nodes
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 4, 6, 6])],
        [h.make_tensor_value_info(out, T.FLOAT, ["N", 8, 6, 6])],
        [nh.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w"),
         nh.from_array(rng.standard_normal(8).astype(np.float32), "b")] + inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(("pattern", "kind", "params"), [
    (single("Relu"), "Relu", ()),
    (single("HardSwish"), "HardSwish", ()),
    (single("LeakyRelu", alpha=0.2), "LeakyRelu", (0.2,)),
])
def test_dc_conv_activations(pattern, kind, params):
    compressed, _ = compress_all(conv_model(pattern, opset=14), sparsity=0.0, min_elements=256)
    (match,) = find_activations(compressed)
    assert match.node.op_type == CONV_OP and match.kind == kind and match.params == pytest.approx(params)
