"""Tests of onnx_dc.calibration: the axis-0 rule, layers, im2col and the captured statistics."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_dc.calibration.data import CalibrationData, input_specs, load_calibration
from onnx_dc.calibration.capture import LayerStatistics, capture_statistics, run_model
from onnx_dc.calibration.layers import find_layers, im2col
from onnx_dc.errors import CalibrationError, ModelError, SettingsError
from calibration_models import classifier, inputs

RNG = np.random.default_rng(0)


def make_model(nodes, inputs, outputs, initializers, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def mlp_model(k=6, n=4):
    w1 = RNG.standard_normal((k, n)).astype(np.float32)
    b1 = RNG.standard_normal(n).astype(np.float32)
    w2 = RNG.standard_normal((3, n)).astype(np.float32)  # Gemm transB
    c2 = RNG.standard_normal(3).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["mm"]),
        helper.make_node("Add", ["mm", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "c2"], ["y"], transB=1, alpha=0.5, beta=2.0),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(a, n_) for a, n_ in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (c2, "c2"))],
    )


def conv_model(channels=4, group=2, **attrs):
    w = RNG.standard_normal((6, channels // group, 3, 3)).astype(np.float32)
    b = RNG.standard_normal(6).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], group=group, **attrs)]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )


def two_input_model(state_shape):
    """x: [batch, 5] batched; s: a state or scalar input of the given shape; y = x @ w + sum(s)."""
    w = RNG.standard_normal((5, 2)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("ReduceSum", ["s"], ["total"], keepdims=0),
        helper.make_node("Add", ["mm", "total"], ["y"]),
    ]
    return make_model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, state_shape),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
        opset=13,
    )


class TestAxisZeroRule:
    def test_batched_arrays(self):
        model = mlp_model()
        data = load_calibration({"x": RNG.standard_normal((10, 6)).astype(np.float32)}, model)
        assert data.n_samples == 10 and data.batchable
        feeds = list(data.feeds(batch_size=4))
        assert [count for _, count in feeds] == [4, 4, 2]
        assert feeds[0][0]["x"].shape == (4, 6)

    def test_one_feed_per_slice(self):
        model = mlp_model()
        data = load_calibration({"x": RNG.standard_normal((3, 2, 6)).astype(np.float32)}, model)
        assert data.n_samples == 3 and not data.batchable
        feeds = list(data.feeds(batch_size=8))
        assert len(feeds) == 3 and feeds[1][0]["x"].shape == (2, 6)

    def test_state_and_scalar_inputs_use_rank_plus_one(self):
        model = two_input_model([2, 3])  # a state with no batch axis
        x = RNG.standard_normal((4, 5)).astype(np.float32)
        s = RNG.standard_normal((4, 2, 3)).astype(np.float32)
        data = load_calibration({"x": x, "s": s}, model)
        feeds = list(data.feeds(batch_size=16))
        assert len(feeds) == 4  # mixed: one sample per run
        assert feeds[2][0]["x"].shape == (1, 5) and feeds[2][0]["s"].shape == (2, 3)
        np.testing.assert_array_equal(feeds[2][0]["s"], s[2])
        scalar = two_input_model([])
        data = load_calibration({"x": x, "s": np.arange(4, dtype=np.float32)}, scalar)
        assert [f["s"].shape for f, _ in data.feeds()] == [()] * 4
        outputs = run_model(scalar, data)
        assert outputs["y"].shape == (4, 2)

    def test_fixed_batch_dimension(self):
        model = two_input_model([2, 3])
        fixed = onnx.ModelProto()
        fixed.CopyFrom(model)
        fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
        x = RNG.standard_normal((6, 5)).astype(np.float32)
        s = RNG.standard_normal((3, 2, 3)).astype(np.float32)
        data = load_calibration({"x": x, "s": s}, fixed)
        assert data.n_samples == 3
        assert [f["x"].shape for f, _ in data.feeds()] == [(2, 5)] * 3
        with pytest.raises(CalibrationError, match="'x'.*multiple of 2"):
            load_calibration({"x": x[:5], "s": s}, fixed)

    def test_refusals_name_the_input(self):
        model = mlp_model()
        with pytest.raises(CalibrationError, match="'x'.*rank 4.*expected rank 2"):
            load_calibration({"x": np.zeros((2, 2, 2, 6), np.float32)}, model)
        with pytest.raises(CalibrationError, match="'x'.*axis 1 must be 6"):
            load_calibration({"x": np.zeros((4, 5), np.float32)}, model)
        with pytest.raises(CalibrationError, match="'z' not an input"):
            load_calibration({"x": np.zeros((4, 6), np.float32), "z": np.zeros(3)}, model)
        with pytest.raises(CalibrationError, match="no array for model input"):
            load_calibration({}, model)
        with pytest.raises(CalibrationError, match="labels.*--eval"):
            load_calibration({"x": np.zeros((4, 6), np.float32), "labels": np.zeros(4, int)}, model)
        with pytest.raises(CalibrationError, match="cannot be used"):
            load_calibration({"x": np.array([["a"] * 6])}, model)
        with pytest.raises(CalibrationError, match="no samples"):
            load_calibration({"x": np.zeros((0, 6), np.float32)}, model)
        other = two_input_model([2, 3])
        with pytest.raises(CalibrationError, match="different numbers of samples"):
            load_calibration({"x": np.zeros((4, 5), np.float32), "s": np.zeros((3, 2, 3), np.float32)}, other)

    def test_labels_are_dropped_when_allowed(self):
        model = mlp_model()
        data = load_calibration({"x": np.zeros((4, 6), np.float32), "labels": np.zeros(4, int)}, model, allow_labels=True)
        assert data.n_samples == 4

    def test_casts_within_kind_only(self):
        model = mlp_model()
        data = load_calibration({"x": np.zeros((4, 6), np.float64)}, model)
        assert next(data.feeds())[0]["x"].dtype == np.float32
        int_model = two_input_model([2, 3])
        int_model.graph.input[1].type.tensor_type.elem_type = TensorProto.INT64
        with pytest.raises(CalibrationError, match="'s'"):
            load_calibration({"x": np.zeros((2, 5), np.float32), "s": np.zeros((2, 2, 3), np.float32)}, int_model)

    def test_undeclared_rank_is_ambiguous(self):
        model = mlp_model()
        model.graph.input[0].type.tensor_type.ClearField("shape")
        with pytest.raises(CalibrationError, match="ambiguous"):
            load_calibration({"x": np.zeros((4, 6), np.float32)}, model)

    def test_max_samples(self):
        data = load_calibration({"x": np.zeros((100, 6), np.float32)}, mlp_model(), max_samples=30)
        assert data.n_samples == 30 and sum(c for _, c in data.feeds(7)) == 30
        with pytest.raises(SettingsError):
            load_calibration({"x": np.zeros((4, 6), np.float32)}, mlp_model(), max_samples=0)

    def test_npz_file(self, tmp_path):
        path = tmp_path / "c.npz"
        np.savez(path, x=np.ones((5, 6), np.float32))
        assert load_calibration(path, mlp_model()).n_samples == 5
        with pytest.raises(CalibrationError, match="no such file"):
            load_calibration(tmp_path / "missing.npz", mlp_model())
        bad = tmp_path / "bad.npz"
        bad.write_bytes(b"not a zip")
        with pytest.raises(CalibrationError, match=r"bad.npz: not an .npz file of arrays \(write one with numpy.savez"):
            load_calibration(bad, mlp_model())

    def test_files_that_are_not_npz_archives_of_arrays(self, tmp_path):
        """Text, a pickle, one .npy array, pickled object arrays: one clear line each, never numpy's pickle hint."""
        import pickle

        (tmp_path / "text.npz").write_text("x,y\n1,2\n")
        (tmp_path / "pickle.npz").write_bytes(pickle.dumps({"x": [1, 2]}))
        with open(tmp_path / "one.npz", "wb") as file:
            np.save(file, np.ones((5, 6), np.float32))
        np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
        (tmp_path / "empty.npz").write_bytes(b"")
        expected = {"text": "not an .npz file of arrays", "pickle": "not an .npz file of arrays",
                    "one": "a single .npy array", "objects": "not an .npz file of arrays", "empty": "not an .npz file"}
        for name, message in expected.items():
            with pytest.raises(CalibrationError) as error:
                load_calibration(tmp_path / f"{name}.npz", mlp_model())
            text = str(error.value)
            assert message in text and "\n" not in text and "allow_pickle=True" not in text, text

    def test_iterable_of_feeds_and_one_shot_generators(self):
        model = mlp_model()
        feeds = [{"x": RNG.standard_normal((3, 6)).astype(np.float32)} for _ in range(4)]
        data = load_calibration(feeds, model)
        assert [c for _, c in data.feeds()] == [3, 3, 3, 3]
        generated = load_calibration((f for f in feeds), model, max_samples=7)
        first = [f["x"] for f, _ in generated.feeds()]
        second = [f["x"] for f, _ in generated.feeds()]  # a generator is kept so it can be read again
        assert len(first) == 3 and all(np.array_equal(a, b) for a, b in zip(first, second))
        with pytest.raises(CalibrationError, match="feed 0"):
            list(load_calibration([{"x": np.zeros((6,), np.float32)}], model).feeds())
        with pytest.raises(CalibrationError):
            load_calibration(42, model)

    def test_split_is_disjoint_and_seeded(self):
        x = np.arange(20, dtype=np.float32)[:, None].repeat(6, axis=1)
        data = load_calibration({"x": x}, mlp_model())
        fit, held = data.split(5, seed=3)
        a = np.concatenate([f["x"][:, 0] for f, _ in fit.feeds()])
        b = np.concatenate([f["x"][:, 0] for f, _ in held.feeds()])
        assert len(a) == 15 and len(b) == 5 and not set(a) & set(b)
        again = data.split(5, seed=3)[1]
        assert np.array_equal(b, np.concatenate([f["x"][:, 0] for f, _ in again.feeds()]))
        with pytest.raises(CalibrationError):
            data.split(20)

    def test_input_specs_skip_initializers(self):
        model = mlp_model()
        model.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [6, 4]))
        assert [s.name for s in input_specs(model)] == ["x"]


