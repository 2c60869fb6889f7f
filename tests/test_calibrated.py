"""Tests of onnx_dc.calibration.model_fit: calibrated compression of whole models, plain and sequential."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_dc
import onnx_dc.api.convert
from onnx_dc.api.recipe import CalibrationRecipe, Recipe
from calibration_models import classifier, inputs
from onnx_dc.calibration.options import CalibrationOptions, LayerSettings
from onnx_dc.calibration.model_fit import compress_with_calibration, initializer_array, set_initializer
from onnx_dc.calibration.targets import downstream_column_weights
from onnx_dc.calibration.data import load_calibration
from onnx_dc.calibration.capture import run_model
from onnx_dc.api.cli import main
from onnx_dc.codec.container_reader import decode_container
from onnx_dc.errors import ModelError, SettingsError
from onnx_dc.graph.restore import decompress_model


@pytest.fixture(scope="module")
def model():
    return classifier(seed=11, sizes=(16, 64, 48, 32, 6))


@pytest.fixture(scope="module")
def calib(model):
    return load_calibration({"x": inputs(500, seed=12)}, model)


@pytest.fixture(scope="module")
def held_out(model):
    return load_calibration({"x": inputs(300, seed=13)}, model)


SETTINGS = {f"fc{i}.weight": LayerSettings(sparsity=0.8, bits=3, index_bits=5) for i in range(4)}


def output_error(model, compression, data):
    def lookup(weight, values, resolved):
        return compression.results[weight.name].tensor

    result = onnx_dc.api.convert.compress_model(compression.model, Recipe(min_elements=0), tensor_compressor=lookup)
    runnable = onnx.ModelProto()
    runnable.CopyFrom(result.model)
    decompress_model(runnable)
    y0 = run_model(model, data)["logits"]
    y1 = run_model(runnable, data)["logits"]
    return float(np.sum((y1 - y0) ** 2) / np.sum(y0**2))


def test_containers_hold_the_fitted_weights_and_biases_are_refitted(model, calib):
    compression = compress_with_calibration(model, calib, SETTINGS, CalibrationOptions(sequential=False))
    for name, result in compression.results.items():
        assert result.calibrated and result.criterion in ("magnitude", "activation", "obs")
        decoded = decode_container(result.tensor.container)
        np.testing.assert_array_equal(decoded, result.tensor.quantized)
        assert decoded.dtype == np.float32 and decoded.shape == initializer_array(model, name).shape
        assert result.tensor.n_kept == int(round(0.2 * decoded.size))
        assert len(np.unique(decoded[decoded != 0])) <= 8
        assert result.bias == name.replace("weight", "bias")
        assert not np.array_equal(initializer_array(compression.model, result.bias), initializer_array(model, result.bias))
        # the weights handed back are the original dense ones (the converter compresses them)
        np.testing.assert_array_equal(initializer_array(compression.model, name), initializer_array(model, name))


@pytest.mark.parametrize("max_memory_bytes", [None, 3_300_000])  # one capture group, or two (fc0 alone)
def test_fits_in_parallel_give_the_serial_results_in_order(max_memory_bytes):
    """Without sequential capture the layers are fitted ``jobs`` at once; the containers, biases and
    progress order are those of the serial run (a 640-input layer runs multi-threaded BLAS serially)."""
    wide = classifier(seed=5, sizes=(640, 48, 32, 6))
    data = load_calibration({"x": inputs(300, seed=6, k=640)}, wide)
    settings = {f"fc{i}.weight": LayerSettings(sparsity=0.5, bits=4) for i in range(3)}
    extra = {} if max_memory_bytes is None else {"max_memory_bytes": max_memory_bytes}
    options = CalibrationOptions(sequential=False, **extra)
    runs = {}
    for jobs in (1, 2):
        ticks: list[str] = []
        result = compress_with_calibration(wide, data, settings, options, jobs=jobs,
                                           progress=lambda done, total, name, ticks=ticks: ticks.append(name))
        containers = {name: bytes(r.tensor.container) for name, r in result.results.items()}
        biases = {name: initializer_array(result.model, f"{name[:-len('weight')]}bias").tobytes() for name in settings}
        runs[jobs] = (list(result.results), containers, biases, ticks)
    assert runs[1][0] == runs[2][0] == [f"fc{i}.weight" for i in range(3)]
    assert runs[1] == runs[2]


def test_sequential_fits_give_the_same_model_with_column_threads(monkeypatch):
    """With sequential capture one layer is fitted at a time and ``jobs`` threads share its per-column
    solves (weight refits, OBS saliencies, error-feedback factors, centroid systems): same containers."""
    from onnx_dc.calibration import error_feedback, layer_problem, pruning_fit, sharing_fit

    pools: list[int] = []

    class CountedPool(layer_problem.ThreadPoolExecutor):
        def __init__(self, max_workers: int) -> None:
            pools.append(max_workers)
            super().__init__(max_workers=max_workers)

    monkeypatch.setattr(layer_problem, "ThreadPoolExecutor", CountedPool)
    monkeypatch.setattr(pruning_fit, "_REFIT_BATCH_BYTES", 1 << 14)  # several padded batches per layer
    monkeypatch.setattr(error_feedback, "_FEEDBACK_BATCH_BYTES", 1 << 14)
    monkeypatch.setattr(sharing_fit, "_per_column_is_cheaper", lambda *args: True)
    net = classifier(seed=7, sizes=(96, 40, 24, 6))
    data = load_calibration({"x": inputs(200, seed=8, k=96)}, net)
    settings = {f"fc{i}.weight": LayerSettings(sparsity=0.3, bits=6) for i in range(3)}
    runs = {}
    for jobs in (1, 2):
        pools.clear()
        result = compress_with_calibration(net, data, settings, CalibrationOptions(sequential=True), jobs=jobs)
        runs[jobs] = {name: bytes(r.tensor.container) for name, r in result.results.items()}
        if jobs == 1:
            assert pools == []
        else:
            assert pools and max(pools) == 2
    assert runs[1] == runs[2]


def test_parallel_fits_start_costliest_first_and_return_in_order():
    """Layers fitted in threads start by decreasing cost, so that a long fit does not start last."""
    import threading

    from onnx_dc.calibration import model_fit

    started: list[int] = []
    lock = threading.Lock()
    both_started = threading.Barrier(2, timeout=10)

    def work(item: int) -> int:
        with lock:
            started.append(item)
            first_two = len(started) <= 2
        if first_two:  # neither thread takes a third item before both took one
            both_started.wait()
        return 10 * item

    costs = {0: 1.0, 1: 50.0, 2: 3.0, 3: 70.0, 4: 2.0}
    assert list(model_fit._map_in_order(work, list(costs), 2, cost=costs.__getitem__)) == [0, 10, 20, 30, 40]
    assert set(started[:2]) == {1, 3} and sorted(started) == [0, 1, 2, 3, 4]


def test_fit_cost_puts_wide_layers_first():
    from onnx_dc.calibration.layers import LayerSpec
    from onnx_dc.calibration.model_fit import _fit_cost

    wide = LayerSpec("w", "Conv", "n", "x", (60, 960, 1, 3))
    square = LayerSpec("s", "Conv", "n", "x", (480, 480, 1, 1))
    depthwise = LayerSpec("d", "Conv", "n", "x", (480, 1, 5, 5), groups=480)
    assert _fit_cost(wide) > _fit_cost(square) > _fit_cost(depthwise) > 0


def test_each_refinement_lowers_the_held_out_output_error(model, calib, held_out):
    plain = CalibrationOptions(criterion="magnitude", refit_weights=False, refit_rounds=0, sequential=False, bias_correction=False)
    steps = [
        plain,
        CalibrationOptions(criterion="magnitude", refit_weights=False, sequential=False),
        CalibrationOptions(sequential=False),
        CalibrationOptions(sequential=True),
    ]
    errors = [output_error(model, compress_with_calibration(model, calib, SETTINGS, options), held_out) for options in steps]
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.25 * errors[0]


def test_index_bits_chosen_automatically_give_the_smallest_container(model, calib):
    auto = {name: LayerSettings(sparsity=0.8, bits=3, index_bits=None) for name in SETTINGS}
    compression = compress_with_calibration(model, calib, auto, CalibrationOptions(sequential=False))
    fixed = compress_with_calibration(model, calib, SETTINGS, CalibrationOptions(sequential=False))
    for name in SETTINGS:
        assert compression.results[name].tensor.size_bytes <= fixed.results[name].tensor.size_bytes


def test_weights_without_statistics_take_the_plain_path():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("MatMul", ["emb", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = load_calibration({"ids": rng.integers(0, 50, size=64)}, model)
    settings = {"table": LayerSettings(sparsity=0.5, bits=4), "w": LayerSettings(sparsity=0.5, bits=4)}
    compression = compress_with_calibration(model, data, settings, CalibrationOptions())
    assert not compression.results["table"].calibrated and compression.results["w"].calibrated


def test_quality_converts_to_a_sparsity():
    from onnx_dc.graph.settings import ResolvedSettings

    w = np.linspace(-1, 1, 101)
    settings = LayerSettings.from_resolved(ResolvedSettings(None, 0.5, 4, 5, "linear"), w)
    expected = np.mean(np.abs(w) < 0.5 * w.std())
    assert settings.sparsity == pytest.approx(expected)
    with pytest.raises(SettingsError):
        LayerSettings.from_resolved(ResolvedSettings(None, 0.5, 4, 5, "linear"))


def test_options_are_checked():
    with pytest.raises(SettingsError):
        CalibrationOptions(criterion="largest")
    with pytest.raises(SettingsError):
        CalibrationOptions(refit_rounds=-1)
    with pytest.raises(SettingsError):
        CalibrationOptions(damping=float("nan"))
    with pytest.raises(SettingsError):
        CalibrationOptions(obs_rate=1.0)


def test_set_initializer_keeps_name_and_dtype(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    set_initializer(copy, "fc0.bias", np.ones(64))
    assert initializer_array(copy, "fc0.bias").dtype == np.float32
    with pytest.raises(ModelError):
        set_initializer(copy, "nope", np.ones(1))


def test_api_and_command_line(tmp_path, model, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "c.npz", x=inputs(300, seed=14))
    result = onnx_dc.compress(str(path), tmp_path / "a.onnx", calib=tmp_path / "c.npz", sparsity=0.8, bits=3)
    assert result.calibration is not None and len(result.calibration.results) == 3  # fc3 is below min-elements
    out = tmp_path / "b.onnx"
    code = main(["compress", str(path), "-o", str(out), "--calib", str(tmp_path / "c.npz"), "--sparsity", "0.8",
                 "--bits", "3", "--criterion", "obs", "--no-sequential", "--calib-samples", "100", "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0 and out.exists() and "calibrated fits (100 calibration samples)" in text and "obs" in text
    assert main(["compress", str(path), "-o", str(out), "--criterion", "obs"]) == 2  # needs --calib
    assert main(["compress", str(path), "-o", str(out), "--calib", str(tmp_path / "missing.npz")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_no_downstream_weighting_flag(tmp_path, model):
    """--no-downstream-weighting fits as CalibrationOptions(downstream_weighting=False) does, unlike the default."""
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "c.npz", x=inputs(300, seed=15))
    common = ["--calib", str(tmp_path / "c.npz"), "--sparsity", "0.8", "--bits", "3", "--no-progress"]
    assert main(["compress", str(path), "-o", str(tmp_path / "flag.onnx"), "--no-downstream-weighting", *common]) == 0
    assert main(["compress", str(path), "-o", str(tmp_path / "default.onnx"), *common]) == 0
    recipe = Recipe(calibration=CalibrationRecipe(options=CalibrationOptions(downstream_weighting=False)))
    api = onnx_dc.compress(str(path), recipe=recipe, calib=tmp_path / "c.npz", sparsity=0.8, bits=3)

    def weights(m: onnx.ModelProto) -> dict[str, bytes]:
        return {t.name: t.raw_data or numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}

    flag = weights(onnx.load(tmp_path / "flag.onnx"))
    assert flag == weights(api.model)
    assert flag != weights(onnx.load(tmp_path / "default.onnx"))
    assert main(["compress", str(path), "-o", str(tmp_path / "x.onnx"), "--no-downstream-weighting"]) == 2


def _constant_weight_convnet(seed: int = 0) -> onnx.ModelProto:
    """Conv(+bias) -> Relu -> Flatten -> Gemm -> MatMul, every weight and bias in a Constant node (as Paddle exports)."""
    rng = np.random.default_rng(seed)
    tensors = {
        "conv.w": rng.standard_normal((8, 2, 3, 3)) * 0.3,
        "conv.b": 0.1 * rng.standard_normal(8),
        "fc.w": rng.standard_normal((8 * 6 * 6, 32)) * 0.05,
        "fc.b": 0.1 * rng.standard_normal(32),
        "head.w": rng.standard_normal((32, 5)) * 0.2,
    }
    nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(v.astype(np.float32)))
             for name, v in tensors.items()]
    nodes += [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("MatMul", ["hr", "head.w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "constant_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_weights_in_constant_nodes_are_calibrated_and_the_model_validates():
    model = _constant_weight_convnet()
    rng = np.random.default_rng(3)
    calib = {"x": rng.standard_normal((1000, 2, 6, 6)).astype(np.float32)}
    feeds = {"x": rng.standard_normal((100, 2, 6, 6)).astype(np.float32)}
    result = onnx_dc.compress(model, recipe=Recipe(min_elements=0), calib=calib, sparsity=0.6, bits=4)
    fitted = result.calibration.results
    assert {name for name, r in fitted.items() if r.calibrated} == {"conv.w", "fc.w", "head.w"}
    assert fitted["conv.w"].bias == "conv.b" and fitted["fc.w"].bias == "fc.b"
    onnx.checker.check_model(result.model)
    cosines = []
    for use_library in (True, False):  # through the operator library, and decompressed to standard operators
        # A random network: its outputs are not class scores, so no top-1 agreement threshold.
        report = onnx_dc.api.validate(model, result.model, feeds, min_cosine=0.9, min_top1_agreement=None,
                                      use_library=use_library)
        assert report.passed and report.used_library == use_library
        cosines.append(report.outputs[0].cosine)
    assert cosines[0] == pytest.approx(cosines[1], abs=1e-5)
    # the calibrated fit beats the plain recipe with the same settings on held-out inputs
    plain = onnx_dc.compress(model, recipe=Recipe(min_elements=0), sparsity=0.6, bits=4)

    def error(compressed):
        runnable = onnx.ModelProto()
        runnable.CopyFrom(compressed)
        decompress_model(runnable)
        data = load_calibration(feeds, model)
        y0, y1 = run_model(model, data)["y"], run_model(runnable, data)["y"]
        return float(np.sum((y1 - y0) ** 2) / np.sum(y0**2))

    assert error(result.model) < error(plain.model)


def _every_width_sizes(codes, codebook, bits):
    from onnx_dc.calibration.options import AUTO_INDEX_BITS
    from onnx_dc.codec.container import encode_container

    return [len(encode_container(codes, codebook, bits=bits, index_bits=w)) for w in AUTO_INDEX_BITS]


@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.9])
def test_automatic_index_bits_reach_the_smallest_container_of_every_width(sparsity):
    from onnx_dc.calibration.model_fit import _encode_best

    rng = np.random.default_rng(3)
    codes = rng.integers(0, 8, size=(64, 96)).astype(np.int16)
    codes[rng.random(codes.shape) < sparsity] = -1
    codebook = np.linspace(-1, 1, 8).astype(np.float32)
    smallest = min(_every_width_sizes(codes, codebook, 3))
    settings = LayerSettings(sparsity=sparsity, bits=3, index_bits=None)
    exhaustive = _encode_best(codes, codebook, settings)
    quick = _encode_best(codes, codebook, settings, exhaustive=False)
    assert exhaustive.size_bytes == smallest
    assert quick.size_bytes == smallest  # sizes against the width fall then rise: the scan stops past the minimum
    np.testing.assert_array_equal(decode_container(quick.container), decode_container(exhaustive.container))


class TestSearchCandidates:
    """The parts of onnx_dc.calibration.search that compute the candidates and measure their effect."""

    def cand(self, size, layer_error, output_error=float("nan")):
        from onnx_dc.calibration.search_path import Candidate

        return Candidate(0.0, 4, size, output_error, layer_error, np.zeros(1), None, 4)

    def test_cheap_search_recipe_only_for_many_layers(self):
        from onnx_dc.calibration.search import MANY_LAYERS, _search_options

        options = CalibrationOptions(refit_rounds=2)
        assert _search_options(options, MANY_LAYERS) == options
        cheap = _search_options(options, MANY_LAYERS + 1)
        assert (cheap.criterion, cheap.refit_weights, cheap.refit_rounds) == ("activation", False, 0)
        assert cheap.sequential == options.sequential and cheap.damping == options.damping

    def test_runs_per_layer_follow_the_cost_of_a_run(self):
        from onnx_dc.calibration.search_path import MAX_MEASURED_PER_LAYER, _runs_per_layer

        assert _runs_per_layer(0.001, 10, 20) is None  # 0.2 s in all: every candidate is run
        assert _runs_per_layer(0.2, 60, 18) == MAX_MEASURED_PER_LAYER
        assert _runs_per_layer(5.0, 60, 18) == 1

    def test_measured_candidates_spread_over_the_layer_errors(self):
        from onnx_dc.calibration.search_path import _measured_indices

        errors = [0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 3e-5]
        assert _measured_indices(errors, None) == list(range(7))
        assert _measured_indices(errors, 1) == [3]  # the median positive error
        chosen = _measured_indices(errors, 3)
        assert len(chosen) == 3 and 0 not in chosen
        assert _measured_indices([0.0, 0.0], 2) == []

    def test_predicted_errors_interpolate_the_measured_ratio(self):
        from onnx_dc.calibration.search_path import _predict_output_errors

        found = [self.cand(10, 0.0), self.cand(9, 1e-3, 2e-3), self.cand(8, 1e-2), self.cand(7, 1e-1, 4e-1), self.cand(6, 1.0)]
        _predict_output_errors(found, [1, 3])
        assert found[0].output_error == 0.0
        assert found[1].output_error == 2e-3 and found[3].output_error == 4e-1  # measured ones untouched
        # ratio 2 at 1e-3 and 4 at 1e-1: sqrt(8) halfway in log(layer error); 4 beyond the last point
        assert found[2].output_error == pytest.approx(1e-2 * np.sqrt(8.0))
        assert found[4].output_error == pytest.approx(4.0)
        alone = [self.cand(5, 0.5)]
        _predict_output_errors(alone, [])
        assert alone[0].output_error == 0.5

    def test_thinned_path_keeps_ends_and_spreads_in_log_size(self):
        from onnx_dc.calibration.search_path import _thin_path

        path = [{"a": self.cand(1000 - 9 * i, 0.0)} for i in range(100)]
        assert _thin_path(path, 200) is path
        thin = _thin_path(path, 10)
        assert thin[0] is path[0] and thin[-1] is path[-1]
        assert 2 <= len(thin) <= 10
        sizes = [c["a"].size_bytes for c in thin]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)


def _gaussian_pass_probability(z):
    import math

    return np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in z])


def test_downstream_column_weights_of_a_relu_mlp(model, calib):
    from onnx_dc.calibration.capture import capture_statistics
    from onnx_dc.calibration.layers import find_layers

    layers = find_layers(model)
    stats = capture_statistics(model, calib, layers)
    weight, bias = initializer_array(model, "fc0.weight"), initializer_array(model, "fc0.bias")
    got = downstream_column_weights(model, layers[0], stats["fc0.weight"], weight, bias, layers=layers)
    # by hand: the pre-activation y = x W^T + b on the calibration inputs, its gate P(y > 0) under a
    # normal law with y's mean and standard deviation, times the energy of the next layer's input row
    x = inputs(500, seed=12).astype(np.float64)
    y = x @ weight.T.astype(np.float64) + bias
    gate = _gaussian_pass_probability(y.mean(axis=0) / y.std(axis=0))
    following = initializer_array(model, "fc1.weight").astype(np.float64)  # Gemm transB: [outputs, inputs]
    energy = np.sum(following**2, axis=0) * gate
    expected = np.maximum(energy / energy.mean(), 0.01)
    expected /= expected.mean()
    assert got is not None and len(got) == 1
    np.testing.assert_allclose(got[0], expected, rtol=1e-6)
    # the last layer feeds the graph output: plain objective
    last = layers[-1]
    assert downstream_column_weights(model, last, stats[last.weight], initializer_array(model, last.weight), None) is None


def _two_layer_mlp(middle: list[str], extra_output: bool = False) -> onnx.ModelProto:
    """x [batch, 6] -> MatMul + Add -> ``middle`` ops -> MatMul -> y; optionally the hidden value is an output too."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.standard_normal((6, 5)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b0"),
        numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "w1"),
    ]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]), helper.make_node("Add", ["h0", "b0"], ["h1"])]
    value = "h1"
    for i, op in enumerate(middle):
        nodes.append(helper.make_node(op, [value], [f"m{i}"]))
        value = f"m{i}"
    nodes.append(helper.make_node("MatMul", [value, "w1"], ["y"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(value, TensorProto.FLOAT, ["batch", 5]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("middle,extra_output,weighted,gated", [
    ([], False, True, False), (["Relu"], False, True, True), (["Identity", "Relu"], False, True, True),
    (["Sigmoid"], False, False, False), (["Relu"], True, False, False),
])
def test_downstream_column_weights_only_through_known_operators(middle, extra_output, weighted, gated):
    from onnx_dc.calibration.capture import capture_statistics
    from onnx_dc.calibration.layers import find_layers

    mlp = _two_layer_mlp(middle, extra_output)
    layers = find_layers(mlp)
    assert [layer.weight for layer in layers] == ["w0", "w1"] and layers[0].bias == "b0"
    data = load_calibration({"x": np.random.default_rng(4).standard_normal((200, 6)).astype(np.float32)}, mlp)
    stats = capture_statistics(mlp, data, layers)
    w0, b0 = initializer_array(mlp, "w0"), initializer_array(mlp, "b0")
    got = downstream_column_weights(mlp, layers[0], stats["w0"], w0, b0, layers=layers)
    if not weighted:
        assert got is None
        return
    energy = np.sum(initializer_array(mlp, "w1").astype(np.float64) ** 2, axis=1)
    if gated:
        x = np.random.default_rng(4).standard_normal((200, 6)).astype(np.float32).astype(np.float64)
        y = x @ w0.astype(np.float64) + b0
        energy = energy * _gaussian_pass_probability(y.mean(axis=0) / y.std(axis=0))
    expected = np.maximum(energy / energy.mean(), 0.01)
    np.testing.assert_allclose(got[0], expected / expected.mean(), rtol=1e-6)


def test_downstream_weighting_option_changes_only_the_objective(model, calib):
    plain = compress_with_calibration(model, calib, SETTINGS, CalibrationOptions(sequential=False, downstream_weighting=False))
    weighted = compress_with_calibration(model, calib, SETTINGS, CalibrationOptions(sequential=False))
    last = "fc3.weight"  # feeds the output: fitted the same way either way
    np.testing.assert_array_equal(plain.results[last].tensor.quantized, weighted.results[last].tensor.quantized)
    assert any(
        not np.array_equal(plain.results[n].tensor.quantized, weighted.results[n].tensor.quantized) for n in SETTINGS if n != last
    )
    for name in SETTINGS:
        assert weighted.results[name].tensor.n_kept == plain.results[name].tensor.n_kept
