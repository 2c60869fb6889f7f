"""Tests of onnx_dc.calibration.sensitivity and the ``onnx-dc sensitivity`` command."""

from __future__ import annotations

import builtins
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from calibration_models import classifier, inputs, labelled
from onnx_dc.calibration.data import load_calibration
from onnx_dc.calibration.capture import run_model
from onnx_dc.api.cli import main
from onnx_dc.errors import SettingsError
from onnx_dc.calibration.sensitivity import SensitivityReport, analyze_sensitivity, plot_sensitivity, write_json_atomic
from onnx_dc.calibration.weight_swap import WeightSwapRunner
from onnx_dc.calibration.metrics import compare_outputs


@pytest.fixture(scope="module")
def model():
    return classifier(seed=1)


@pytest.fixture(scope="module")
def calib(model):
    return load_calibration({"x": inputs(400, seed=2)}, model)


@pytest.fixture(scope="module")
def evaluation(model):
    data = labelled(model, 300, seed=3)
    return load_calibration({"x": data["x"]}, model), data["labels"]


@pytest.fixture(scope="module")
def report(model, calib, evaluation):
    data, labels = evaluation
    return analyze_sensitivity(model, calib, evaluation=data, labels=labels, sparsities=(0.5, 0.9), bits=(2, 6))


def test_compare_outputs():
    ref = {"y": np.array([[1.0, 0.0], [0.0, 2.0]]), "ids": np.array([1, 2])}
    same = compare_outputs(ref, {"y": ref["y"].copy(), "ids": ref["ids"]}, labels=np.array([0, 0]))
    assert same.relative_error == 0.0 and same.cosine == pytest.approx(1.0)
    assert same.accuracy == 0.5 and same.agreement == 1.0
    flipped = compare_outputs(ref, {"y": np.array([[0.0, 1.0], [0.0, 2.0]]), "ids": ref["ids"]})
    assert flipped.relative_error == pytest.approx(2.0 / 5.0)
    assert flipped.cosine == pytest.approx(4.0 / 5.0)
    assert flipped.agreement == 0.5 and flipped.accuracy is None


def test_weight_swap_runner_equals_a_modified_model(model, calib):
    runner = WeightSwapRunner(model, ["fc0.weight", "fc0.bias"], calib)
    np.testing.assert_allclose(runner.run()["logits"], run_model(model, calib)["logits"], rtol=1e-6, atol=1e-6)
    zeros = np.zeros((48, 16), np.float32)
    modified = onnx.ModelProto()
    modified.CopyFrom(model)
    modified.graph.initializer[0].CopyFrom(numpy_helper.from_array(zeros, "fc0.weight"))
    np.testing.assert_allclose(
        runner.run({"fc0.weight": zeros})["logits"], run_model(modified, calib)["logits"], rtol=1e-6, atol=1e-6
    )


def test_report_structure(report, model, evaluation):
    assert isinstance(report, SensitivityReport)
    assert [layer.name for layer in report.layers] == ["fc0.weight", "fc1.weight", "fc2.weight"]
    data, labels = evaluation
    logits = run_model(model, data)["logits"]
    assert report.baseline_accuracy == pytest.approx(np.mean(logits.argmax(1) == labels))
    for layer in report.layers:
        assert [p.value for p in layer.sparsity] == [0.5, 0.9]
        assert [p.value for p in layer.bits] == [2.0, 6.0]
        for p in layer.sparsity + layer.bits:
            assert 0 <= p.output.accuracy <= 1 and p.output.relative_error >= 0 and p.layer_relative_error >= 0
        assert all(p.criterion in ("magnitude", "activation", "obs") for p in layer.sparsity)
        # more pruning, more error; more bits, less error
        assert layer.sparsity[1].output.relative_error > layer.sparsity[0].output.relative_error
        assert layer.bits[1].output.relative_error < layer.bits[0].output.relative_error
    document = json.loads(json.dumps(report.to_dict()))
    assert document["layers"][0]["sparsity"][0]["sparsity"] == 0.5
    assert "accuracy" in report.format_table()


def test_calibrated_beats_plain_at_high_sparsity(model, calib, report):
    plain = analyze_sensitivity(model, calib, sparsities=(0.9,), bits=(2,), method="plain")
    assert plain.method == "plain"
    for tuned, base in zip(report.layers, plain.layers):
        assert tuned.sparsity[1].layer_relative_error < base.sparsity[0].layer_relative_error
    # without evaluation data the calibration inputs are used and there is no accuracy
    assert plain.baseline_accuracy is None and plain.layers[0].sparsity[0].output.accuracy is None


def test_bad_arguments(model, calib):
    with pytest.raises(SettingsError):
        analyze_sensitivity(model, calib, sparsities=(1.5,))
    with pytest.raises(SettingsError, match="removes every weight"):
        analyze_sensitivity(model, calib, sparsities=(0.5, 1.0))
    with pytest.raises(SettingsError):
        analyze_sensitivity(model, calib, bits=(9,))
    with pytest.raises(SettingsError):
        analyze_sensitivity(model, calib, method="best")
    with pytest.raises(SettingsError, match="nope"):
        analyze_sensitivity(model, calib, layers=["nope"])


def test_plot_and_json(tmp_path, report):
    plot_sensitivity(report, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_json_atomic(report.to_dict(), tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["method"] == "calibrated"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_plot_without_matplotlib(tmp_path, report, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SettingsError, match="matplotlib"):
        plot_sensitivity(report, tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


def test_command_line(tmp_path, model, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "c.npz", x=inputs(200, seed=5))
    data = labelled(model, 200, seed=6)
    np.savez(tmp_path / "e.npz", **data)
    out = tmp_path / "s.json"
    code = main(["sensitivity", str(path), "--calib", str(tmp_path / "c.npz"), "--eval", str(tmp_path / "e.npz"),
                 "-o", str(out), "--plot", str(tmp_path / "s.png"), "--sparsities", "0.5,0.8", "--bits", "3",
                 "--method", "plain", "--no-progress"])
    assert code == 0
    document = json.loads(out.read_text())
    assert document["evaluation_samples"] == 200 and len(document["layers"]) == 3
    assert (tmp_path / "s.png").exists()
    assert "wrote" in capsys.readouterr().out
    assert main(["sensitivity", str(path), "-o", str(out)]) == 2  # --calib is required
    assert main(["sensitivity", str(path), "--calib", str(tmp_path / "c.npz"), "-o", str(out), "--bits", "x"]) == 2
    assert main(["sensitivity", str(path), "--calib", str(tmp_path / "e.npz"), "-o", str(out)]) == 2  # labels in calib
    err = capsys.readouterr().err
    assert "onnx-dc: error:" in err and "Traceback" not in err


def test_compare_outputs_counts_discordant_pairs():
    from onnx_dc.calibration.metrics import compare_outputs

    labels = np.array([0, 1, 2, 0, 1, 2])
    eye = np.eye(3)
    reference = {"y": eye[[0, 1, 2, 1, 0, 2]]}  # right, right, right, wrong, wrong, right
    changed = {"y": eye[[0, 2, 2, 2, 1, 0]]}  # right, wrong (broken), right, wrong (wrong -> wrong), right (fixed), wrong (broken)
    metrics = compare_outputs(reference, changed, labels)
    assert metrics.agreement == pytest.approx(2 / 6)
    assert metrics.discordant == pytest.approx(3 / 6)  # two broken, one fixed; the wrong -> wrong change does not count
    assert metrics.accuracy == pytest.approx(3 / 6)
    assert compare_outputs(reference, changed).discordant is None