def conv_reference(x, w, **attrs):
    group = attrs.get("group", 1)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    model = make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    del group
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize(
    "xshape, wshape, attrs",
    [
        ((2, 3, 9, 9), (4, 3, 3, 3), {}),
        ((2, 4, 9, 8), (6, 2, 3, 2), {"group": 2, "strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]}),
        ((2, 4, 10, 10), (4, 1, 3, 3), {"group": 4, "auto_pad": "SAME_UPPER", "strides": [2, 2]}),  # depthwise
        ((2, 4, 10, 11), (8, 1, 3, 3), {"group": 4, "auto_pad": "SAME_LOWER", "strides": [3, 2]}),
        ((2, 3, 17), (5, 3, 4), {"strides": [3], "dilations": [2], "pads": [1, 2]}),  # 1-D
        ((1, 2, 5, 6, 7), (3, 2, 2, 3, 2), {"strides": [1, 2, 1], "auto_pad": "VALID"}),  # 3-D
    ],
)
def test_im2col_reproduces_onnxruntime_conv(xshape, wshape, attrs):
    x = RNG.standard_normal(xshape).astype(np.float32)
    w = RNG.standard_normal(wshape).astype(np.float32)
    expected = conv_reference(x, w, **attrs)
    group = attrs.get("group", 1)
    blocks = im2col(x, kernel_shape=wshape[2:], group=group, **{k: v for k, v in attrs.items() if k != "group"})
    per_group = wshape[0] // group
    out = np.concatenate(
        [rows @ w[g * per_group : (g + 1) * per_group].reshape(per_group, -1).T.astype(np.float64) for g, rows in enumerate(blocks)],
        axis=1,
    )
    n = xshape[0]
    out = out.reshape(n, -1, wshape[0]).transpose(0, 2, 1).reshape(expected.shape)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


class TestLayers:
    def test_find_layers_and_biases(self):
        layers = {layer.weight: layer for layer in find_layers(mlp_model())}
        assert set(layers) == {"w1", "w2"}
        assert layers["w1"].op == "MatMul" and layers["w1"].bias == "b1"
        assert layers["w2"].trans_b and layers["w2"].alpha == 0.5 and layers["w2"].bias == "c2"
        assert layers["w2"].bias_scale == 2.0
        assert (layers["w2"].n_inputs, layers["w2"].n_outputs) == (4, 3)
        conv = find_layers(conv_model(group=2, pads=[1, 1, 1, 1]))[0]
        assert conv.groups == 2 and conv.bias == "b" and conv.n_inputs == 2 * 9

    def test_shared_and_unsupported_weights_are_left_out(self):
        w = numpy_helper.from_array(RNG.standard_normal((4, 4)).astype(np.float32), "w")
        nodes = [
            helper.make_node("MatMul", ["x", "w"], ["a"]),
            helper.make_node("MatMul", ["a", "w"], ["b"]),  # shared weight
        ]
        model = make_model(
            nodes,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
            [helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 4])],
            [w],
        )
        assert find_layers(model) == []
        ct = make_model(
            [helper.make_node("ConvTranspose", ["x", "k"], ["y"])],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(RNG.standard_normal((2, 3, 3, 3)).astype(np.float32), "k")],
        )
        assert find_layers(ct) == []

    @pytest.mark.parametrize("factory", [lambda: mlp_model(), lambda: conv_model(group=2, strides=[2, 2])])
    def test_blocks_round_trip(self, factory):
        model = factory()
        for layer in find_layers(model):
            w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == layer.weight))
            blocks = layer.to_blocks(w)
            assert len(blocks) == layer.groups
            np.testing.assert_array_equal(layer.from_blocks(blocks), w)


