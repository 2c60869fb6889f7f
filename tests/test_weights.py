"""Tests for onnx_dc.graph.weights: finding compressible weights, their kinds and consumers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import graph_builders as gb
from onnx_dc.graph.weights import find_weights, iter_scopes


def _by_name(model: onnx.ModelProto, **kwargs):
    return {w.name: w for w in find_weights(model, **kwargs)}


def test_mlp_kinds_roles_and_biases():
    weights = _by_name(gb.mlp())
    assert set(weights) == {"w1", "b1", "w2", "b2", "w3"}
    assert weights["w1"].kind == "fc"
    assert [c.role for c in weights["w1"].consumers] == ["matmul_b"]
    assert weights["w1"].consumers[0].activation_name == "x"
    assert weights["w2"].kind == "fc" and weights["w2"].consumers[0].role == "gemm_b"
    assert weights["w2"].consumers[0].activation_name == "r1"
    assert weights["w3"].consumers[0].node.name == "fc3"
    # Gemm's C is a bias; an Add operand is an ordinary "other" tensor.
    assert weights["b2"].is_bias and weights["b2"].kind == "other"
    assert not weights["b1"].is_bias and weights["b1"].kind == "other"
    assert weights["w1"].shape == (64, 300) and weights["w1"].dtype == "float32"
    assert weights["w1"].n_elements == 64 * 300 and weights["w1"].size_bytes == 4 * 64 * 300
    np.testing.assert_array_equal(weights["w1"].to_array(), nh.to_array(gb.mlp().graph.initializer[0]))


def test_conv_kernels_including_one_behind_a_transpose():
    weights = _by_name(gb.convnet())
    assert weights["conv1.weight"].kind == "conv"
    assert weights["conv1.weight"].consumers[0].activation_name == "x"
    assert weights["conv1.bias"].is_bias
    # conv2's kernel reaches the Conv through a Transpose: still a conv weight, generic path.
    assert weights["conv2.weight_t"].kind == "conv"
    assert [c.role for c in weights["conv2.weight_t"].consumers] == ["other"]
    assert weights["fc.weight"].kind == "fc"


def test_shared_initializer_is_one_weight_with_every_use():
    weights = _by_name(gb.shared_weight())
    assert set(weights) == {"shared", "square"}
    assert sorted(c.role for c in weights["shared"].consumers) == ["matmul_b", "other"]
    assert [c.node.name for c in weights["square"].consumers] == ["use_square", "use_square_again"]


def test_gather_embedding_is_other():
    weights = _by_name(gb.embedding())
    assert weights["embed.weight"].kind == "other"
    assert weights["embed.weight"].consumers[0].node.op_type == "Gather"
    assert weights["embed.weight"].consumers[0].activation_name is None


def test_if_subgraph_weights_and_outer_scope_references():
    weights = _by_name(gb.if_model())
    assert set(weights) == {"outer.weight", "then.weight", "else.weight"}
    outer = weights["outer.weight"]
    assert outer.scope.path == ()
    assert sorted(c.scope.path for c in outer.consumers) == [("branch/else_branch",), ("branch/then_branch",)]
    assert sorted(c.role for c in outer.consumers) == ["gemm_b", "matmul_b"]
    assert weights["then.weight"].scope.path == ("branch/then_branch",)
    assert weights["then.weight"].source == "initializer"
    assert weights["else.weight"].source == "constant"
    assert weights["else.weight"].constant_node.name == "else_const"
    assert weights["else.weight"].scope.describe() == "branch/else_branch"


def test_constant_node_weights():
    weights = _by_name(gb.constant_weights())
    assert weights["conv.w"].source == "constant" and weights["conv.w"].kind == "conv"
    assert weights["fc.w"].source == "constant" and weights["fc.w"].kind == "fc"
    assert weights["fc.w"].shape == (288, 10)


def test_float16_weights():
    weights = _by_name(gb.float16_mlp())
    assert weights["w1"].dtype == "float16" and weights["w1"].size_bytes == 2 * 32 * 64
    assert weights["w1"].kind == "fc"


def test_lstm_weights_through_slice_and_concat_and_int_tensors_skipped():
    weights = _by_name(gb.lstm())
    assert set(weights) == {"lstm.W_part", "lstm.W_rest", "lstm.R", "lstm.B"}  # int64 starts/ends skipped
    assert all(w.kind == "other" for w in weights.values())
    assert weights["lstm.R"].consumers[0].node.op_type == "LSTM"
    assert weights["lstm.W_part"].consumers[0].node.op_type == "Slice"


def test_scan_body_weights():
    weights = _by_name(gb.scan_model())
    assert weights["outer.w"].consumers[0].scope.path == ("scan/body",)
    assert weights["body.w"].scope.path == ("scan/body",)


def test_min_elements_filters_small_tensors():
    weights = _by_name(gb.mlp(), min_elements=1000)
    assert set(weights) == {"w1", "w2", "w3"}


def test_unused_and_graph_output_weights():
    w = nh.from_array(np.ones((4, 4), np.float32), "w")
    unused = nh.from_array(np.ones((4, 4), np.float32), "unused")
    graph = h.make_graph(
        [h.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [h.make_tensor_value_info("x", T.FLOAT, [1, 4])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, 4]), h.make_tensor_value_info("w", T.FLOAT, [4, 4])],
        [w, unused],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    weights = _by_name(model)
    assert set(weights) == {"w"}
    assert sorted(c.role for c in weights["w"].consumers) == ["graph_output", "matmul_b"]


def test_inner_definition_shadows_outer_weight():
    """A subgraph input with the same name as an outer weight is not that weight."""
    outer = nh.from_array(np.ones((4, 4), np.float32), "w")
    body = h.make_graph(
        [h.make_node("MatMul", ["x_t", "w"], ["y_t"]), h.make_node("Identity", ["s"], ["s_out"])],
        "body",
        [h.make_tensor_value_info("s", T.FLOAT, [1, 4]), h.make_tensor_value_info("x_t", T.FLOAT, [1, 4])],
        [h.make_tensor_value_info("s_out", T.FLOAT, [1, 4]), h.make_tensor_value_info("y_t", T.FLOAT, [1, 4])],
    )
    # Rename the body's local operand to "w" by giving the body its own initializer "w".
    body.initializer.append(nh.from_array(np.zeros((4, 4), np.float32), "w"))
    graph = h.make_graph(
        [h.make_node("MatMul", ["x", "w"], ["a"]), h.make_node("Scan", ["s0", "xs"], ["sf", "ys"], body=body, num_scan_inputs=1)],
        "g",
        [h.make_tensor_value_info(n, T.FLOAT, s) for n, s in (("x", [1, 4]), ("s0", [1, 4]), ("xs", [2, 1, 4]))],
        [h.make_tensor_value_info("a", T.FLOAT, [1, 4]), h.make_tensor_value_info("ys", T.FLOAT, [2, 1, 4])],
        [outer],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    weights = find_weights(model)
    assert len(weights) == 2
    main_w = next(w for w in weights if w.scope.path == ())
    body_w = next(w for w in weights if w.scope.path != ())
    assert [c.scope.path for c in main_w.consumers] == [()]
    assert [c.scope.path for c in body_w.consumers] == [("Scan#1/body",)]


def test_iter_scopes_lists_every_graph():
    paths = [s.path for s in iter_scopes(gb.if_model())]
    assert sorted(paths) == [(), ("branch/else_branch",), ("branch/then_branch",)]


@pytest.mark.parametrize("name", sorted(gb.ALL_BUILDERS))
def test_every_builder_has_weights_with_consumers(name):
    weights = find_weights(gb.ALL_BUILDERS[name]())
    assert weights and all(w.consumers for w in weights)


def _position_table_model() -> onnx.ModelProto:
    """A ViT-style position table (1 x 64 x 8) reshaped to 8 x 8, transposed to NCHW and resized (cubic,
    antialiased) to the input's 4 x 4 grid, added to the patch features; and a MatMul weight."""
    rng = np.random.default_rng(0)
    table = nh.from_array(rng.standard_normal((1, 64, 8)).astype(np.float32), "pos_table")
    w = nh.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    grid = nh.from_array(np.array([1, 8, 8, 8], np.int64), "grid")
    sizes = nh.from_array(np.array([1, 8, 4, 4], np.int64), "sizes")
    flat = nh.from_array(np.array([1, 8, 16], np.int64), "flat")
    nodes = [
        h.make_node("Reshape", ["pos_table", "grid"], ["pos_grid"]),
        h.make_node("Transpose", ["pos_grid"], ["pos_nchw"], perm=[0, 3, 1, 2]),
        h.make_node("Resize", ["pos_nchw", "", "", "sizes"], ["pos_small"], mode="cubic", antialias=1),
        h.make_node("Reshape", ["pos_small", "flat"], ["pos_tokens_t"]),
        h.make_node("Transpose", ["pos_tokens_t"], ["pos_tokens"], perm=[0, 2, 1]),
        h.make_node("Add", ["x", "pos_tokens"], ["xp"]),
        h.make_node("MatMul", ["xp", "w"], ["y"]),
    ]
    graph = h.make_graph(nodes, "vit_pos", [h.make_tensor_value_info("x", T.FLOAT, [1, 16, 8])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, 16, 8])], [table, w, grid, sizes, flat])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


def test_a_table_read_by_a_resize_is_marked_and_left_dense():
    import onnxruntime as ort

    import onnx_dc
    from onnx_dc.api.recipe import Recipe

    model = _position_table_model()
    weights = _by_name(model)
    assert weights["pos_table"].feeds_resize and not weights["w"].feeds_resize
    result = onnx_dc.compress(model, recipe=Recipe(min_elements=1, sparsity="fc=0", bits="fc=8"))
    assert any("read by a Resize" in note for note in result.report.notes)
    kept = {t.name for t in result.model.graph.initializer}
    assert "pos_table" in kept  # dense; w is compressed
    options = ort.SessionOptions()
    options.register_custom_ops_library(onnx_dc.ops_library_path())
    x = np.random.default_rng(1).standard_normal((1, 16, 8)).astype(np.float32)
    got = ort.InferenceSession(result.model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
