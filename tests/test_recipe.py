"""The recipe (onnx_dc/api/recipe.py): one typed object the API takes, the CLI builds and the model records."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import graph_builders as gb
import onnx_dc
from onnx_dc.api.cli import main
from onnx_dc.api.recipe import METADATA_KEY, CalibrationRecipe, Recipe, SearchRecipe, load_recipe
from onnx_dc.calibration.options import CalibrationOptions
from onnx_dc.errors import SettingsError


def containers(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: t.raw_data for t in model.graph.initializer if t.name.endswith("__dc")}


def test_settings_take_the_command_lines_text_numbers_and_dicts():
    recipe = Recipe(sparsity="fc=0.9,conv=0.6", bits=5, index_bits={"*": 4, "w1": 6}, init="name:fc=density")
    assert recipe.sparsity == (("fc", 0.9), ("conv", 0.6))
    assert recipe.bits == ((None, 5),)
    assert recipe.index_bits == ((None, 4), ("w1", 6))
    assert recipe.init == (("name:fc", "density"),)  # a tensor named "fc", not the kind
    rules = recipe.settings().rules
    assert [(r.key, r.is_kind) for r in rules["init"]] == [("fc", False)]
    assert [(r.key, r.is_kind) for r in rules["sparsity"]] == [("fc", True), ("conv", True)]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sparsity": "fc=1.5"}, "--sparsity"),
        ({"sparsity": {"fc": 1.0}}, "--sparsity: 1.0 is out of range"),
        ({"bits": 9}, "--bits"),
        ({"init": "nope"}, "--init"),
        ({"seed": "3"}, "--seed"),
        ({"min_elements": -1}, "--min-elements"),
    ],
)
def test_a_bad_setting_fails_when_the_recipe_is_made(changes, message):
    with pytest.raises(SettingsError, match=message):
        Recipe(**changes)


def test_search_and_calibration_parts_are_validated():
    with pytest.raises(SettingsError, match="--min-cosine or --max-drop"):
        SearchRecipe()
    with pytest.raises(SettingsError, match="--drop-margin-se is used with --max-drop"):
        SearchRecipe(min_cosine=0.99, drop_margin_se=1)
    with pytest.raises(SettingsError, match="--search-bits"):
        SearchRecipe(min_cosine=0.99, bits=("x",))
    with pytest.raises(SettingsError, match="--calib-samples"):
        CalibrationRecipe(samples=0)


RULE_KEYS = st.sampled_from([None, "fc", "conv", "other", "w1", "layer.*", "name:fc", "*"])


@settings(max_examples=60, deadline=None)
@given(
    sparsity=st.lists(st.tuples(RULE_KEYS, st.sampled_from([0.0, 0.5, 0.9])), max_size=3),
    bits=st.lists(st.tuples(RULE_KEYS, st.integers(1, 8)), max_size=3),
    exclude=st.lists(st.sampled_from(["w9", "b*"]), max_size=2, unique=True),
    seed=st.integers(0, 5),
    search=st.sampled_from([None, SearchRecipe(min_cosine=0.99), SearchRecipe(max_drop=0.5, drop_margin_se=1.0, bits=(3, 5))]),
)
def test_json_round_trip_is_exact(sparsity, bits, exclude, seed, search):
    recipe = Recipe(sparsity=tuple(sparsity), bits=tuple(bits), exclude=tuple(exclude), seed=seed, search=search)
    again = Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())))
    # rules with a repeated key collapse to the later one (what resolution would pick anyway)
    for name in ("sparsity", "bits"):
        assert dict(getattr(again, name)) == dict(getattr(recipe, name))
    assert again.settings().resolve("w1", "fc") == recipe.settings().resolve("w1", "fc")
    assert again.settings().resolve("layer.3", "conv") == recipe.settings().resolve("layer.3", "conv")
    assert (again.exclude, again.seed, again.search, again.calibration) == (
        recipe.exclude, recipe.seed, recipe.search, recipe.calibration)


@pytest.mark.parametrize(
    "document, message",
    [
        ({"format": "something else"}, "not an onnx-dc recipe"),
        ({"version": 2}, "version 2"),
        ({"sparsity": 0.5, "colour": "red"}, "unknown key"),
        ({"calibration": {"samples": 10, "speed": 3}}, "unknown calibration option"),
        ({"search": {"min_cosine": 0.9, "budget": 1}}, "unknown search option"),
        ({"bits": [1, 2]}, "bits must be a value or an object"),
    ],
)
def test_documents_that_are_not_recipes_are_refused(document, message):
    with pytest.raises(SettingsError, match=message):
        Recipe.from_dict(document)


def test_the_compressed_model_records_its_recipe_and_inspect_prints_it(tmp_path):
    recipe = Recipe(sparsity="fc=0.6", bits="fc=4", min_elements=0)
    out = tmp_path / "m.onnx"
    result = onnx_dc.compress(gb.mlp(), out, recipe)
    assert result.recipe == recipe
    stored = {p.key: p.value for p in onnx.load(str(out)).metadata_props}[METADATA_KEY]
    assert Recipe.from_dict(json.loads(stored)) == recipe
    report = onnx_dc.inspect(out)
    assert report.recipe == recipe
    assert "recipe: --sparsity fc=0.6 --bits fc=4 --min-elements 0" in report.format_table()
    assert report.to_dict()["recipe"] == recipe.to_dict()


def test_sparsity_none_quantizes_only(tmp_path, capsys):
    """``--sparsity none`` (documented) reaches the settings as a rule whose value is None."""
    assert Recipe(sparsity="none").settings().resolve("w", "fc").sparsity is None
    assert Recipe.build(sparsity="fc=none").settings().resolve("w", "fc").sparsity is None
    onnx.save(gb.mlp(), tmp_path / "m.onnx")
    assert main(["compress", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--sparsity", "none", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["tensors"]
    assert rows and all(row["kept_fraction"] == 1.0 for row in rows)


def test_the_short_keywords_override_the_recipe():
    base = Recipe(sparsity=0.5, bits=3, index_bits=6)
    result = onnx_dc.compress(gb.mlp(), recipe=base, bits=6)
    assert result.recipe == Recipe(sparsity=0.5, bits=6, index_bits=6)


def test_cli_flags_and_recipe_files_build_the_same_recipe(tmp_path, capsys):
    source = tmp_path / "m.onnx"
    onnx.save(gb.mlp(), source)
    flags = ["--sparsity", "fc=0.7", "--bits", "4", "--index-bits", "6", "--min-elements", "0", "--seed", "2"]
    assert main(["compress", str(source), "-o", str(tmp_path / "a.onnx"), "--json", *flags]) == 0
    printed = json.loads(capsys.readouterr().out)["recipe"]
    (tmp_path / "r.json").write_text(json.dumps(printed))
    assert main(["compress", str(source), "-o", str(tmp_path / "b.onnx"), "--recipe", str(tmp_path / "r.json")]) == 0
    # a compressed model is a recipe too
    assert main(["compress", str(source), "-o", str(tmp_path / "c.onnx"), "--recipe", str(tmp_path / "a.onnx")]) == 0
    a, b, c = (onnx.load(str(tmp_path / f"{x}.onnx")) for x in "abc")
    assert containers(a) and containers(a) == containers(b) == containers(c)
    # a flag overrides the recipe's setting
    assert main(["compress", str(source), "-o", str(tmp_path / "d.onnx"), "--recipe", str(tmp_path / "r.json"),
                 "--bits", "2"]) == 0
    assert load_recipe(tmp_path / "d.onnx") == Recipe.build(load_recipe(tmp_path / "a.onnx"), bits=2)


def test_bad_recipe_files_are_one_line_errors(tmp_path, capsys):
    source = tmp_path / "m.onnx"
    onnx.save(gb.mlp(), source)
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "plain.onnx").write_bytes(source.read_bytes())
    for recipe, message in ((tmp_path / "missing.json", "no such file"), (tmp_path / "bad.json", "not JSON"),
                            (tmp_path / "plain.onnx", "carries no onnx-dc recipe")):
        assert main(["compress", str(source), "-o", str(tmp_path / "x.onnx"), "--recipe", str(recipe)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow  # the full suite only: an automatic search
def test_a_searched_model_is_reproduced_by_its_recipe_without_searching():
    model = gb.mlp()
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((300, model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value))
             .astype(np.float32)}
    options = CalibrationOptions(criterion="activation", refit_rounds=1, sequential=False)
    searching = Recipe(
        calibration=CalibrationRecipe(options=options),
        search=SearchRecipe(min_cosine=0.99, sparsities=(0.0, 0.5, 0.8), bits=(3, 5)),
    )
    searched = onnx_dc.compress(model, recipe=searching, calib=calib)
    chosen = searched.recipe
    assert chosen.search is None and chosen.calibration.holdout == searched.calibration.n_search_samples
    assert {name for name, _ in chosen.bits} >= {c.name for c in searched.calibration.choices}
    again = onnx_dc.compress(model, recipe=chosen, calib=calib)
    assert containers(again.model) == containers(searched.model)
    assert again.recipe == chosen