class TestStatistics:
    def test_gram_matches_the_activations(self):
        model = mlp_model()
        x = RNG.standard_normal((50, 6)).astype(np.float32)
        data = load_calibration({"x": x}, model)
        layers = find_layers(model)
        stats = capture_statistics(model, data, layers, batch_size=7)
        acts = run_model(model, data, outputs=["x", "r"])
        for layer, a in (("w1", acts["x"]), ("w2", 0.5 * acts["r"])):  # Gemm alpha scales the input
            s = stats[layer]
            a = a.astype(np.float64)
            np.testing.assert_allclose(s.input_gram(), a.T @ a, rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(s.input_mean(), a.mean(axis=0), rtol=1e-5, atol=1e-5)
            centered = a - a.mean(axis=0)
            np.testing.assert_allclose(s.input_gram(centered=True), centered.T @ centered, rtol=1e-5, atol=1e-4)
            assert s.n_rows == 50 and s.n_samples == 50

    def test_conv_statistics_per_group_and_layer_output(self):
        model = conv_model(group=2, strides=[2, 2], pads=[1, 1, 1, 1])
        x = RNG.standard_normal((5, 4, 9, 9)).astype(np.float32)
        data = load_calibration({"x": x}, model)
        layer = find_layers(model)[0]
        stats = capture_statistics(model, data, [layer], batch_size=2)[layer.weight]
        blocks = im2col(x, **layer.conv, group=2)
        for g in range(2):
            np.testing.assert_allclose(stats.input_gram(g), blocks[g].T @ blocks[g], rtol=1e-6, atol=1e-6)
        w = numpy_helper.to_array(model.graph.initializer[0])
        y = run_model(model, data)["y"]
        out = np.concatenate([b @ wb for b, wb in zip(blocks, layer.to_blocks(w))], axis=1)
        b = numpy_helper.to_array(model.graph.initializer[1])
        out = out + np.concatenate(layer.bias_to_blocks(b))
        np.testing.assert_allclose(out.reshape(5, -1, 6).transpose(0, 2, 1).reshape(y.shape), y, rtol=1e-4, atol=1e-4)

    @pytest.mark.parametrize("op", ["conv", "mlp"])
    def test_row_chunks_in_threads_give_the_serial_sums(self, op, monkeypatch):
        """Row chunks are formed and multiplied in threads (column_threads), then added in order."""
        from onnx_dc.calibration import capture
        from onnx_dc.calibration.layer_problem import column_threads

        monkeypatch.setattr(capture, "_IM2COL_CHUNK_ELEMENTS", 60)  # many chunks per batch
        if op == "conv":
            model = conv_model(group=2, strides=[2, 2], pads=[1, 1, 1, 1])
            x = RNG.standard_normal((7, 4, 9, 9)).astype(np.float32)
        else:
            model = mlp_model()
            x = RNG.standard_normal((70, 6)).astype(np.float32)
        data = load_calibration({"x": x}, model)
        layers = find_layers(model)
        runs = []
        for jobs in (1, 2):
            with column_threads(jobs):
                runs.append(capture_statistics(model, data, layers, batch_size=35 if op == "mlp" else 3, reference=model))
        for name, serial in runs[0].items():
            threaded = runs[1][name]
            assert serial.n_rows == threaded.n_rows > 0
            for a, b in zip(serial.gram + serial.cross, threaded.gram + threaded.cross):
                np.testing.assert_array_equal(a, b)
        if op == "conv":
            blocks = im2col(x, **layers[0].conv, group=2)
            for g in range(2):
                np.testing.assert_allclose(runs[1][layers[0].weight].input_gram(g), blocks[g].T @ blocks[g], rtol=1e-6, atol=1e-6)

    def test_several_passes_give_the_same_statistics(self):
        model = mlp_model()
        data = load_calibration({"x": RNG.standard_normal((20, 6)).astype(np.float32)}, model)
        layers = find_layers(model)
        one = capture_statistics(model, data, layers)
        many = capture_statistics(model, data, layers, max_memory_bytes=1)
        for name in one:
            np.testing.assert_allclose(one[name].gram[0], many[name].gram[0])

    def test_statistics_size_does_not_depend_on_samples(self):
        model = mlp_model()
        layers = find_layers(model)
        small = capture_statistics(model, load_calibration({"x": np.ones((4, 6), np.float32)}, model), layers)
        large = capture_statistics(model, load_calibration({"x": np.ones((400, 6), np.float32)}, model), layers)
        assert [s.gram[0].nbytes for s in small.values()] == [s.gram[0].nbytes for s in large.values()]

    def test_sequential_cross_terms(self):
        model = mlp_model()
        other = onnx.ModelProto()
        other.CopyFrom(model)
        other.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros((6, 4), np.float32), "w1"))
        data = load_calibration({"x": RNG.standard_normal((30, 6)).astype(np.float32)}, model)
        layer = [l for l in find_layers(model) if l.weight == "w2"]
        stats = capture_statistics(other, data, layer, reference=model)["w2"]
        a = 0.5 * run_model(other, data, outputs=["r"])["r"].astype(np.float64)
        r = 0.5 * run_model(model, data, outputs=["r"])["r"].astype(np.float64)
        ext = lambda m: np.hstack([m, np.ones((len(m), 1))])  # noqa: E731
        np.testing.assert_allclose(stats.cross[0], ext(a).T @ ext(r), rtol=1e-5, atol=1e-5)

    def test_update_without_reference_terms_refuses_a_reference(self):
        layer = find_layers(mlp_model())[0]
        stats = LayerStatistics.empty(layer)
        with pytest.raises(CalibrationError):
            stats.update(np.zeros((2, 6)), np.zeros((2, 6)))

    def test_bad_value_names_and_failing_models(self):
        model = mlp_model()
        data = load_calibration({"x": np.ones((2, 6), np.float32)}, model)
        with pytest.raises(ModelError, match="no value named"):
            run_model(model, data, outputs=["nope"])
        assert isinstance(data, CalibrationData)


