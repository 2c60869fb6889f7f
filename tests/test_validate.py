"""Tests for onnx_dc.api.validation: comparing a compressed model's outputs with the original's."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

import graph_builders as gb
from graph_builders import ops_library  # noqa: F401  (fixture)
from onnx_dc.errors import CalibrationError, ModelError
from onnx_dc.api.validation import (
    DEFAULT,
    DEFAULT_MIN_COSINE,
    DEFAULT_MIN_TOP1_AGREEMENT,
    generate_inputs,
    load_inputs,
    validate_models,
)


def test_identical_models_agree_exactly():
    model = gb.mlp()
    report = validate_models(model, model, max_abs_diff=0.0, min_cosine=1.0)
    assert report.passed
    (out,) = report.outputs
    assert out.name == "y" and out.shape == (1, 10)
    assert out.max_abs_diff == 0.0 and out.mean_abs_diff == 0.0
    assert out.cosine == pytest.approx(1.0) and out.top1_agreement == 1.0
    assert "no onnx-dc operators" in report.runner and not report.used_library


def test_compressed_model_through_the_library(ops_library):
    model = gb.mlp()
    compressed, _ = gb.compress_all(model, sparsity=0.5, bits=6)
    report = validate_models(model, compressed, inputs=gb.inputs_for(model, batch=64))
    assert report.used_library and "custom operator library" in report.runner
    (out,) = report.outputs
    assert out.shape == (64, 10)
    assert 0 < out.max_abs_diff < math.inf and 0.5 < out.cosine < 1.0
    assert 0.0 <= out.top1_agreement <= 1.0
    # The decompressed form gives the same comparison.
    fallback = validate_models(model, compressed, inputs=gb.inputs_for(model, batch=64), use_library=False)
    assert not fallback.used_library and "decompressed" in fallback.runner
    assert fallback.outputs[0].cosine == pytest.approx(out.cosine, abs=1e-5)
    assert fallback.outputs[0].top1_agreement == out.top1_agreement


def test_thresholds_fail_the_report():
    model = gb.mlp()
    compressed, _ = gb.compress_all(model, sparsity=0.9, bits=2)
    report = validate_models(model, compressed, max_abs_diff=1e-6, min_cosine=0.99999, use_library=False)
    assert not report.passed
    assert "max abs diff" in report.outputs[0].problem and "cosine" in report.outputs[0].problem
    assert report.format_table().splitlines()[-1].startswith("FAILED")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False
    thresholds = data["thresholds"]
    assert (thresholds["max_abs_diff"], thresholds["min_cosine"], thresholds["defaults"]) == (1e-6, 0.99999, [])
    assert thresholds["applied"] == ["max abs diff <= 1e-06", "cosine >= 0.99999"]


def _zero_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every floating-point initializer set to zero (what sparsity 1 used to write)."""
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    for tensor in zeroed.graph.initializer:
        array = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array(np.zeros_like(array), tensor.name))
    return zeroed


def test_default_thresholds_fail_a_model_that_lost_its_weights():
    model = gb.mlp()
    report = validate_models(model, _zero_weights(model))  # generated inputs: the cosine default applies
    assert not report.passed
    assert report.thresholds.min_cosine == DEFAULT_MIN_COSINE == 0.99
    assert report.thresholds.defaults == ("min_cosine",) and report.thresholds.min_top1_agreement is None
    assert "cosine" in report.outputs[0].problem
    assert report.format_table().splitlines()[-1] == "FAILED (cosine >= 0.99 (default))"
    assert "top-1 agreement not checked: the inputs are generated" in report.format_table()


def test_default_top1_agreement_applies_to_given_inputs():
    model = gb.mlp()
    feeds = gb.inputs_for(model, batch=64)
    lost = validate_models(model, _zero_weights(model), inputs=feeds, min_cosine=None)
    assert lost.thresholds.defaults == ("min_top1_agreement",)
    assert lost.thresholds.min_top1_agreement == DEFAULT_MIN_TOP1_AGREEMENT == 0.95
    assert not lost.passed and "top-1 agreement" in lost.outputs[0].problem
    assert lost.format_table().splitlines()[-1] == "FAILED (top-1 agreement >= 95% (default))"
    same = validate_models(model, model, inputs=feeds)
    assert same.passed and same.thresholds.describe() == ["cosine >= 0.99 (default)", "top-1 agreement >= 95% (default)"]
    # Outputs that are not classifier-shaped (one value on the last axis) have no top-1 check.
    graph = h.make_graph([h.make_node("Mul", ["x", "w"], ["y"])], "scores",
                         [h.make_tensor_value_info("x", T.FLOAT, ["N", 1])], [h.make_tensor_value_info("y", T.FLOAT, ["N", 1])],
                         [numpy_helper.from_array(np.array([2.0], np.float32), "w")])
    single = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    negated = _zero_weights(single)
    negated.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array([1.0], np.float32), "w"))
    report = validate_models(single, negated, inputs={"x": np.arange(1, 9, dtype=np.float32).reshape(8, 1)})
    assert report.outputs[0].top1_agreement is None and report.passed


