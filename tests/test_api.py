"""Tests for onnx_dc.api (the Python API) and the zoo pipeline compress -> validate -> decompress -> evaluate."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper as nh

import graph_builders as gb
import onnx_dc
from onnx_dc.api.convert import compress_model
from onnx_dc.api.recipe import Recipe
from graph_builders import ops_library  # noqa: F401  (fixture)
from onnx_dc.errors import InvalidTensorError, LibraryNotFoundError, ModelError, SettingsError
from onnx_dc.graph.model_io import iter_graphs


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(model, feeds, library=None):
    options = ort.SessionOptions()
    if library:
        options.register_custom_ops_library(library)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_public_api_is_exported():
    for name in ("compress", "decompress", "inspect", "validate", "ops_library_path", "session_options",
                 "inference_session", "OnnxDcError", "SettingsError"):
        assert name in onnx_dc.__all__ and hasattr(onnx_dc, name)


def test_ops_library_path_is_a_loadable_library(ops_library):
    assert Path(ops_library).is_file()
    options = ort.SessionOptions()
    options.register_custom_ops_library(ops_library)


def test_compress_a_path_writes_a_valid_model_and_leaves_the_input_alone(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(gb.mlp(), src)
    digest = _sha(src)
    result = onnx_dc.compress(src, tmp_path / "out.onnx", sparsity={"fc": 0.9}, bits="fc=4")
    assert _sha(src) == digest
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
    assert result.saved.model_path == tmp_path / "out.onnx"
    rows = {r.name: r for r in result.report.tensors}
    assert rows["w1"].bits == 4 and abs(rows["w1"].kept_fraction - 0.1) < 0.01
    assert result.report.original_file_bytes == src.stat().st_size
    assert result.report.compressed_file_bytes == (tmp_path / "out.onnx").stat().st_size
    plans = {p.weight.name: p for p in result.plans}
    assert plans["b2"].skip_reason.startswith("bias")
    # b1 (the bias Add's operand, 300 floats) is a vector: dense unless named.
    assert set(result.compressed) == {"w1", "w2", "w3"}
    assert plans["b1"].settings is None and "vector" in plans["b1"].skip_reason
    # named, it would take 1.3 KiB as an 8-bit container (a 256-entry codebook): still left dense, and said so
    named = onnx_dc.compress(src, bits="b1=8,fc=4", sparsity={"fc": 0.9})
    reason = {p.weight.name: p for p in named.plans}["b1"].skip_reason
    assert "would not be smaller" in reason and set(named.compressed) == {"w1", "w2", "w3"}
    assert {d.name: d for d in named.report.dense}["b1"].reason.endswith(reason)
    assert f"b1 left dense: {reason}" in named.report.notes
    # inspect reads the same table back from the file.
    again = onnx_dc.inspect(tmp_path / "out.onnx")
    assert again.to_dict()["tensors"] == result.report.to_dict()["tensors"]
    assert again.ratio == result.report.ratio


def test_no_container_is_larger_than_the_tensor_it_replaces():
    reasons = []
    for name, build in sorted(gb.ALL_BUILDERS.items()):
        result = onnx_dc.compress(build(), recipe=Recipe(min_elements=0, bits=8))
        for row in result.report.tensors:
            assert row.compressed_bytes < row.original_bytes, (name, row.name)
        for plan in result.plans:
            if plan.skip_reason and "would not be smaller" in plan.skip_reason:
                reasons.append((name, plan.weight.name))
                assert plan.weight.name not in result.compressed
                assert any(d.name == plan.weight.name and d.reason.endswith(plan.skip_reason) for d in result.report.dense)
    assert reasons  # 8-bit codebooks of 256 values do not pay off on the small tensors of these graphs


def test_compress_a_proto_does_not_modify_it():
    model = gb.if_model()
    before = model.SerializeToString()
    result = onnx_dc.compress(model, recipe=Recipe(min_elements=0))
    assert model.SerializeToString() == before
    assert result.saved is None and {r.name for r in result.report.tensors} == {"outer.weight", "then.weight", "else.weight"}


def test_quantized_values_are_what_the_model_holds():
    result = onnx_dc.compress(gb.mlp(), sparsity=0.7)
    restored = onnx_dc.decompress(result.model)
    values = {t.name: nh.to_array(t) for t in restored.graph.initializer}
    for name, tensor in result.compressed.items():
        np.testing.assert_array_equal(values[name], tensor.quantized)
        assert not values[name][~tensor.mask].any()  # pruned weights are exactly zero


def test_progress_callback_and_tensor_compressor_hook():
    calls = []
    seen = []
    from onnx_dc.codec.tensor import compress_tensor

    def compressor(weight, values, settings):
        seen.append((weight.name, weight.kind, values.shape, settings.bits))
        return compress_tensor(values, settings.to_tensor_settings())

    compress_model(gb.mlp(), Recipe(), progress=lambda done, total, name: calls.append((done, total, name)),
                   tensor_compressor=compressor)
    assert calls[0] == (0, 3, "w1") and calls[-1] == (3, 3, "")  # w1, w2, w3 (b1 is a vector, b2 a bias)
    assert seen[0] == ("w1", "fc", (64, 300), 5)


@pytest.mark.parametrize("name", sorted(gb.ALL_BUILDERS))
def test_every_graph_shape_round_trips_and_runs_through_the_library(name, ops_library):
    model = gb.ALL_BUILDERS[name]()
    result = onnx_dc.compress(model, recipe=Recipe(min_elements=0), sparsity=0.6)
    onnx.checker.check_model(result.model, full_check=True)
    restored = onnx_dc.decompress(result.model)
    onnx.checker.check_model(restored, full_check=True)
    assert [n.op_type for g in iter_graphs(restored.graph) for n in g.node] == [
        n.op_type for g in iter_graphs(model.graph) for n in g.node
    ]
    feeds = gb.inputs_for(model)
    for got, want in zip(_run(result.model, feeds, ops_library), _run(restored, feeds)):
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=1e-4, atol=1e-4)
    report = onnx_dc.api.validate(model, result.model, feeds)
    assert report.used_library and all(o.cosine is None or o.cosine > 0.5 for o in report.outputs)


def test_external_data_in_and_out(tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save(gb.mlp(), src, save_as_external_data=True, location="ext.bin", size_threshold=0)
    digest = _sha(tmp_path / "ext.bin")
    result = onnx_dc.compress(src, tmp_path / "out.onnx", external_data=True)
    assert result.saved.external_data_path == tmp_path / "out.onnx.data"
    assert _sha(tmp_path / "ext.bin") == digest
    assert result.report.original_file_bytes == src.stat().st_size + (tmp_path / "ext.bin").stat().st_size
    restored = onnx_dc.decompress(tmp_path / "out.onnx", tmp_path / "restored.onnx")
    onnx.checker.check_model(str(tmp_path / "restored.onnx"), full_check=True)
    assert {t.name for t in restored.graph.initializer} == {"w1", "b1", "w2", "b2", "w3"}


def test_float16_weights_stay_float16():
    result = onnx_dc.compress(gb.float16_mlp(), sparsity=0.5, bits=6)
    assert {r.dtype for r in result.report.tensors} == {"float16"}
    restored = onnx_dc.decompress(result.model)
    assert {t.data_type for t in restored.graph.initializer} == {onnx.TensorProto.FLOAT16}
    out = _run(restored, gb.inputs_for(gb.float16_mlp()))[0]
    assert out.dtype == np.float16


def test_user_mistakes_raise_onnx_dc_errors(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(gb.mlp(), src)
    with pytest.raises(ModelError, match="same file"):
        onnx_dc.compress(src, src)
    with pytest.raises(SettingsError, match="matches no"):
        onnx_dc.compress(src, tmp_path / "o.onnx", bits={"conv*": 8})
    with pytest.raises(ModelError, match="no such file"):
        onnx_dc.decompress(tmp_path / "missing.onnx")
    assert not (tmp_path / "o.onnx").exists()
    bad = gb.mlp()
    values = nh.to_array(bad.graph.initializer[0]).copy()
    values[3, 4] = np.nan
    bad.graph.initializer[0].CopyFrom(nh.from_array(values, "w1"))
    with pytest.raises(InvalidTensorError, match="'w1'"):
        onnx_dc.compress(bad, tmp_path / "nan.onnx")
    assert not (tmp_path / "nan.onnx").exists()


def test_a_tensor_that_keeps_no_weights_is_in_the_warnings_and_the_report():
    result = onnx_dc.compress(gb.mlp(), recipe=Recipe(quality={"w2": 50.0}))
    assert result.warnings == ["tensor 'w2' keeps no weights (--quality w2=50.0): it is all zeros now"]
    assert result.warnings[0] in result.report.notes
    assert next(r for r in result.report.tensors if r.name == "w2").n_kept == 0
    with pytest.raises(SettingsError, match="below 1"):
        onnx_dc.compress(gb.mlp(), sparsity=1)


def test_inspect_refuses_a_model_without_containers_and_says_why():
    plain = gb.mlp()
    with pytest.raises(ModelError, match="holds no onnx-dc containers: it is not a compressed model"):
        onnx_dc.inspect(plain)
    compressed = onnx_dc.compress(plain).model
    assert onnx_dc.inspect(compressed).tensors
    with pytest.raises(ModelError, match="it was decompressed"):
        onnx_dc.inspect(onnx_dc.decompress(compressed))
    all_dense = onnx_dc.compress(plain, recipe=Recipe(exclude=("*",))).model
    with pytest.raises(ModelError, match="onnx-dc left every weight of it dense"):
        onnx_dc.inspect(all_dense)


def test_an_already_compressed_model_is_refused(tmp_path):
    compressed = onnx_dc.compress(gb.mlp(), tmp_path / "c.onnx").model
    calib = {"x": gb.inputs_for(gb.mlp(), batch=16)["x"]}
    for attempt in (lambda: onnx_dc.compress(compressed), lambda: onnx_dc.compress(tmp_path / "c.onnx", tmp_path / "cc.onnx"),
                    lambda: onnx_dc.compress(compressed, calib=calib), lambda: compress_model(compressed, Recipe()),
                    lambda: onnx_dc.sensitivity(compressed, calib)):
        with pytest.raises(ModelError, match="already compressed by onnx-dc.*onnx-dc decompress"):
            attempt()
    assert not (tmp_path / "cc.onnx").exists()
    # A container left without its operators still counts; the decompressed model compresses again.
    stripped = onnx.ModelProto()
    stripped.CopyFrom(compressed)
    del stripped.graph.node[:]
    kept = [opset for opset in stripped.opset_import if opset.domain != "ai.onnx_dc"]
    del stripped.opset_import[:]
    stripped.opset_import.extend(kept)
    with pytest.raises(ModelError, match="already compressed"):
        onnx_dc.compress(stripped)
    assert onnx_dc.compress(onnx_dc.decompress(compressed)).report.tensors


def test_the_compressed_model_says_how_to_run_it_and_decompress_drops_the_hint():
    model = gb.mlp()  # producer graph_builders 1.2, metadata labels=...
    compressed = onnx_dc.compress(model).model
    meta = {e.key: e.value for e in compressed.metadata_props}
    assert meta["labels"] == "t-shirt,trouser,pullover" and "onnx_dc.recipe" in meta
    assert meta["onnx_dc.version"] == onnx_dc.__version__
    hint = meta["onnx_dc.runtime"]
    assert "\n" not in hint and "onnx_dc.ops_library_path()" in hint and "pip install onnx-dc" in hint
    assert "onnx_dc.inference_session" in hint and "onnx-dc decompress" in hint
    assert (compressed.producer_name, compressed.producer_version) == ("graph_builders", "1.2")
    # Without the library onnxruntime names only the operator; the hint is in the model it refuses.
    with pytest.raises(Exception, match=r"ai.onnx_dc:DC\w+\(-1\) is not a registered"):
        ort.InferenceSession(compressed.SerializeToString(), providers=["CPUExecutionProvider"])
    restored = onnx_dc.decompress(compressed)
    restored_meta = [(e.key, e.value) for e in restored.metadata_props]
    assert restored_meta == [(e.key, e.value) for e in compressed.metadata_props if e.key != "onnx_dc.runtime"]
    assert (restored.producer_name, restored.doc_string) == (model.producer_name, model.doc_string)
    # Compressing the decompressed model again replaces the entries instead of repeating them.
    again = onnx_dc.compress(restored).model
    assert sorted(e.key for e in again.metadata_props) == sorted(meta)


def test_inference_session_and_session_options_register_the_library(tmp_path, ops_library, monkeypatch):
    model = gb.mlp()
    result = onnx_dc.compress(model, tmp_path / "c.onnx")
    feeds = gb.inputs_for(model, batch=4)
    expected = _run(result.model, feeds, ops_library)[0]
    for source in (tmp_path / "c.onnx", str(tmp_path / "c.onnx"), result.model, result.model.SerializeToString()):
        session = onnx_dc.inference_session(source)
        np.testing.assert_array_equal(session.run(None, feeds)[0], expected)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    assert onnx_dc.session_options(options) is options
    session = ort.InferenceSession(str(tmp_path / "c.onnx"), onnx_dc.session_options(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, feeds)[0], expected)
    with pytest.raises(ModelError, match="no such file"):
        onnx_dc.inference_session(tmp_path / "missing.onnx")
    with pytest.raises(ModelError, match="onnxruntime cannot load the model"):
        onnx_dc.inference_session(b"not a model")
    monkeypatch.setenv("ONNX_DC_OPS_LIBRARY", str(tmp_path / "missing.so"))
    with pytest.raises(LibraryNotFoundError):
        onnx_dc.session_options()


# ----------------------------------------------------------------------------- the zoo pipeline


def _zoo_path(name: str) -> Path:
    from model_zoo import get_model_path

    return get_model_path(name)


@pytest.mark.parametrize("name", ["lenet_300_100", "lenet5"])
def test_zoo_pipeline_compress_validate_decompress_evaluate(name, tmp_path, ops_library):
    from model_zoo.evaluate import evaluate

    src = _zoo_path(name)
    compressed = tmp_path / f"{name}.dc.onnx"
    result = onnx_dc.compress(src, compressed)
    onnx.checker.check_model(str(compressed), full_check=True)
    kinds = {r.kind for r in result.report.tensors}
    assert kinds == ({"fc"} if name == "lenet_300_100" else {"fc", "conv"})
    assert result.report.ratio > 5  # the defaults prune and quantize every layer

    report = onnx_dc.api.validate(src, compressed)
    assert report.used_library and report.outputs[0].cosine > 0.95

    restored = tmp_path / f"{name}.restored.onnx"
    onnx_dc.decompress(compressed, restored)
    onnx.checker.check_model(str(restored), full_check=True)

    original = evaluate(src)
    through_library = evaluate(compressed)
    decompressed = evaluate(restored, custom_ops=False)
    assert through_library.custom_ops and not decompressed.custom_ops
    # Same quantized weights: the library and the decompressed model agree on (nearly) every image.
    assert abs(through_library.n_correct - decompressed.n_correct) <= 2
    # The defaults keep the model useful: at most 1.5 points of top-1 lost without any calibration.
    assert through_library.accuracy >= original.accuracy - 0.015


def test_models_over_the_protobuf_limit_end_to_end(tmp_path, monkeypatch, ops_library):
    """The >2 GB path (external data in and out, sessions from files), with the limit lowered for the test."""
    from onnx_dc.graph import model_io

    src = tmp_path / "big.onnx"
    onnx.save(gb.mlp(), src, save_as_external_data=True, location="big.bin", size_threshold=0)
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT_BYTES", 4_000)
    result = onnx_dc.compress(src, tmp_path / "out.onnx")
    assert result.saved.external_data_path == tmp_path / "out.onnx.data"
    assert result.warnings == []  # checked through its structure (tensors without their data)
    report = onnx_dc.api.validate(src, tmp_path / "out.onnx", gb.inputs_for(gb.mlp()))
    assert report.used_library and report.outputs[0].cosine > 0.9
    onnx_dc.decompress(tmp_path / "out.onnx", tmp_path / "restored.onnx")
    assert (tmp_path / "restored.onnx.data").exists()
    monkeypatch.undo()
    onnx.checker.check_model(str(tmp_path / "restored.onnx"), full_check=True)
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)
