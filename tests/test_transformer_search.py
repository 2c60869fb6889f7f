"""Transformers: how they are recognised, their data-free defaults, the search's near-lossless grid point, task metrics.

The models are the small exported BERT / GPT of tests/models (see tests/test_transformers.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graph_builders import ops_library  # noqa: F401  (fixture)
from onnx import TensorProto, numpy_helper
from onnx import helper as h

import onnx_dc
from onnx_dc.api.recipe import Recipe, SearchRecipe
from onnx_dc.calibration.metrics import load_task_metric
from onnx_dc.calibration.search import default_grids
from onnx_dc.calibration.transformer_search import TRANSFORMER_BITS, TRANSFORMER_SEARCH_SPARSITIES
from onnx_dc.errors import CalibrationError, SettingsError
from onnx_dc.graph.defaults import DEFAULTS, TRANSFORMER_DEFAULTS
from onnx_dc.graph.transformers import is_transformer, transformer_evidence

MODELS = Path(__file__).resolve().parent / "models"
REPO = Path(__file__).resolve().parent.parent
LENET = REPO / "model_zoo" / "models" / "lenet_300_100.onnx"


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m onnx_dc ARGS`` in ``cwd`` (this checkout's package)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "onnx_dc", *args], cwd=cwd, capture_output=True, text=True, env=env)


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(MODELS / f"{name}.onnx"))


def bert_inputs(n: int, length: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((n, length), np.int64)
    mask[::3, length - 3:] = 0
    return {
        "input_ids": rng.integers(0, 96, (n, length)).astype(np.int64),
        "attention_mask": mask,
        "token_type_ids": np.zeros((n, length), np.int64),
    }


def mlp_with_softmax() -> onnx.ModelProto:
    """A classifier: MatMul with a weight, then Softmax: not attention, not a transformer."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((32, 10)).astype(np.float32), "w")
    graph = h.make_graph(
        [h.make_node("MatMul", ["x", "w"], ["logits"]), h.make_node("Softmax", ["logits"], ["p"], axis=-1)],
        "mlp", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [h.make_tensor_value_info("p", TensorProto.FLOAT, ["n", 10])], [w],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


# --------------------------------------------------------------------------- recognising transformers


@pytest.mark.parametrize("name", ["bert_ts", "bert_dynamo", "gpt_ts", "gpt_dynamo", "bert_ort_opt1"])
def test_exported_and_fused_transformers_are_recognised(name):
    assert is_transformer(load(name))


def test_attention_written_out_is_recognised_without_layer_norm():
    model = load("bert_ts")
    for node in model.graph.node:  # hide the normalisations: the attention Softmax alone must do
        if node.op_type == "LayerNormalization":
            node.op_type = "LayerNormalizationHidden"
    assert "attention Softmax" in transformer_evidence(model)


def test_cnns_and_classifiers_are_not_transformers():
    assert not is_transformer(onnx.load(str(LENET)))
    assert not is_transformer(mlp_with_softmax())


# --------------------------------------------------------------------------- data-free defaults


def test_transformer_fc_weights_take_the_transformer_defaults():
    result = onnx_dc.compress(load("bert_ts"))
    fc = [p for p in result.plans if p.settings is not None and p.weight.kind == "fc"]
    assert fc
    for plan in fc:
        assert plan.settings.bits == TRANSFORMER_DEFAULTS["fc"]["bits"]
        assert plan.settings.sparsity == TRANSFORMER_DEFAULTS["fc"]["sparsity"]
        assert plan.settings.sources["bits"] == "default for fc in a transformer"
    embeddings = [p for p in result.plans if p.settings is not None and p.weight.kind == "other"]
    assert embeddings and all(p.settings.bits == TRANSFORMER_DEFAULTS["other"]["bits"] for p in embeddings)
    assert any(note.startswith("transformer (5 LayerNormalization nodes)") for note in result.report.notes)


def test_a_kind_rule_overrides_the_transformer_defaults():
    result = onnx_dc.compress(load("bert_ts"), bits="fc=5")
    fc = [p for p in result.plans if p.settings is not None and p.weight.kind == "fc"]
    assert {p.settings.bits for p in fc} == {5}
    assert {p.settings.sparsity for p in fc} == {TRANSFORMER_DEFAULTS["fc"]["sparsity"]}


def test_cnn_defaults_are_unchanged():
    result = onnx_dc.compress(str(LENET))
    fc = [p for p in result.plans if p.settings is not None]
    assert fc and all(p.settings.bits == DEFAULTS["fc"]["bits"] for p in fc)
    assert all(p.settings.sparsity == DEFAULTS["fc"]["sparsity"] for p in fc)
    assert all(p.settings.sources["bits"] == "default for fc" for p in fc)
    assert not any(note.startswith("transformer") for note in result.report.notes)


# --------------------------------------------------------------------------- the search


def test_transformer_grid_starts_nearly_lossless():
    sparsities, bits_fc, _ = default_grids(36, transformer=True)
    assert (sparsities, bits_fc) == (TRANSFORMER_SEARCH_SPARSITIES, TRANSFORMER_BITS)
    assert 0.0 in sparsities and 8 in bits_fc


@pytest.mark.parametrize("min_cosine", [0.9999, 0.999])
def test_tight_cosine_budget_is_met_on_held_out_inputs(min_cosine, ops_library):
    calib = bert_inputs(40)
    held_out = bert_inputs(24, seed=1)
    result = onnx_dc.compress(load("bert_ts"), recipe=Recipe(search=SearchRecipe(min_cosine=min_cosine)), calib=calib)
    tuned = result.calibration
    assert tuned.budget_met and tuned.metrics.cosine >= min_cosine
    assert any(line.startswith("transformer:") for line in tuned.steps)
    # the embedding table (no statistics, not searched) keeps the standard 8 bits, named in the recorded recipe
    embedding = result.recipe.settings().resolve("word_embeddings.weight", "other", transformer=True)
    assert embedding.bits == DEFAULTS["other"]["bits"] and embedding.sources["bits"] != "default for other in a transformer"
    original = run(load("bert_ts"), held_out)
    compressed = run(onnx_dc.decompress(result.model), held_out)
    assert cosine(original, compressed) >= min_cosine - 2e-4  # inputs the search never saw


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# --------------------------------------------------------------------------- task metric


def last_token_agreement(original: list[np.ndarray], compressed: list[np.ndarray]) -> float:
    """Share of sequences whose last position keeps its arg-max feature (a toy task metric)."""
    return float(np.mean(original[0][:, -1].argmax(-1) == compressed[0][:, -1].argmax(-1)))


def test_search_with_a_callable_task_metric_records_its_name(ops_library):
    recipe = Recipe(search=SearchRecipe(metric=last_token_agreement, min_metric=1.0))
    result = onnx_dc.compress(load("bert_ts"), recipe=recipe, calib=bert_inputs(40))
    tuned = result.calibration
    assert tuned.budget_met and tuned.metrics.task_metric == 1.0
    spec = f"{__name__}:last_token_agreement"
    assert recipe.search.to_dict()["metric"] == spec
    assert "task metric 1 (budget >= 1)" in tuned.format_summary()


def test_task_metric_from_a_module_spec_on_the_command_line(tmp_path):
    (tmp_path / "my_metric.py").write_text(
        "import numpy as np\n"
        "def score(original, compressed):\n"
        "    return float(np.mean(original[0].argmax(-1) == compressed[0].argmax(-1)))\n"
    )
    np.savez(tmp_path / "calib.npz", **bert_inputs(40))
    out = tmp_path / "out.onnx"
    done = cli(["compress", str(MODELS / "bert_ts.onnx"), "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
                "--metric", "my_metric:score", "--min-metric", "0.9", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    recorded = onnx_dc.inspect(str(out)).recipe.search
    assert recorded is None or recorded.metric == "my_metric:score"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("math:no_such_function", "has no attribute 'no_such_function'"),
        ("math:pi", "is a float, not a function"),
        ("justaname", "must be 'module:function'"),
    ],
)
def test_bad_metric_specs_are_one_line_errors(spec, message):
    with pytest.raises(SettingsError, match=message) as raised:
        load_task_metric(spec)
    assert "\n" not in str(raised.value)


def test_a_metric_that_returns_no_number_is_a_one_line_error():
    metric = load_task_metric(lambda original, compressed: "good")
    with pytest.raises(CalibrationError, match="returned str, expected a float score"):
        metric([np.zeros(2)], [np.zeros(2)])


def test_metric_and_its_budget_go_together():
    with pytest.raises(SettingsError, match="--metric and --min-metric go together"):
        SearchRecipe(metric="math:fsum")
    with pytest.raises(SettingsError, match="--metric and --min-metric go together"):
        SearchRecipe(min_metric=0.5)


def test_bad_metric_on_the_command_line_exits_with_one_line(tmp_path):
    np.savez(tmp_path / "calib.npz", **bert_inputs(8))
    done = cli(["compress", str(MODELS / "bert_ts.onnx"), "-o", str(tmp_path / "o.onnx"), "--calib",
                str(tmp_path / "calib.npz"), "--metric", "no_such_module_xyz:f", "--min-metric", "0.5"], tmp_path)
    assert done.returncode == 2
    assert "cannot import module 'no_such_module_xyz'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_bisection_between_checked_configurations_finds_the_last_passing_one():
    from onnx_dc.calibration.metrics import OutputMetrics
    from onnx_dc.calibration.transformer_search import bisect_gap as _bisect_gap

    full = [{"layer": i} for i in range(40)]  # stand-ins for configurations; passing up to index 17
    path = [full[0], full[10], full[30], full[39]]
    checked = [OutputMetrics(0.0, 1.0 - i / 1000) for i in (0, 10, 30, 39)]
    runs: list[int] = []

    def measure(config):
        runs.append(config["layer"])
        return OutputMetrics(0.0, 1.0 - config["layer"] / 1000)

    best = _bisect_gap(full, path, checked, 1, measure, lambda m: m.cosine >= 1.0 - 17.5 / 1000)
    assert best == 2 and path[2] is full[17] and checked[2].cosine == pytest.approx(0.983)
    assert runs == [20, 15, 17, 18]  # four runs at most


def test_embedding_tables_are_searched_and_their_bits_recorded(monkeypatch, ops_library):
    from onnx_dc.calibration import transformer_search

    monkeypatch.setattr(transformer_search, "TRANSFORMER_TABLE_MIN_ELEMENTS", 1000)  # the test model's word table has 1 600
    result = onnx_dc.compress(load("bert_ts"), recipe=Recipe(search=SearchRecipe(min_cosine=0.999)), calib=bert_inputs(40))
    assert "embedding table word_embeddings.weight: 5 candidates (all measured)" in result.calibration.steps
    assert result.calibration.budget_met
    recorded = result.recipe.settings().resolve("word_embeddings.weight", "other", transformer=True)
    (row,) = [t for t in result.report.tensors if t.name == "word_embeddings.weight"]
    assert recorded.sources["bits"] == "--bits word_embeddings.weight=" + str(row.bits)


def test_calib_alone_on_a_transformer_fits_with_its_recipe(ops_library):
    from onnx_dc.api.recipe import CalibrationRecipe
    from onnx_dc.calibration.options import CalibrationOptions
    from onnx_dc.calibration.transformer_search import TRANSFORMER_CALIB_REFIT_ROUNDS, calib_fit_options

    fitted = calib_fit_options(CalibrationOptions())
    assert (fitted.sequential, fitted.refit_weights, fitted.refit_rounds, fitted.criterion) == (
        False, False, TRANSFORMER_CALIB_REFIT_ROUNDS, "activation"
    )
    result = onnx_dc.compress(load("bert_ts"), calib=bert_inputs(16))
    assert any(note.startswith("transformer: layers fitted on the original model's statistics") for note in result.report.notes)
    explicit = Recipe(calibration=CalibrationRecipe(options=CalibrationOptions(refit_rounds=1)))
    result = onnx_dc.compress(load("bert_ts"), recipe=explicit, calib=bert_inputs(16))
    assert not any(note.startswith("transformer: layers fitted") for note in result.report.notes)
