"""Calibration beyond main-graph MatMul/Gemm/Conv: If branches with Constant weights, LSTM, ConvTranspose, Gather.

Each small model is compressed with calibration data and with an automatic search; the weights
in the branch the data take get statistics, the others a stated proxy or a stated reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_dc
from onnx_dc.api.recipe import Recipe, SearchRecipe
from onnx_dc.calibration.data import load_calibration
from onnx_dc.calibration.layers import find_layers
from onnx_dc.calibration.proxies import find_proxy_weights
from onnx_dc.calibration.subgraphs import calibration_view

_SEARCH = SearchRecipe(min_cosine=0.99, sparsities=(0.0, 0.5), bits=(4, 6))


def _constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value.astype(np.float32), name))


def _branch(tag: str, rng: np.random.Generator) -> onnx.GraphProto:
    """``x [N, 1, 8, 8]`` -> Conv (16 x 1 x 4 x 4) -> Relu -> flatten -> MatMul (400 x 3), weights in Constant nodes."""
    nodes = [
        _constant(f"{tag}.conv", rng.standard_normal((16, 1, 4, 4)) * 0.3),
        _constant(f"{tag}.conv_bias", rng.standard_normal(16) * 0.1),
        _constant(f"{tag}.fc", rng.standard_normal((400, 3)) * 0.05),
        _constant(f"{tag}.shape", np.array([0, 400], dtype=np.float32)),
        helper.make_node("Cast", [f"{tag}.shape"], [f"{tag}.shape_i"], to=TensorProto.INT64),
        helper.make_node("Conv", ["x", f"{tag}.conv", f"{tag}.conv_bias"], [f"{tag}.c"]),
        helper.make_node("Relu", [f"{tag}.c"], [f"{tag}.r"]),
        helper.make_node("Reshape", [f"{tag}.r", f"{tag}.shape_i"], [f"{tag}.flat"]),
        helper.make_node("MatMul", [f"{tag}.flat", f"{tag}.fc"], [f"{tag}.y"]),
    ]
    return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}.y", TensorProto.FLOAT, None)])


def if_model() -> onnx.ModelProto:
    """Silero-like: ``If (mode == 1)`` chooses between two Conv + MatMul branches whose weights are Constant nodes."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1, dtype=np.int64), "one")),
        helper.make_node("Equal", ["mode", "one"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], name="select", then_branch=_branch("hi", rng), else_branch=_branch("lo", rng)),
    ]
    graph = helper.make_graph(
        nodes, "if_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8]),
         helper.make_tensor_value_info("mode", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def if_data(n: int, seed: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)
    return {"x": x, "mode": np.ones(n, dtype=np.int64)}


def lstm_model() -> onnx.ModelProto:
    """``x [5, 1, 4]`` -> LSTM (hidden 32; W, R initializers) -> Y_h [1, 1, 32] -> MatMul (32 x 8)."""
    rng = np.random.default_rng(1)
    hidden = 32
    inits = [
        numpy_helper.from_array((rng.standard_normal((1, 4 * hidden, 4)) * 0.4).astype(np.float32), "lstm.W"),
        numpy_helper.from_array((rng.standard_normal((1, 4 * hidden, hidden)) * 0.2).astype(np.float32), "lstm.R"),
        numpy_helper.from_array((rng.standard_normal((hidden, 8)) * 0.3).astype(np.float32), "head"),
        numpy_helper.from_array(np.array([1, hidden], dtype=np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("LSTM", ["x", "lstm.W", "lstm.R"], ["", "h"], hidden_size=hidden),
        helper.make_node("Reshape", ["h", "flat"], ["h2"]),
        helper.make_node("MatMul", ["h2", "head"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "lstm_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def conv_transpose_and_gather_model() -> onnx.ModelProto:
    """``ids [N, 8]`` -> Gather (embedding 32 x 16) -> ``[N, 8, 4, 4]`` -> ConvTranspose (8 x 8 x 3 x 3) -> MaxPool
    -> MatMul (72 x 4)."""
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array((rng.standard_normal((32, 16)) * 0.5).astype(np.float32), "embedding"),
        numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32), "deconv"),
        numpy_helper.from_array((rng.standard_normal((72, 4)) * 0.2).astype(np.float32), "head"),
        numpy_helper.from_array(np.array([0, 8, 4, 4], dtype=np.int64), "grid"),
        numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "ids"], ["e"]),  # [N, 8, 16]
        helper.make_node("Transpose", ["e"], ["et"], perm=[0, 2, 1]),  # [N, 16, 8]
        helper.make_node("Reshape", ["et", "grid"], ["g"]),  # [N, 8, 4, 4]
        helper.make_node("ConvTranspose", ["g", "deconv"], ["d"]),  # [N, 8, 6, 6]
        helper.make_node("MaxPool", ["d"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),  # [N, 8, 3, 3]
        helper.make_node("Reshape", ["p", "flat"], ["f"]),  # [N, 72]
        helper.make_node("MatMul", ["f", "head"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "deconv_model", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        from onnx_dc.graph.library import ops_library_path

        options.register_custom_ops_library(str(ops_library_path()))
    except Exception:  # noqa: BLE001 - without the library only standard models run
        pass
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]


# ---------------------------------------------------------------------------


def test_view_inlines_the_taken_branch_and_names_the_other():
    model = if_model()
    data = load_calibration(if_data(16, 0), model, max_samples=None)
    view = calibration_view(model, data)
    assert view.inlined == {"select": "then_branch"}
    layers = {layer.weight: layer for layer in find_layers(view.model)}
    assert set(layers) == {"hi.conv", "hi.fc"}
    assert layers["hi.conv"].bias == "hi.conv_bias"
    assert "lo.conv" in view.uncalibrated and "never take" in view.uncalibrated["lo.conv"]
    assert "hi.conv" not in view.uncalibrated
    feed = {"x": if_data(4, 1)["x"], "mode": np.array(1, dtype=np.int64)}
    np.testing.assert_allclose(_run(view.model, feed), _run(model, feed), rtol=1e-6, atol=1e-6)


def test_view_keeps_an_if_whose_condition_changes():
    model = if_model()
    arrays = if_data(8, 0)
    arrays["mode"][::2] = 0
    view = calibration_view(model, load_calibration(arrays, model, max_samples=None))
    assert view.inlined == {}
    assert "both branches" in view.kept_subgraphs["select"]
    # Both branches' weights are lifted to the main graph: they can be swapped (proxy) but have no statistics.
    names = {t.name for t in view.model.graph.initializer}
    assert {"hi.conv", "lo.fc"} <= names
    assert find_layers(view.model) == []
    assert {p.weight for p in find_proxy_weights(view.model, [], names)} >= {"hi.conv", "hi.fc", "lo.conv", "lo.fc"}


def test_if_branch_weights_are_fitted_and_the_model_keeps_both_branches(tmp_path):
    model = if_model()
    result = onnx_dc.compress(model, tmp_path / "out.onnx", Recipe(), calib=if_data(64, 0))
    results = result.calibration.results
    assert results["hi.conv"].calibrated and results["hi.fc"].calibrated
    assert "lo.conv" not in results
    assert any(note.startswith("lo.fc: not calibrated") for note in result.report.notes)
    compressed = onnx.load(str(tmp_path / "out.onnx"))
    assert compressed.graph.node[-1].op_type == "If"
    for mode in (1, 0):
        feed = {"x": if_data(4, 3)["x"], "mode": np.array(mode, dtype=np.int64)}
        reference, output = _run(model, feed), _run(compressed, feed)
        assert np.sum((output - reference) ** 2) / np.sum(reference**2) < 0.05


def test_if_branch_weights_are_searched(tmp_path):
    model = if_model()
    result = onnx_dc.compress(model, tmp_path / "out.onnx", Recipe(search=_SEARCH), calib=if_data(80, 0))
    tuned = result.calibration
    assert {c.name for c in tuned.choices} == {"hi.conv", "hi.fc"}
    assert tuned.budget_met


def test_lstm_weights_are_searched_by_proxy(tmp_path):
    model = lstm_model()
    x = np.random.default_rng(0).standard_normal((60, 5, 1, 4)).astype(np.float32)
    result = onnx_dc.compress(model, tmp_path / "out.onnx", Recipe(search=_SEARCH), calib={"x": x})
    tuned = result.calibration
    assert {c.name for c in tuned.choices} == {"head", "lstm.W", "lstm.R"}
    assert any("lstm.R: searched by the model's output error: LSTM weight" in n for n in result.report.notes)
    assert tuned.budget_met


def test_conv_transpose_and_gather_are_searched_by_proxy(tmp_path):
    model = conv_transpose_and_gather_model()
    proxies = {p.weight: p for p in find_proxy_weights(model, find_layers(model), ["embedding", "deconv", "head"])}
    assert proxies["deconv"].op == "ConvTranspose" and proxies["deconv"].is_convolution
    assert proxies["embedding"].op == "Gather" and "embedding" in proxies["embedding"].reason
    ids = np.random.default_rng(0).integers(0, 32, (80, 8)).astype(np.int64)
    result = onnx_dc.compress(model, tmp_path / "out.onnx", Recipe(search=_SEARCH), calib={"ids": ids})
    tuned = result.calibration
    assert {c.name for c in tuned.choices} == {"embedding", "deconv", "head"}
    assert tuned.budget_met


def test_proxy_only_model_is_searched(tmp_path):
    """No layer with statistics at all (only an LSTM): the search runs on the proxies."""
    model = lstm_model()
    graph = model.graph
    head = next(t for t in graph.initializer if t.name == "head")
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head)[:, :1].copy(), "head"))  # 32 elements: left dense
    graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1
    x = np.random.default_rng(0).standard_normal((40, 5, 1, 4)).astype(np.float32)
    result = onnx_dc.compress(model, tmp_path / "out.onnx", Recipe(search=_SEARCH), calib={"x": x})
    assert {c.name for c in result.calibration.choices} == {"lstm.W", "lstm.R"}


@pytest.mark.parametrize("builder", [lstm_model, conv_transpose_and_gather_model])
def test_models_without_subgraphs_are_their_own_view(builder):
    model = builder()
    name = model.graph.input[0].name
    shape = (4, 5, 1, 4) if name == "x" else (4, 8)
    arrays = {name: np.zeros(shape, dtype=np.float32 if name == "x" else np.int64)}
    view = calibration_view(model, load_calibration(arrays, model, max_samples=None))
    assert view.model is model and view.uncalibrated == {}


def loop_model() -> onnx.ModelProto:
    """``x [N, 16]`` -> Loop (3 iterations of ``h = Relu(h @ W)``, W a Constant node of the body) -> MatMul (16 x 16)."""
    rng = np.random.default_rng(3)
    body = helper.make_graph(
        [
            _constant("loop.W", rng.standard_normal((16, 16)) * 0.3),
            helper.make_node("MatMul", ["h_in", "loop.W"], ["h_mm"]),
            helper.make_node("Relu", ["h_mm"], ["h_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, None)],
    )
    inits = [
        numpy_helper.from_array(np.array(3, dtype=np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "go"),
        numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "head"),
    ]
    nodes = [
        helper.make_node("Loop", ["trips", "go", "x"], ["h"], body=body),
        helper.make_node("MatMul", ["h", "head"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "loop_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_loop_body_weight_is_lifted_and_searched_by_proxy(tmp_path):
    model = loop_model()
    x = np.random.default_rng(0).standard_normal((80, 16)).astype(np.float32)
    view = calibration_view(model, load_calibration({"x": x}, model, max_samples=None))
    assert "Loop body" in next(iter(view.kept_subgraphs.values()))
    (proxy,) = find_proxy_weights(view.model, find_layers(view.model), ["loop.W", "head"])
    assert proxy.weight == "loop.W" and "Loop body" in proxy.reason
    result = onnx_dc.compress(model, tmp_path / "out.onnx", Recipe(search=_SEARCH), calib={"x": x})
    assert {c.name for c in result.calibration.choices} == {"loop.W", "head"}
    compressed = onnx.load(str(tmp_path / "out.onnx"))
    assert [n.op_type for n in compressed.graph.node].count("Loop") == 1
    reference, output = _run(model, {"x": x[:8]}), _run(compressed, {"x": x[:8]})
    assert np.sum((output - reference) ** 2) / np.sum(reference**2) < 0.05


def test_shared_weight_is_searched_by_proxy():
    model = lstm_model()
    graph = model.graph
    graph.node.append(helper.make_node("MatMul", ["y", "head2"], ["z"]))
    graph.initializer.append(numpy_helper.from_array(np.zeros((8, 8), np.float32), "head2"))
    graph.node.append(helper.make_node("MatMul", ["z", "head2"], ["z2"]))
    proxies = {p.weight: p for p in find_proxy_weights(model, find_layers(model), ["head2"])}
    assert "shared by 2 nodes" in proxies["head2"].reason
