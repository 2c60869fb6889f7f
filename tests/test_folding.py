"""Folding BatchNormalization and per-channel Mul/Add into the layer before them (onnx_dc/graph/folding.py).

Every fold is checked against the original model run by onnxruntime, with
random BatchNormalization statistics and a non-default epsilon.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graph_builders import ops_library  # noqa: F401  (fixture)
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnx_dc.api.convert import compress_model
from onnx_dc.api.recipe import Recipe
from onnx_dc.graph.folding import fold_normalizations
from onnx_dc.graph.restore import decompress_model


def run(model: onnx.ModelProto, feeds, library: str | None = None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no folding by onnxruntime
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def folded_copy(model: onnx.ModelProto):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    summary = fold_normalizations(out)
    onnx.checker.check_model(out, full_check=True)
    return out, summary


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds) -> None:
    for got, want in zip(run(b, feeds), run(a, feeds)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(np.abs(want).max()))


def _w(rng, name, *shape, scale=0.3):
    return nh.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _bn_params(rng, prefix: str, channels: int) -> list[onnx.TensorProto]:
    return [
        nh.from_array((1 + 0.5 * rng.standard_normal(channels)).astype(np.float32), f"{prefix}.scale"),
        nh.from_array(rng.standard_normal(channels).astype(np.float32), f"{prefix}.B"),
        nh.from_array(rng.standard_normal(channels).astype(np.float32), f"{prefix}.mean"),
        nh.from_array(rng.uniform(0.05, 3.0, channels).astype(np.float32), f"{prefix}.var"),
    ]


def _bn(prefix: str, x: str, y: str, **attrs) -> onnx.NodeProto:
    return h.make_node(
        "BatchNormalization", [x, f"{prefix}.scale", f"{prefix}.B", f"{prefix}.mean", f"{prefix}.var"], [y],
        name=prefix, **attrs,
    )


def _model(nodes, inits, x_shape, y_shape, *, y_name="y", opset=17, extra_outputs=()) -> onnx.ModelProto:
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, x_shape)],
        [h.make_tensor_value_info(y_name, T.FLOAT, y_shape)] + [h.make_tensor_value_info(n, T.FLOAT, x_shape) for n in extra_outputs],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_bn(*, bias: bool = True, epsilon: float = 1e-3) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inputs = ["x", "conv.weight"] + (["conv.bias"] if bias else [])
    nodes = [
        h.make_node("Conv", inputs, ["c"], name="conv", pads=[1, 1, 1, 1]),  # 288 weights: compressed
        _bn("bn", "c", "b", epsilon=epsilon),
        h.make_node("Relu", ["b"], ["y"], name="relu"),
    ]
    inits = [_w(rng, "conv.weight", 8, 4, 3, 3)] + ([_w(rng, "conv.bias", 8)] if bias else []) + _bn_params(rng, "bn", 8)
    return _model(nodes, inits, ["N", 4, 6, 6], ["N", 8, 6, 6])


def feeds_for(model: onnx.ModelProto, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    vi = model.graph.input[0]
    shape = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
    return {vi.name: rng.standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("epsilon", [1e-5, 1e-3, 0.5])
def test_conv_batch_norm_folds_into_weight_and_bias(bias, epsilon):
    model = conv_bn(bias=bias, epsilon=epsilon)
    folded, summary = folded_copy(model)
    assert ops(folded) == ["Conv", "Relu"]
    conv = folded.graph.node[0]
    assert list(conv.input) == ["x", "conv.weight", "conv.bias"] and list(conv.output) == ["b"]
    assert [t.name for t in folded.graph.initializer] == ["conv.weight", "conv.bias"]  # BN parameters dropped
    assert [f.describe() for f in summary.folds] == [
        "folded BatchNormalization 'bn' into Conv 'conv' (weight 'conv.weight', bias 'conv.bias')"
    ]
    assert summary.skipped == []
    assert_same_outputs(model, folded, feeds_for(model))


def test_conv_bn_mul_add_chain_becomes_one_conv():
    rng = np.random.default_rng(1)
    nodes = [
        h.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        _bn("bn", "c", "b", epsilon=1e-4),
        h.make_node("Mul", ["b", "scale"], ["m"], name="mul"),
        h.make_node("Add", ["shift", "m"], ["y"], name="add"),
    ]
    inits = [_w(rng, "w", 6, 4, 3, 3)] + _bn_params(rng, "bn", 6) + [
        nh.from_array(rng.standard_normal((1, 6, 1, 1)).astype(np.float32), "scale"),
        nh.from_array(rng.standard_normal((6, 1, 1)).astype(np.float32), "shift"),
    ]
    model = _model(nodes, inits, ["N", 4, 7, 7], ["N", 6, 5, 5])
    folded, summary = folded_copy(model)
    assert ops(folded) == ["Conv"] and list(folded.graph.node[0].output) == ["y"]
    assert [f.absorbed for f in summary.folds] == ["BatchNormalization 'bn'", "Mul 'mul'", "Add 'add'"]
    assert [t.name for t in folded.graph.initializer] == ["w", "w_bias"]  # a new bias after its weight
    assert_same_outputs(model, folded, feeds_for(model))


def test_scalar_mul_after_conv_folds():
    rng = np.random.default_rng(2)
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"), h.make_node("Mul", ["c", "s"], ["y"], name="mul")]
    inits = [_w(rng, "w", 4, 2, 1, 1), _w(rng, "b", 4), nh.from_array(np.array(0.25, np.float32), "s")]
    model = _model(nodes, inits, ["N", 2, 3, 3], ["N", 4, 3, 3])
    folded, _ = folded_copy(model)
    assert ops(folded) == ["Conv"]
    assert_same_outputs(model, folded, feeds_for(model))


def test_non_per_channel_mul_and_non_constant_mul_stay():
    rng = np.random.default_rng(3)
    nodes = [
        h.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        h.make_node("Mul", ["c", "s"], ["m"], name="spatial_mul"),  # [1, 1, 3, 3]: per pixel, not per channel
        h.make_node("Conv", ["m", "w2"], ["c2"], name="conv2"),
        h.make_node("Mul", ["c2", "x2"], ["y"], name="gate"),  # a computed operand
    ]
    inits = [_w(rng, "w", 2, 2, 1, 1), _w(rng, "w2", 2, 2, 1, 1), _w(rng, "s", 1, 1, 3, 3)]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 2, 3, 3]), h.make_tensor_value_info("x2", T.FLOAT, [1, 2, 3, 3])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, 2, 3, 3])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    folded, summary = folded_copy(model)
    assert ops(folded) == ops(model) and summary.folds == [] and summary.skipped == []


def test_conv_transpose_grouped_batch_norm():
    rng = np.random.default_rng(4)
    nodes = [
        h.make_node("ConvTranspose", ["x", "w", "bias"], ["c"], name="up", group=2, strides=[2, 2]),
        _bn("bn", "c", "y", epsilon=1e-2),
    ]
    inits = [_w(rng, "w", 4, 3, 2, 2), _w(rng, "bias", 6)] + _bn_params(rng, "bn", 6)
    model = _model(nodes, inits, ["N", 4, 3, 3], ["N", 6, 6, 6])
    folded, summary = folded_copy(model)
    assert ops(folded) == ["ConvTranspose"] and len(summary.folds) == 1
    assert_same_outputs(model, folded, feeds_for(model))


@pytest.mark.parametrize(("trans_b", "with_c", "beta"), [(1, True, 1.0), (0, False, 1.0), (1, True, 0.5), (0, True, 2.0)])
def test_gemm_batch_norm(trans_b, with_c, beta):
    rng = np.random.default_rng(6)
    inputs = ["x", "w"] + (["c"] if with_c else [])
    nodes = [h.make_node("Gemm", inputs, ["g"], name="fc", transB=trans_b, beta=beta, alpha=0.7), _bn("bn", "g", "y")]
    inits = [_w(rng, "w", *((5, 8) if trans_b else (8, 5)))] + ([_w(rng, "c", 1, 5)] if with_c else []) + _bn_params(rng, "bn", 5)
    model = _model(nodes, inits, ["N", 8], ["N", 5])
    folded, summary = folded_copy(model)
    assert ops(folded) == ["Gemm"] and len(summary.folds) == 1
    assert_same_outputs(model, folded, feeds_for(model, batch=4))


def test_matmul_bias_add_batch_norm_and_bias_less_matmul():
    rng = np.random.default_rng(7)
    nodes = [
        h.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"),
        h.make_node("Add", ["b1", "a"], ["ab"], name="fc1_bias"),
        _bn("bn1", "ab", "r"),
        h.make_node("MatMul", ["r", "w2"], ["m2"], name="fc2"),
        _bn("bn2", "m2", "y", epsilon=1e-3),
    ]
    inits = [_w(rng, "w1", 8, 6), _w(rng, "b1", 6), _w(rng, "w2", 6, 4)] + _bn_params(rng, "bn1", 6) + _bn_params(rng, "bn2", 4)
    model = _model(nodes, inits, ["N", 8], ["N", 4])
    folded, summary = folded_copy(model)
    # bn1 into fc1's weight and bias Add; bn2 into fc2's weight, its shift left as an Add (fused into DCMatMul later)
    assert ops(folded) == ["MatMul", "Add", "MatMul", "Add"]
    assert [f.absorbed for f in summary.folds] == ["BatchNormalization 'bn1'", "BatchNormalization 'bn2'"]
    assert folded.graph.node[3].name == "bn2" and list(folded.graph.node[3].output) == ["y"]
    assert_same_outputs(model, folded, feeds_for(model, batch=3))


def test_batch_norm_over_tokens_is_not_folded():
    """A MatMul output [N, T, C]: BatchNormalization normalises axis 1 (T), not the MatMul's columns."""
    rng = np.random.default_rng(8)
    nodes = [h.make_node("MatMul", ["x", "w"], ["m"], name="fc"), _bn("bn", "m", "y")]
    model = _model(nodes, [_w(rng, "w", 6, 5)] + _bn_params(rng, "bn", 3), ["N", 3, 6], ["N", 3, 5])
    folded, summary = folded_copy(model)
    assert ops(folded) == ["MatMul", "BatchNormalization"]
    assert [s.describe() for s in summary.skipped] == [(
        "BatchNormalization 'bn' after MatMul 'fc' not folded: its channels are axis 1 of the MatMul 'fc' output, "
        "not its last axis (rank 3)"
    )]


