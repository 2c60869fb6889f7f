"""Tests of onnx_dc.calibration.search: the search respects its budget on held-out data and is reproducible."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_dc
from onnx_dc.api.recipe import Recipe, SearchRecipe
from calibration_models import classifier, inputs, labelled
from onnx_dc.calibration.budget import Budget
from onnx_dc.calibration.search_path import Candidate, _allocation_path, _hull
from onnx_dc.calibration.data import load_calibration
from onnx_dc.calibration.capture import run_model
from onnx_dc.api.cli import main
from onnx_dc.errors import CalibrationError, SettingsError
from onnx_dc.graph.restore import decompress_model

GRID = {"sparsities": (0.0, 0.5, 0.8, 0.9), "bits": (2, 4, 6)}


def searching(seed: int = 0, **budget) -> Recipe:
    """A recipe searching the test grid within ``budget`` (SearchRecipe's fields)."""
    return Recipe(seed=seed, search=SearchRecipe(**{**GRID, **budget}))


@pytest.fixture(scope="module")
def model():
    return classifier(seed=7)


@pytest.fixture(scope="module")
def calib():
    return {"x": inputs(600, seed=8)}


@pytest.fixture(scope="module")
def evaluation(model):
    return labelled(model, 500, seed=9)


def run_compressed(result, data):
    runnable = onnx.ModelProto()
    runnable.CopyFrom(result.model)
    decompress_model(runnable)
    return run_model(runnable, data)["logits"]


def cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class TestBudget:
    def test_checks(self):
        with pytest.raises(SettingsError):
            Budget()
        with pytest.raises(SettingsError):
            Budget(min_cosine=1.5)
        with pytest.raises(SettingsError):
            Budget(max_drop=-1)
        assert Budget(max_drop=0.5).describe() == "top-1 drop <= 0.5 pp"


class TestPath:
    def cand(self, size, error):
        return Candidate(0.0, 4, size, error, 0.0, np.zeros(1), None, 4)

    def test_hull_keeps_the_lower_convex_front(self):
        points = [self.cand(100, 0.0), self.cand(80, 0.5), self.cand(60, 0.2), self.cand(40, 1.0), self.cand(50, 2.0), self.cand(10, 5.0)]
        hull = _hull(points)
        assert [c.size_bytes for c in hull] == [100, 60, 40, 10]

    def test_path_sizes_decrease_and_errors_increase(self):
        hulls = {
            "a": [self.cand(100, 0.0), self.cand(50, 0.1), self.cand(20, 1.0)],
            "b": [self.cand(30, 0.0), self.cand(10, 0.5)],
        }
        path = _allocation_path(hulls)
        sizes = [sum(c.size_bytes for c in config.values()) for config in path]
        errors = [sum(c.output_error for c in config.values()) for config in path]
        assert sizes == sorted(sizes, reverse=True) and errors == sorted(errors)
        assert len(path) == 4
        # the cheapest step first: a 100->50 (0.1 per 50 B) before b 30->10 (0.5 per 20 B)
        assert path[1]["a"].size_bytes == 50 and path[1]["b"].size_bytes == 30


class TestSearch:
    def test_max_drop_is_met_on_the_held_out_data(self, tmp_path, model, calib, evaluation):
        out = tmp_path / "c.onnx"
        result = onnx_dc.compress(model, out, searching(max_drop=1.0), calib=calib, eval_data=evaluation)
        tuned = result.calibration
        assert tuned.budget_met and out.exists()
        data = load_calibration({"x": evaluation["x"]}, model)
        original = run_model(model, data)["logits"].argmax(1)
        compressed = run_compressed(result, data).argmax(1)
        labels = evaluation["labels"]
        drop = 100 * (np.mean(original == labels) - np.mean(compressed == labels))
        assert drop <= 1.0 + 1e-9
        assert tuned.metrics.accuracy == pytest.approx(np.mean(compressed == labels))
        assert result.report.ratio > 4
        assert {c.name for c in tuned.choices} == {"fc0.weight", "fc1.weight"}  # fc2 is below --min-elements
        assert "budget met" in tuned.format_summary()
        # the file on disk is the model that was verified
        on_disk = onnx.load(str(out))
        assert [t.raw_data for t in on_disk.graph.initializer] == [t.raw_data for t in result.model.graph.initializer]

    def test_min_cosine_on_a_held_out_part_of_the_calibration_data(self, model, calib):
        result = onnx_dc.compress(model, recipe=searching(3, min_cosine=0.999), calib=calib)
        tuned = result.calibration
        assert tuned.budget_met and tuned.n_search_samples == 120 and tuned.n_fit_samples == 480
        _, held_out = load_calibration(calib, model).split(120, seed=3)
        reference = run_model(model, held_out)["logits"]
        assert cosine(reference, run_compressed(result, held_out)) >= 0.999
        # the search ran the data in batches of 64, this run in one: DCMatMul's bf16x3 arithmetic depends on the rows
        # per call (AMX tiles from 16 rows) within 1e-5 of the outputs, so the cosines agree to about 1e-8
        assert tuned.metrics.cosine == pytest.approx(cosine(reference, run_compressed(result, held_out)), abs=1e-6)
        looser = onnx_dc.compress(model, recipe=searching(3, min_cosine=0.99), calib=calib)
        assert looser.report.ratio >= result.report.ratio

    def test_min_cosine_with_calibration_given_as_feeds(self, model, calib):
        feeds = [{"x": calib["x"][i : i + 20]} for i in range(0, 600, 20)]  # 30 feeds of 20 samples
        result = onnx_dc.compress(model, recipe=searching(3, min_cosine=0.999), calib=iter(feeds))
        tuned = result.calibration
        assert tuned.budget_met
        assert tuned.n_search_samples + tuned.n_fit_samples == 600
        assert tuned.n_search_samples % 20 == 0 and tuned.n_search_samples >= 120

    def test_reproducible_with_a_seed(self, model, calib):
        a = onnx_dc.compress(model, recipe=searching(5, min_cosine=0.995), calib=calib)
        b = onnx_dc.compress(model, recipe=searching(5, min_cosine=0.995), calib=calib)
        assert a.model.SerializeToString() == b.model.SerializeToString()

    def test_impossible_budget(self, model, calib):
        with pytest.raises(CalibrationError, match="cannot be met") as refused:
            onnx_dc.compress(model, recipe=Recipe(search=SearchRecipe(min_cosine=1.0, sparsities=(0.9,), bits=(1,))), calib=calib)
        # it names the closest configuration's settings, which written without the budget run as they read
        flags = str(refused.value).split("; ")[-1].removesuffix(" without the budget writes that configuration")
        assert flags == "--sparsity fc=0.9 --bits fc=1"
        written = onnx_dc.compress(model, recipe=Recipe(sparsity="fc=0.9", bits="fc=1"), calib=calib)
        assert {t.bits for t in written.report.tensors if t.kind == "fc"} == {1}

    def test_max_drop_needs_labels(self, model, calib):
        with pytest.raises(CalibrationError, match="--eval"):
            onnx_dc.compress(model, recipe=Recipe(search=SearchRecipe(max_drop=0.5)), calib=calib)
        with pytest.raises(CalibrationError, match="labels"):
            onnx_dc.compress(model, recipe=Recipe(search=SearchRecipe(max_drop=0.5)), calib=calib, eval_data={"x": inputs(50, seed=1)})
        with pytest.raises(SettingsError):
            onnx_dc.compress(model, recipe=Recipe(search=SearchRecipe(max_drop=0.5)))
        with pytest.raises(SettingsError, match="need"):
            onnx_dc.compress(model, recipe=Recipe(search=SearchRecipe(max_drop=0.5, drop_margin_se=1.0)))
        with pytest.raises(SettingsError, match="--drop-margin-se is used with --max-drop"):
            Recipe(search=SearchRecipe(min_cosine=0.99, drop_margin_se=1.0))

    def test_command_line(self, tmp_path, model, calib, evaluation, capsys):
        path = tmp_path / "m.onnx"
        onnx.save(model, path)
        np.savez(tmp_path / "c.npz", **calib)
        np.savez(tmp_path / "e.npz", **evaluation)
        out = tmp_path / "out.onnx"
        code = main(["compress", str(path), "-o", str(out), "--calib", str(tmp_path / "c.npz"), "--eval",
                     str(tmp_path / "e.npz"), "--max-drop", "1", "--search-sparsities", "0,0.5,0.9",
                     "--search-bits", "3,6", "--no-progress"])
        text = capsys.readouterr().out
        assert code == 0 and out.exists()
        assert "automatic settings" in text and "budget met" in text and "fc1.weight" in text
        assert main(["compress", str(path), "-o", str(out), "--max-drop", "1"]) == 2  # needs --calib
        assert main(["compress", str(path), "-o", str(out), "--drop-margin-se", "1"]) == 2  # needs --calib
        assert main(["compress", str(path), "-o", str(out), "--calib", str(tmp_path / "c.npz"), "--max-drop", "1",
                     "--search-bits", "3,x"]) == 2
        assert "Traceback" not in capsys.readouterr().err


def test_isotonic_choice_ignores_a_lucky_outlier():
    from onnx_dc.calibration.budget import _isotonic, _robust_choice
    from onnx_dc.calibration.metrics import OutputMetrics

    assert _isotonic([0.0, 2.0, 1.0, 3.0]) == [0.0, 1.5, 1.5, 3.0]
    drops = [0.0, 0.2, 0.4, 0.9, 0.3, 1.2, 1.5]  # index 4 is a lucky measurement
    measured = [OutputMetrics(0.0, 1.0, accuracy=0.9 - d / 100) for d in drops]
    assert _robust_choice(measured, Budget(max_drop=0.5), 0.9) == 2
    assert _robust_choice(measured, Budget(max_drop=1.0), 0.9) == 4


def test_default_grids_are_coarse_for_many_layers():
    from onnx_dc.calibration.search import DEFAULT_SEARCH_SPARSITIES, MANY_LAYERS, default_grids

    fine, coarse = default_grids(MANY_LAYERS), default_grids(MANY_LAYERS + 1)
    assert fine[0] == DEFAULT_SEARCH_SPARSITIES
    assert set(coarse[0]) < set(fine[0]) and set(coarse[1]) < set(fine[1]) and set(coarse[2]) < set(fine[2])


def test_step_back_tries_the_nearest_configurations_first():
    from onnx_dc.calibration.budget import _step_back

    tried = []

    def passes_below(limit):
        def passes(i):
            tried.append(i)
            return i <= limit
        return passes

    assert _step_back(passes_below(37), 40, linear_steps=6) == 37 and tried == [39, 38, 37]
    tried.clear()
    assert _step_back(passes_below(10), 40, linear_steps=6) == 10  # linear, then 0, then binary search below 34
    assert tried[:7] == [39, 38, 37, 36, 35, 34, 0] and max(tried[7:]) < 34
    tried.clear()
    assert _step_back(passes_below(-1), 40, linear_steps=6) == 0 and tried[-1] == 0
    tried.clear()
    assert _step_back(passes_below(-1), 3, linear_steps=6) == 0 and tried == [2, 1, 0]


def test_drop_standard_error_of_paired_predictions():
    from onnx_dc.calibration.budget import drop_standard_error
    from onnx_dc.calibration.metrics import OutputMetrics

    # 1000 samples, 30 changed predictions, net drop 1 pp: variance ((30/1000) - 0.01^2) / 1000.
    metrics = OutputMetrics(0.0, 1.0, accuracy=0.89, agreement=0.97)
    assert drop_standard_error(metrics, 0.90, 1000) == pytest.approx(100 * np.sqrt((0.03 - 1e-4) / 1000))
    assert drop_standard_error(OutputMetrics(0.0, 1.0, accuracy=0.9, agreement=1.0), 0.9, 1000) == 0.0
    # four times the samples with the same rates: half the error
    assert drop_standard_error(metrics, 0.90, 4000) == pytest.approx(drop_standard_error(metrics, 0.90, 1000) / 2)
    assert drop_standard_error(OutputMetrics(0.0, 1.0), 0.9, 1000) == 0.0  # no accuracy: nothing to bound
    # with labels the discordant pairs are known exactly: 30 changed predictions of which 12 went between
    # two wrong classes leave 18 discordant samples, a smaller (exact) error than the bound
    exact = OutputMetrics(0.0, 1.0, accuracy=0.89, agreement=0.97, discordant=0.018)
    assert drop_standard_error(exact, 0.90, 1000) == pytest.approx(100 * np.sqrt((0.018 - 1e-4) / 1000))
    assert drop_standard_error(exact, 0.90, 1000) < drop_standard_error(metrics, 0.90, 1000)


def test_margin_choice_keeps_each_configuration_one_standard_error_inside_the_budget():
    from onnx_dc.calibration.budget import _robust_choice, drop_standard_error
    from onnx_dc.calibration.metrics import OutputMetrics

    n = 5000
    drops = [0.0, 0.1, 0.2, 0.3, 0.4, 0.45, 0.6]
    changed = [0.002, 0.006, 0.01, 0.014, 0.018, 0.02, 0.025]
    measured = [OutputMetrics(0.0, 1.0, accuracy=0.9 - d / 100, agreement=1 - c) for d, c in zip(drops, changed)]
    budget = Budget(max_drop=0.5)
    assert _robust_choice(measured, budget, 0.9, n_samples=n) == 5  # no margin: the last one within 0.5
    chosen = _robust_choice(measured, budget, 0.9, n_samples=n, drop_margin_se=1.0)
    margins = [drop + drop_standard_error(m, 0.9, n) for drop, m in zip(drops, measured)]
    assert margins[chosen] <= 0.5 and all(m > 0.5 for m in margins[chosen + 1 :])
    assert chosen == 3
    # a larger margin never chooses a more compressed configuration
    assert _robust_choice(measured, budget, 0.9, n_samples=n, drop_margin_se=2.0) <= chosen


def _margin_search(model, calib, evaluation, margin, max_drop=1.0, forward_steps=0):
    from onnx_dc.api.convert import compress_model
    from onnx_dc.calibration.search import autotune
    from onnx_dc.api.calibrated import load_evaluation
    from onnx_dc.codec.tensor import compress_tensor

    settings = Recipe()

    def build(compression):
        def compressor(weight, values, resolved):
            found = compression.results.get(weight.name)
            return found.tensor if found is not None else compress_tensor(values, resolved.to_tensor_settings())

        built = compress_model(compression.model, settings, tensor_compressor=compressor)
        runnable = onnx.ModelProto()
        runnable.CopyFrom(built.model)
        decompress_model(runnable)
        return built, runnable, None

    search, labels = load_evaluation(evaluation, model, need_labels=True)
    return autotune(
        model, load_calibration(calib, model), Budget(max_drop=max_drop), build, search=search, labels=labels,
        searched=["fc0.weight", "fc1.weight"], sparsities=GRID["sparsities"], bits_fc=GRID["bits"],
        drop_margin_se=margin, seed=0, forward_steps=forward_steps,
    )


def test_search_with_a_margin_meets_the_budget_with_room_for_noise(model, calib, evaluation):
    from onnx_dc.calibration.budget import drop_standard_error

    # 2 pp on 500 samples: without the margin the search takes a configuration 1.6 pp down whose
    # standard error (about 0.55 pp) puts it past the budget; with the margin it must not.
    # (forward_steps=0: the choice is the assembled configuration whose metrics are `predicted`.)
    plain = _margin_search(model, calib, evaluation, 0.0, max_drop=2.0)
    careful = _margin_search(model, calib, evaluation, 1.0, max_drop=2.0)
    again = _margin_search(model, calib, evaluation, 1.0, max_drop=2.0)
    assert careful.budget_met and plain.budget_met
    n = len(evaluation["labels"])
    for result, within in ((plain, False), (careful, True)):
        predicted = result.predicted
        assert predicted is not None
        drop = 100 * (result.baseline_accuracy - predicted.accuracy)
        assert drop <= 2.0 + 1e-9
        assert (drop + drop_standard_error(predicted, result.baseline_accuracy, n) <= 2.0 + 1e-9) is within
    assert careful.built.report.ratio < plain.built.report.ratio
    for result in (plain, careful):
        # the checked path is exposed; the choice is one of its configurations, the margin's an earlier one
        assert 1 < len(result.path) <= result.path_length
        assert result.path[result.chosen_index] == result.settings
        assert all(set(config) == set(result.settings) for config in result.path)
    assert careful.chosen_index < plain.chosen_index
    # reproducible: same seed, same model
    assert careful.built.model.SerializeToString() == again.built.model.SerializeToString()


def test_margin_is_checked(model, calib, evaluation):
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(SettingsError, match="drop_margin_se"):
            _margin_search(model, calib, evaluation, bad)


def test_step_forward_stops_at_the_first_failure_and_smooths():
    from onnx_dc.calibration.budget import _step_forward
    from onnx_dc.calibration.metrics import OutputMetrics

    def walk(drops, start=2, last=None, margin=0.0, changed=0.0):
        tried = []

        def measure(i):
            tried.append(i)
            return OutputMetrics(0.0, 1.0, accuracy=0.9 - drops[i] / 100, agreement=1.0 - changed)

        last = len(drops) - 1 if last is None else last
        return _step_forward(measure, start, last, Budget(max_drop=0.5), 0.9, n_samples=5000, drop_margin_se=margin), tried

    # the walk stops at the first failure (index 5); the lucky index 6 is never measured
    assert walk([0.0, 0.1, 0.2, 0.3, 0.45, 0.7, 0.2]) == (4, [2, 3, 4, 5])
    # a pass right after an outlier that the isotonic fit pools above the budget is not taken
    assert walk([0.0, 0.1, 0.2, 0.3, 0.9, 0.45])[0] == 3
    # bounded by `last`
    assert walk([0.0, 0.1, 0.2, 0.3, 0.4, 0.45], last=3) == (3, [2, 3])
    # nothing after the start qualifies: the start is kept
    assert walk([0.0, 0.1, 0.2, 0.6, 0.1]) == (2, [2, 3])
    # with a margin of one standard error (3 % changed predictions on 5000 samples: about 0.24 pp)
    assert walk([0.0, 0.1, 0.2, 0.25, 0.3, 0.1], margin=1.0, changed=0.03) == (3, [2, 3, 4])


def test_forward_steps_compress_further_along_the_path_within_the_budget(model, calib, evaluation):
    from onnx_dc.calibration.budget import drop_standard_error

    n = len(evaluation["labels"])
    for margin in (0.0, 1.0):
        fixed = _margin_search(model, calib, evaluation, margin, max_drop=2.0, forward_steps=0)
        walked = _margin_search(model, calib, evaluation, margin, max_drop=2.0, forward_steps=3)
        assert walked.budget_met and fixed.budget_met
        assert walked.built.report.compressed_bytes <= fixed.built.report.compressed_bytes
        if margin:
            # here the assembled check stops short of a configuration that the real compression meets
            assert walked.built.report.compressed_bytes < fixed.built.report.compressed_bytes
        if walked.built.report.compressed_bytes < fixed.built.report.compressed_bytes:
            # a configuration chosen by the walk meets the budget (and the margin) by its own real measurement
            drop = 100 * (walked.baseline_accuracy - walked.metrics.accuracy)
            assert drop + margin * drop_standard_error(walked.metrics, walked.baseline_accuracy, n) <= 2.0 + 1e-9
            assert any("compressing the next ones for real" in line for line in walked.steps)
    with pytest.raises(SettingsError, match="forward_steps"):
        _margin_search(model, calib, evaluation, 0.0, forward_steps=-1)
