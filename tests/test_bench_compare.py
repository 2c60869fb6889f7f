"""Tests of the side-by-side benchmark (benchmarks/compare.py and its modules).

The end-to-end test runs the script in ``--quick`` mode on one LeNet and one small
real model (the direction classifier) so the benchmark cannot rot; the other tests
check its building blocks (pre-steps that must not change what a model computes,
the fidelity numbers, the latency protocol, the target verdicts). No test checks
timing values: machines are noisy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks import compare, compare_methods
from benchmarks.dc_settings import SETTINGS, settings_for

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "compare.py"


def _session(model: onnx.ModelProto | bytes) -> ort.InferenceSession:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _constant_model() -> onnx.ModelProto:
    """x[1,4] @ W (Constant node) + b (Constant node)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    b = rng.normal(size=(3,)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
        helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(b, "b")),
        helper.make_node("Constant", [], ["s"], value_float=2.0),
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y0"]),
        helper.make_node("Mul", ["y0", "s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _gemm_model(trans_b: int, with_bias: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 6) if trans_b else (6, 5)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if with_bias:
        inits.append(numpy_helper.from_array(rng.normal(size=(5,)).astype(np.float32), "c"))
        inputs.append("c")
    graph = helper.make_graph(
        [helper.make_node("Gemm", inputs, ["y"], transB=trans_b)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# --------------------------------------------------------------------------- pre-steps


def test_constants_to_initializers_keeps_outputs_and_moves_tensors():
    model = _constant_model()
    converted, count = compare_methods.constants_to_initializers(model)
    assert count == 2  # w and b; the value_float scalar stays a Constant node
    names = {t.name for t in converted.graph.initializer}
    assert {"w", "b"} <= names
    assert [n.output[0] for n in converted.graph.node if n.op_type == "Constant"] == ["s"]
    onnx.checker.check_model(converted, full_check=True)
    x = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}
    np.testing.assert_array_equal(_session(model).run(None, x)[0], _session(converted).run(None, x)[0])
    assert compare_methods.has_constant_weights(model)
    assert not compare_methods.has_constant_weights(converted)
    assert len(model.graph.node) == 6  # the input model is not modified


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_to_matmul_computes_the_same(trans_b, with_bias):
    model = _gemm_model(trans_b, with_bias)
    converted, count = compare_methods.gemm_to_matmul(model)
    assert count == 1
    assert [n.op_type for n in converted.graph.node] == (["MatMul", "Add"] if with_bias else ["MatMul"])
    onnx.checker.check_model(converted, full_check=True)
    x = {"x": np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)}
    np.testing.assert_allclose(_session(model).run(None, x)[0], _session(converted).run(None, x)[0], rtol=1e-5, atol=1e-5)


def test_gemm_to_matmul_leaves_non_plain_gemm_alone():
    model = _gemm_model(1, True)
    model.graph.node[0].attribute.append(helper.make_attribute("alpha", 0.5))
    converted, count = compare_methods.gemm_to_matmul(model)
    assert count == 0
    assert [n.op_type for n in converted.graph.node] == ["Gemm"]


def test_matmul_nbits_reports_not_applicable_without_matmul_weights():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(np.ones((2, 1, 3, 3), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    candidate = compare_methods.matmul_nbits_candidate(model)
    assert not candidate.ok
    assert candidate.failure.startswith("n/a")


def _matmul_model() -> onnx.ModelProto:
    w = np.random.default_rng(3).normal(size=(64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("bits, tolerance", [(4, 0.2), (8, 0.02)])
def test_matmul_nbits_runs_at_4_and_8_bits(bits, tolerance):
    model = _matmul_model()
    candidate = compare_methods.matmul_nbits_candidate(model, bits=bits)
    assert candidate.ok and candidate.method == f"MatMulNBits {bits}-bit"
    quantized = onnx.load_from_string(candidate.model_bytes)
    assert [n.op_type for n in quantized.graph.node] == ["MatMulNBits"]
    assert helper.get_attribute_value(next(a for a in quantized.graph.node[0].attribute if a.name == "bits")) == bits
    x = {"x": np.random.default_rng(4).normal(size=(5, 64)).astype(np.float32)}
    expected = _session(model).run(None, x)[0]
    got = _session(candidate.model_bytes).run(None, x)[0]
    assert np.abs(got - expected).max() < tolerance * np.abs(expected).max()


def test_zstd_candidate_round_trips():
    data = _constant_model().SerializeToString() * 4
    candidate = compare_methods.zstd_candidate(data)
    assert candidate.ok
    assert candidate.model_bytes == data
    assert candidate.stored_bytes < len(data)


# --------------------------------------------------------------------------- measurements


def test_output_fidelity():
    a = [np.array([1.0, 0.0]), np.array([2.0])]
    cosine, max_abs = compare.output_fidelity(a, a)
    assert cosine == pytest.approx(1.0) and max_abs == 0.0
    b = [np.array([0.0, 1.0]), np.array([0.0])]
    cosine, max_abs = compare.output_fidelity(a, b)
    assert cosine == pytest.approx(0.0)
    assert max_abs == pytest.approx(2.0)
    cosine, _ = compare.output_fidelity([np.array([3.0, 4.0])], [np.array([4.0, 3.0])])
    assert cosine == pytest.approx(24.0 / 25.0)


def test_measure_latency_times_every_session_interleaved():
    calls: list[str] = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def run(self, _names, _feed):
            calls.append(self.name)
            return []

    sessions = {"a": Fake("a"), "b": Fake("b")}
    timings = compare.measure_latency(sessions, {}, budget_seconds=0.0, min_rounds=4)
    assert set(timings) == {"a", "b"}
    assert all(len(t.samples) == 4 for t in timings.values())
    assert all(t.median_ms >= 0 for t in timings.values())
    # After warm-up, each round runs every session's block before the next round starts.
    runs_a, runs_b = calls.count("a"), calls.count("b")
    assert runs_a >= 2 + 4 and runs_b >= 2 + 4


def _row(method, family, ratio, metric, latency_rel=1.0):
    return {"method": method, "family": family, "ratio": ratio, "metric": metric, "latency_rel": latency_rel,
            "latency_decompressed_rel": 1.0, "status": "ok"}


def test_check_targets_verdicts():
    rows = [
        _row("original", "original", 1.0, 1.0),
        _row("quantize_dynamic int8", "peer", 4.0, 0.95),
        _row("onnx-dc tuned", "onnx-dc", 9.0, 0.96, latency_rel=1.05),
        _row("onnx-dc other", "onnx-dc", 20.0, 0.5, latency_rel=1.5),
    ]
    targets = compare.check_targets(rows)
    vs = targets["vs_quantize_dynamic"]
    assert vs["best_onnx_dc"] == "onnx-dc tuned"  # the 20x row has a worse metric than the peer
    assert vs["ratio_multiple"] == pytest.approx(9.0 / 4.0)
    assert vs["met"]
    assert not targets["preserved"]["met"]  # nothing reaches the preserved threshold
    assert targets["latency"]["onnx-dc tuned"]["met"]
    assert not targets["latency"]["onnx-dc other"]["met"]

    rows[2]["metric"] = 0.99
    rows[2]["ratio"] = 7.0
    targets = compare.check_targets(rows)
    assert not targets["vs_quantize_dynamic"]["met"]  # 7x < 2 * 4x
    assert targets["preserved"]["best_onnx_dc"] == "onnx-dc tuned"
    assert not targets["preserved"]["met"]  # preserved, but below 8x


def test_check_targets_faithful_for_transformers_only():
    rows = [
        _row("original", "original", 1.0, 1.0),
        _row("quantize_dynamic int8", "peer", 4.0, 0.75),
        _row("onnx-dc near-lossless", "onnx-dc", 6.03, 0.97),
        _row("onnx-dc defaults", "onnx-dc", 6.95, 0.87),
    ]
    assert "faithful" not in compare.check_targets(rows)
    faithful = compare.check_targets(rows, transformer=True)["faithful"]
    assert faithful["met"] and faithful["best_onnx_dc"] == "onnx-dc near-lossless"  # 6.95x is below 0.95
    rows[2]["ratio"] = 5.9
    assert not compare.check_targets(rows, transformer=True)["faithful"]["met"]
    rows[2]["metric"] = 0.94
    assert compare.check_targets(rows, transformer=True)["faithful"]["best_onnx_dc"] is None


def test_check_targets_without_a_runnable_peer():
    rows = [_row("original", "original", 1.0, 1.0), _row("onnx-dc tuned", "onnx-dc", 9.0, 1.0)]
    rows.append({"method": "quantize_dynamic int8", "family": "peer", "status": "ValueError: x", "ratio": None})
    targets = compare.check_targets(rows)
    assert not targets["vs_quantize_dynamic"]["met"]
    assert targets["preserved"]["met"]


def test_settings_registry_covers_every_benchmark_model():
    from benchmarks.compare_cases import LENET_MODELS, REAL_MODELS

    assert set(SETTINGS) == set(LENET_MODELS + REAL_MODELS)
    for name in SETTINGS:
        entry = settings_for(name)
        assert entry.calibrated.why and entry.calibrated.why != "initial"
        assert entry.calibrated.recipe().search is None
        if entry.automatic is None:
            assert entry.automatic_skipped and entry.automatic_skipped != "initial"
        else:
            assert entry.automatic.why and entry.automatic.why != "initial"
            assert (entry.automatic.min_cosine is None) != (entry.automatic.max_drop is None)
    assert "*dfl*" in settings_for("nudenet-320n").calibrated.exclude
    # The transformers' compact row (twice int8's ratio at its fidelity) keeps every model exclusion.
    from benchmarks.compare_cases import TRANSFORMER_MODELS

    for name in TRANSFORMER_MODELS:
        entry = settings_for(name)
        if entry.compact is not None:
            assert entry.compact.why and entry.compact.recipe().search is None
            assert set(entry.exclude) <= set(entry.compact.exclude)
    assert settings_for("whisper-tiny-encoder").compact.bits == 4


def test_case_caches_only_its_own_feeds():
    """A metric may run feeds of its own (a recurrent model's carried state): they are never cached by id."""
    from benchmarks.compare_cases import BenchCase, SplitSizes

    feeds = [{"x": np.array([[float(i)]], np.float32)} for i in range(3)]
    calls = []

    def reference(feed):
        calls.append(float(feed["x"][0, 0]))
        return [feed["x"] * 2]

    def metric(ref, cand):
        # Temporary dicts: Python reuses their ids, so an id-keyed cache would mix them up.
        temporary = [float(ref({"x": feed["x"] + 10})[0][0, 0]) for feed in feeds for _ in range(2)]
        own = [float(ref(feed)[0][0, 0]) for feed in feeds]
        same = [float(cand(feed)[0][0, 0]) for feed in feeds]
        return {"metric": float(own == same), "temporary": float(temporary == [20, 20, 22, 22, 24, 24])}

    case = BenchCase("t", "t", "m", True, b"", [], feeds, feeds[0], SplitSizes(0, 3), _metric=metric)
    evaluation = case.evaluate(reference, reference)
    assert evaluation.details == {"metric": 1.0, "temporary": 1.0}
    assert [o.tolist() for o in evaluation.outputs] == [[0.0], [2.0], [4.0]]
    case.evaluate(reference, reference)
    assert calls.count(0.0) == 3  # as the reference once (then cached), as the candidate in both evaluations


def test_table_shows_task_details_and_extra_thread_columns():
    from benchmarks.compare_report import _model_table

    row = {"method": "original", "family": "original", "status": "ok", "stored_bytes": 1000, "ratio": 1.0,
           "metric": 1.0, "metric_details": {"embedding_cosine": 1.0, "recall_at_1": 0.875}, "cosine": 1.0,
           "max_abs_diff": 0.0, "latency_ms": 2.5, "latency_rel": 1.0, "latency_2_threads_rel": 1.0,
           "build_seconds": 0.0, "notes": []}
    failed = {"method": "onnx-dc calibrated", "family": "onnx-dc", "status": "not run (--skip-calibrated)", "notes": []}
    result = {"metric_name": "neighbour_agreement vs original", "rows": [row, failed],
              "detail_keys": {"embedding_cosine": "cosine", "recall_at_1": "recall@1"}, "extra_threads": [2]}
    header, rule, line, skipped = _model_table(result)
    assert "task details" in header and "vs original, 2 threads" in header
    assert rule.count("---") == header.count("|") - 1
    assert "cosine 1, recall@1 0.875" in line and line.count("|") == header.count("|")
    assert skipped.count("|") == header.count("|") and "--skip-calibrated" in skipped


def test_unknown_model_is_a_one_line_error(capsys):
    assert compare.main(["--models", "no-such-model", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-model" in err[0]
    assert compare.main(["--models", "lenet5", "--skip-automatic", "no-such-model", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-model" in err[0]
    assert compare.main(["--models", "lenet5", "--skip-calibrated", "no-such-model", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-model" in err[0]
    assert compare.main(["--models", "lenet5", "--latency-threads", "two", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--latency-threads" in err[0]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--models", "lenet_300_100,ppocr-mobile-v2-cls", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out, completed.stdout, json.loads((out / "compare.json").read_text())


@pytest.mark.slow  # the full suite only: the benchmark's quick run (module fixture)
def test_quick_run_writes_table_json_and_plots(quick_run):
    out, stdout, data = quick_run
    markdown = (out / "compare.md").read_text()
    assert markdown.strip() == stdout.strip()
    for name in ("lenet_300_100", "ppocr-mobile-v2-cls"):
        assert f"## {name}" in markdown
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "## Targets (real models)" in markdown
    assert "## validate and the task metric through both paths" in markdown
    assert [m["model"] for m in data["models"]] == ["lenet_300_100", "ppocr-mobile-v2-cls"]


@pytest.mark.slow  # the full suite only: the benchmark's quick run (module fixture)
def test_merge_rewrites_the_outputs_from_saved_runs(quick_run, tmp_path):
    out, stdout, data = quick_run
    assert compare.main(["--merge", str(out), "--out", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "compare.json").read_text())
    assert merged["models"] == data["models"]
    assert (tmp_path / "compare.md").read_text().split("\n", 3)[3] == (out / "compare.md").read_text().split("\n", 3)[3]
    assert (tmp_path / "ppocr-mobile-v2-cls.png").read_bytes()[:4] == b"\x89PNG"
    assert compare.main(["--merge", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2


@pytest.mark.slow  # the full suite only: the benchmark's quick run (module fixture)
def test_merge_takes_a_model_measured_twice_from_the_last_run(quick_run, tmp_path):
    out, _, data = quick_run
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    again = json.loads(json.dumps(data))
    again["models"] = [dict(data["models"][0], description="re-run")]
    (rerun / "compare.json").write_text(json.dumps(again))
    merged_dir = tmp_path / "merged"
    assert compare.main(["--merge", str(out), str(rerun), "--out", str(merged_dir)]) == 0
    merged = json.loads((merged_dir / "compare.json").read_text())
    assert [m["model"] for m in merged["models"]] == [m["model"] for m in data["models"]]
    assert merged["models"][0]["description"] == "re-run" and merged["models"][1] == data["models"][1]


@pytest.mark.slow  # the full suite only: the benchmark's quick run (module fixture)
def test_quick_run_rows(quick_run):
    _, _, data = quick_run
    for model in data["models"]:
        rows = {row["method"]: row for row in model["rows"]}
        original = rows["original"]
        assert original["ratio"] == 1.0 and original["cosine"] == 1.0 and original["max_abs_diff"] == 0.0
        assert original["latency_rel"] == 1.0
        zstd = rows["zstd -19"]
        assert zstd["ratio"] > 1.0 and zstd["metric"] == original["metric"] and zstd["max_abs_diff"] == 0.0
        for method in ("onnx-dc defaults", "onnx-dc calibrated"):
            row = rows[method]
            assert row["status"] == "ok"
            assert row["ratio"] > 1.0
            # The operator library and the decompressed model compute the same thing.
            assert row["metric_decompressed"] == row["metric"]
            assert row["library_vs_decompressed_max_abs_diff"] < 1e-3
            assert row["validate"]["passed"], row["validate"]
            assert row["latency_ms"] > 0 and row["latency_decompressed_ms"] > 0
        for row in model["rows"]:
            if row["status"] == "ok":
                assert row["stored_bytes"] > 0 and row["latency_samples"] >= 3
                assert -1.0 <= row["cosine"] <= 1.0 + 1e-9
    lenet = {row["method"]: row for row in data["models"][0]["rows"]}
    assert lenet["original"]["metric"] > 0.8  # top-1 accuracy on the test images
    assert lenet["MatMulNBits 4-bit"]["status"] == "ok"  # after the Gemm -> MatMul pre-step
    cls = {row["method"]: row for row in data["models"][1]["rows"]}
    assert cls["quantize_dynamic int8 (Constant->initializer)"]["status"] == "ok"
    assert cls["original"]["metric"] == 1.0  # agreement of the original with itself
    targets = data["models"][1]["targets"]
    assert {"vs_quantize_dynamic", "preserved", "latency"} <= set(targets)
    for model in data["models"]:
        automatic = next(row for row in model["rows"] if row["method"] == "onnx-dc automatic")
        assert automatic["status"].startswith("not run in --quick")


@pytest.mark.slow  # the full suite only: the benchmark's quick run (module fixture)
def test_quick_mode_never_writes_the_measured_results(quick_run, tmp_path, monkeypatch):
    out, _, _ = quick_run
    quick_dir = tmp_path / "quick"
    quick_dir.mkdir()
    (quick_dir / "compare.json").write_text((out / "compare.json").read_text())
    measured = compare.RESULTS_DIR / "compare.md"
    before = measured.read_bytes() if measured.exists() else None
    monkeypatch.setattr(compare, "QUICK_RESULTS_DIR", quick_dir)
    assert compare.main(["--render-only", "--quick"]) == 0
    assert (quick_dir / "compare.md").is_file()
    assert (measured.read_bytes() if measured.exists() else None) == before


@pytest.mark.slow  # the full suite only: a real transformer through the benchmark
def test_quick_run_of_a_transformer_case(tmp_path):
    """Silero VAD (2.3 MB; weights in If branches, a scalar input, a recurrent state): the transformers' path."""
    out = tmp_path / "silero"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--models", "silero-vad", "--skip-calibrated", "silero-vad",
         "--latency-threads", "2", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (model,) = json.loads((out / "compare.json").read_text())["models"]
    rows = {row["method"]: row for row in model["rows"]}
    assert set(rows) >= {"original", "zstd -19", "MatMulNBits 4-bit", "MatMulNBits 8-bit", "onnx-dc defaults",
                         "onnx-dc --sparsity 0 --bits 8", "onnx-dc calibrated", "onnx-dc automatic"}
    assert rows["original"]["metric"] == 1.0 and rows["original"]["latency_2_threads_rel"] == 1.0
    assert rows["MatMulNBits 8-bit"]["status"].startswith("n/a")  # Conv and LSTM only
    assert rows["onnx-dc calibrated"]["status"].endswith("(--skip-calibrated)")
    for method in ("onnx-dc defaults", "onnx-dc --sparsity 0 --bits 8"):
        row = rows[method]
        assert row["status"] == "ok" and row["ratio"] > 1.0 and row["validate"]["passed"]
        assert {"probability_mean_abs_diff", "teacher_forced_agreement"} <= set(row["metric_details"])
        assert row["latency_2_threads_ms"] > 0
    markdown = (out / "compare.md").read_text()
    assert "| task details |" in markdown and "vs original, 2 threads" in markdown