def _two_convs(*, share_weight=False, share_bias=False, extra_reader=False, training=False) -> onnx.ModelProto:
    rng = np.random.default_rng(9)
    w2 = "w1" if share_weight else "w2"
    b2 = "b1" if share_bias else "b2"
    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
        _bn("bn1", "c1", "n1"),
        h.make_node("Conv", ["n1", w2, b2], ["c2"], name="conv2"),
        _bn("bn2", "c2", "y"),
    ]
    outputs = []
    if training:
        nodes[1] = h.make_node("BatchNormalization", list(nodes[1].input), ["n1", "rm", "rv"], name="bn1", training_mode=1)
    if extra_reader:
        nodes.append(h.make_node("Neg", ["c1"], ["z"], name="neg"))
        outputs.append("z")
    inits = [_w(rng, "w1", 3, 3, 1, 1), _w(rng, "b1", 3), _w(rng, "w2", 3, 3, 1, 1), _w(rng, "b2", 3)]
    inits += _bn_params(rng, "bn1", 3) + _bn_params(rng, "bn2", 3)
    return _model(nodes, inits, ["N", 3, 4, 4], ["N", 3, 4, 4], opset=15 if training else 17, extra_outputs=outputs)


def test_shared_weight_is_not_folded():
    model = _two_convs(share_weight=True)
    folded, summary = folded_copy(model)
    assert ops(folded) == ops(model) and summary.folds == []
    reason = "its weight 'w1' is also used elsewhere (folding would change the other use)"
    assert [s.describe() for s in summary.skipped] == [
        f"BatchNormalization 'bn1' after Conv 'conv1' not folded: {reason}",
        f"BatchNormalization 'bn2' after Conv 'conv2' not folded: {reason}",
    ]