def test_feeds_split_by_whole_feeds_without_overlap():
    model = classifier(seed=1)
    x = inputs(50, seed=2)
    feeds = [{"x": x[i : i + 5]} for i in range(0, 50, 5)]
    data = load_calibration(iter(feeds), model)
    fit, held = data.split(12, seed=0)
    assert fit.n_samples + held.n_samples == 50 and held.n_samples == 15  # three whole feeds of 5
    seen = [feed["x"] for feed, _ in fit.feeds()] + [feed["x"] for feed, _ in held.feeds()]
    assert sorted(map(lambda a: float(a[0, 0]), seen)) == sorted(float(f["x"][0, 0]) for f in feeds)
    with pytest.raises(CalibrationError, match="feed"):
        load_calibration([feeds[0]], model).split(1)


def test_reused_statistics_capture_once_inside_the_block(monkeypatch):
    import onnx_dc.calibration.capture as calibration

    model = mlp_model()
    data = load_calibration({"x": RNG.standard_normal((20, 6)).astype(np.float32)}, model)
    other = load_calibration({"x": RNG.standard_normal((20, 6)).astype(np.float32)}, model)
    layers = find_layers(model)
    runs = []
    original_run = calibration._Runner.run
    monkeypatch.setattr(calibration._Runner, "run", lambda self, feed: runs.append(1) or original_run(self, feed))
    fresh = capture_statistics(model, data, layers)
    n_fresh = len(runs)
    with calibration.reused_statistics():
        first = capture_statistics(model, data, layers)
        first.pop(layers[0].weight)  # the caller's dict is its own
        second = capture_statistics(model, data, list(reversed(layers)))
        assert len(runs) == 2 * n_fresh  # the second capture ran nothing
        assert set(second) == {layer.weight for layer in layers}
        for name in fresh:
            np.testing.assert_array_equal(second[name].gram[0], fresh[name].gram[0])
        different = capture_statistics(model, other, layers)  # other data: captured
        assert len(runs) == 3 * n_fresh
        assert not np.array_equal(different[layers[0].weight].gram[0], fresh[layers[0].weight].gram[0])
    capture_statistics(model, data, layers)  # outside the block: captured again
    assert len(runs) == 4 * n_fresh