def test_explicit_thresholds_replace_the_defaults_and_none_turns_them_off():
    model = gb.mlp()
    zeroed = _zero_weights(model)
    feeds = gb.inputs_for(model, batch=64)
    none = validate_models(model, zeroed, inputs=feeds, min_cosine=None, min_top1_agreement=None)
    assert none.passed and none.thresholds.describe() == []
    assert none.format_table().splitlines()[-1] == "PASSED (no thresholds: outputs finite and shaped alike)"
    loose = validate_models(model, zeroed, inputs=feeds, min_cosine=-1.0, min_top1_agreement=0.0)
    assert loose.passed and loose.thresholds.defaults == ()
    forced = validate_models(model, model, min_top1_agreement=1.0)  # explicit: checked on generated inputs too
    assert forced.passed and forced.thresholds.min_top1_agreement == 1.0 and forced.thresholds.top1_skipped is None


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"min_top1_agreement": 99}, "fraction between 0 and 1"), ({"min_cosine": 2.0}, "between -1 and 1"),
     ({"max_abs_diff": -1.0}, ">= 0"), ({"min_cosine": "0.9"}, "between -1 and 1")],
)
def test_thresholds_out_of_range_are_refused(arguments, message):
    with pytest.raises(CalibrationError, match=message):
        validate_models(gb.mlp(), gb.mlp(), **arguments)


def test_the_python_api_has_the_command_line_defaults():
    import inspect as pyinspect

    import onnx_dc

    parameters = pyinspect.signature(onnx_dc.validate).parameters
    assert parameters["min_cosine"].default == parameters["min_top1_agreement"].default == DEFAULT
    assert parameters["max_abs_diff"].default is None
    report = onnx_dc.validate(gb.mlp(), _zero_weights(gb.mlp()))
    assert not report.passed and report.thresholds.min_cosine == DEFAULT_MIN_COSINE


def test_npz_inputs(tmp_path):
    model = gb.embedding()
    feeds = gb.inputs_for(model, batch=5)
    np.savez(tmp_path / "in.npz", **feeds)
    assert set(load_inputs(tmp_path / "in.npz")) == {"ids"}
    report = validate_models(model, model, inputs=tmp_path / "in.npz")
    assert report.outputs[0].shape == (5, 8) and report.inputs_source == str(tmp_path / "in.npz")


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({}, "no data for model input"),
        ({"x": np.zeros((2, 64), np.float32), "z": np.zeros(3)}, "'z' are not inputs of the model"),
        ({"x": np.zeros((2, 3, 64), np.float32)}, "rank 3"),
        ({"x": np.zeros((2, 63), np.float32)}, "axis 1 has size 63"),
        ({"x": np.array([["a"] * 64])}, "expects float32"),
    ],
)
def test_inputs_that_do_not_fit_are_refused(feeds, message):
    with pytest.raises(CalibrationError, match=message):
        validate_models(gb.mlp(), gb.mlp(), inputs=feeds)


def test_bad_inputs_file(tmp_path):
    with pytest.raises(CalibrationError, match="no such inputs file"):
        load_inputs(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="not an .npz file of arrays"):
        load_inputs(tmp_path / "bad.npz")


def test_generated_inputs_follow_the_specs():
    feeds = generate_inputs(gb.convnet())
    assert feeds["x"].shape == (1, 1, 12, 12) and feeds["x"].dtype == np.float32
    feeds = generate_inputs(gb.embedding())
    assert feeds["ids"].shape == (1, 32) and feeds["ids"].dtype == np.int64 and not feeds["ids"].any()
    feeds = generate_inputs(gb.if_model())
    assert feeds["cond"].shape == () and feeds["cond"].dtype == bool
    assert set(generate_inputs(gb.ir3_model())) == {"x"}  # initializer-inputs are not fed


def test_output_shape_mismatch_and_runtime_failure():
    model = gb.mlp()
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.node[-1].CopyFrom(h.make_node("Gemm", ["r2", "w3"], ["y0"], name="fc3"))
    other.graph.node.append(h.make_node("Concat", ["y0", "y0"], ["y"], axis=1))
    other.graph.output[0].CopyFrom(h.make_tensor_value_info("y", T.FLOAT, ["N", 20]))
    report = validate_models(model, other)
    assert not report.passed and "shape" in report.outputs[0].problem
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(ModelError, match="compressed model: onnxruntime failed"):
        validate_models(model, broken)


def test_generated_inputs_include_scalar_bool_conditions():
    model = gb.if_model()
    feeds = generate_inputs(model)
    assert isinstance(feeds["cond"], np.ndarray) and feeds["cond"].shape == () and feeds["cond"].dtype == np.bool_
    report = validate_models(model, model, max_abs_diff=0.0)
    assert report.passed