def test_shared_bias_gets_a_new_tensor():
    model = _two_convs(share_bias=True)
    folded, summary = folded_copy(model)
    assert ops(folded) == ["Conv", "Conv"]
    biases = [f.bias for f in summary.folds]
    assert biases == ["w1_bias", "w2_bias"]  # neither fold may change the shared b1; it is dropped once unused
    assert "b1" not in {t.name for t in folded.graph.initializer}
    assert_same_outputs(model, folded, feeds_for(model))


def test_layer_output_read_elsewhere_is_not_folded():
    model = _two_convs(extra_reader=True)
    folded, summary = folded_copy(model)
    assert ops(folded) == ["Conv", "BatchNormalization", "Conv", "Neg"]
    assert [s.node for s in summary.skipped] == ["BatchNormalization 'bn1'"]
    assert "also read elsewhere" in summary.skipped[0].reason
    assert_same_outputs(model, folded, feeds_for(model))


def test_training_mode_batch_norm_is_not_folded():
    model = _two_convs(training=True)
    folded, summary = folded_copy(model)
    assert "BatchNormalization" in ops(folded)
    assert [s.reason for s in summary.skipped] == ["not in inference form (training_mode or spatial=0)"]


def test_shared_batch_norm_parameters_fold_into_both():
    rng = np.random.default_rng(10)
    nodes = [
        h.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        _bn("bn", "c1", "n1"),
        h.make_node("Conv", ["n1", "w2"], ["c2"], name="conv2"),
        h.make_node("BatchNormalization", ["c2", "bn.scale", "bn.B", "bn.mean", "bn.var"], ["y"], name="bn_again"),
    ]
    inits = [_w(rng, "w1", 3, 3, 1, 1), _w(rng, "w2", 3, 3, 1, 1)] + _bn_params(rng, "bn", 3)
    model = _model(nodes, inits, ["N", 3, 4, 4], ["N", 3, 4, 4])
    folded, summary = folded_copy(model)
    assert ops(folded) == ["Conv", "Conv"] and len(summary.folds) == 2
    assert sorted(t.name for t in folded.graph.initializer) == ["w1", "w1_bias", "w2", "w2_bias"]
    assert_same_outputs(model, folded, feeds_for(model))


