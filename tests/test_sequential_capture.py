"""Tests of onnx_dc.calibration.sequential_capture: sequential statistics from cached values."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_dc.calibration import sequential_capture
from onnx_dc.calibration.capture import capture_statistics
from onnx_dc.calibration.data import load_calibration
from onnx_dc.calibration.layers import find_layers
from onnx_dc.calibration.model_fit import compress_with_calibration, set_initializer
from onnx_dc.calibration.options import CalibrationOptions, LayerSettings
from onnx_dc.calibration.sequential_capture import SequentialCapture

RNG = np.random.default_rng(0)


def residual_cnn() -> onnx.ModelProto:
    """conv1 -> relu -> conv2 (+ skip from relu) -> relu -> conv3 -> flatten -> fc: a skip connection and a chain."""
    def weight(name, *shape):
        return numpy_helper.from_array((RNG.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    inits = [weight("w1", 4, 3, 3, 3), weight("w2", 4, 4, 3, 3), weight("w3", 2, 4, 1, 1), weight("fc", 2 * 6 * 6, 5),
             numpy_helper.from_array(np.zeros(4, np.float32), "b1"), numpy_helper.from_array(np.zeros(4, np.float32), "b2")]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"]),
        helper.make_node("Relu", ["s"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3"], ["c3"]),
        helper.make_node("Flatten", ["c3"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(model, n=10):
    return load_calibration({"x": RNG.standard_normal((n, 3, 6, 6)).astype(np.float32)}, model)


def test_statistics_equal_a_fresh_capture_as_the_layers_change():
    model = residual_cnn()
    working = onnx.ModelProto()
    working.CopyFrom(model)
    data = _data(model)
    layers = find_layers(model)
    assert [layer.weight for layer in layers] == ["w1", "w2", "w3", "fc"]
    cached = SequentialCapture(model, data, layers, batch_size=4, max_memory_bytes=1 << 30)
    for layer in layers:
        fresh = capture_statistics(working, data, [layer], reference=model, batch_size=4)[layer.weight]
        got = cached.capture(working, layer, with_reference=True)
        assert got is not None and got.n_samples == fresh.n_samples == 10 and got.n_rows == fresh.n_rows
        # the same sums over the same rows; onnxruntime may lay the cut graph's convolutions out differently (NCHWc)
        np.testing.assert_allclose(got.gram[0], fresh.gram[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got.cross[0], fresh.cross[0], rtol=1e-6, atol=1e-6)
        changed = numpy_helper.to_array(next(t for t in working.graph.initializer if t.name == layer.weight)) * 0.5
        set_initializer(working, layer.weight, changed)
        cached.changed([layer.weight])


def test_later_layers_run_only_the_nodes_after_the_cached_values(monkeypatch):
    model = residual_cnn()
    layers = find_layers(model)
    built = []
    original = sequential_capture._submodel
    monkeypatch.setattr(sequential_capture, "_submodel", lambda *a: built.append(original(*a)) or built[-1])
    cached = SequentialCapture(model, _data(model), layers, batch_size=64, max_memory_bytes=1 << 30)
    for layer in layers:
        cached.capture(model, layer, with_reference=False)
    ops = [[node.op_type for node in m.graph.node] for m in built]
    # conv1's input is the model input (no run); then each run starts where the previous one stopped
    assert ops == [["Conv", "Relu"], ["Conv", "Add", "Relu"], ["Conv", "Flatten"]]
    assert set(cached.caches["working"].values) == set()  # everything freed after the last layer


def test_over_the_memory_budget_it_starts_again_and_compression_is_unchanged(monkeypatch):
    model = residual_cnn()
    data = _data(model)
    settings = {layer.weight: LayerSettings(sparsity=0.3, bits=3) for layer in find_layers(model)}
    options = CalibrationOptions(refit_rounds=1)
    with_cache = compress_with_calibration(model, data, settings, options)
    original_init = SequentialCapture.__init__
    tiny = SequentialCapture(model, data, find_layers(model), batch_size=64, max_memory_bytes=1)
    assert tiny.capture(model, find_layers(model)[1], with_reference=True) is not None
    assert not tiny.caches["working"].values and not tiny.caches["reference"].values  # over the budget: dropped
    monkeypatch.setattr(SequentialCapture, "__init__", lambda self, *a, **k: (
        original_init(self, *a, **{**k, "max_memory_bytes": 1})))
    tight = compress_with_calibration(model, data, settings, options)
    monkeypatch.setattr(SequentialCapture, "capture", lambda *a, **k: None)  # the capture from the model inputs
    without = compress_with_calibration(model, data, settings, options)
    # the same fits up to float32 rounding (onnxruntime's NCHWc layout may cover the cut graphs' convolutions
    # differently: identical at graph optimisation level "extended")
    for name in settings:
        for other in (tight, without):
            np.testing.assert_allclose(with_cache.results[name].tensor.quantized, other.results[name].tensor.quantized,
                                       rtol=1e-5, atol=1e-6)
    for bias in ("b1", "b2"):
        np.testing.assert_allclose(*(numpy_helper.to_array(next(t for t in c.model.graph.initializer if t.name == bias))
                                     for c in (with_cache, without)), rtol=1e-5, atol=1e-6)