def test_constant_node_weights_fold():
    rng = np.random.default_rng(11)
    nodes = [
        h.make_node("Constant", [], ["w"], name="cw", value=_w(rng, "v", 4, 2, 3, 3)),
        h.make_node("Constant", [], ["bn.scale"], value=nh.from_array(rng.uniform(0.5, 2, 4).astype(np.float32))),
        h.make_node("Constant", [], ["bn.B"], value=nh.from_array(rng.standard_normal(4).astype(np.float32))),
        h.make_node("Constant", [], ["bn.mean"], value=nh.from_array(rng.standard_normal(4).astype(np.float32))),
        h.make_node("Constant", [], ["bn.var"], value=nh.from_array(rng.uniform(0.5, 2, 4).astype(np.float32))),
        h.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        _bn("bn", "c", "y"),
    ]
    model = _model(nodes, [], ["N", 2, 5, 5], ["N", 4, 3, 3])
    folded, _ = folded_copy(model)
    assert ops(folded) == ["Constant", "Conv"]
    assert_same_outputs(model, folded, feeds_for(model))


def test_compress_folds_first_and_reports_it(ops_library):
    model = conv_bn(epsilon=1e-3)
    # 6-bit codes: an 8-bit container (a 256-entry codebook) would not be smaller than these 288 weights
    result = compress_model(model, Recipe.build(None, sparsity=0.0, bits=6))
    compressed = result.model
    assert [n.op_type for n in compressed.graph.node] == ["DCConv", "Relu"]
    assert any(note.startswith("folded BatchNormalization 'bn' into Conv 'conv'") for note in result.report.notes)
    assert "folded BatchNormalization" in result.report.format_table()
    feeds = feeds_for(model)
    (want,) = run(model, feeds)
    (got,) = run(compressed, feeds, ops_library)
    plain = onnx.ModelProto()
    plain.CopyFrom(compressed)
    decompress_model(plain)
    assert ops(plain) == ["Conv", "Relu"]  # the folded model, in standard ONNX
    (again,) = run(plain, feeds)
    np.testing.assert_allclose(got, again, rtol=1e-4, atol=1e-4)
    cosine = float(np.dot(got.ravel(), want.ravel()) / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine >= 0.998  # 6-bit shared weights
