"""Tests for onnx_dc.graph.settings: the value grammar, precedence, defaults and errors."""

from __future__ import annotations

import pytest

import graph_builders as gb
from onnx_dc.errors import SettingsError
from onnx_dc.graph.settings import DEFAULT_MIN_ELEMENTS, DEFAULTS, parse_settings
from onnx_dc.graph.weights import find_weights


def _plans(model, **options):
    return {p.weight.name: p for p in parse_settings(**options).plan(find_weights(model))}


def test_builtin_defaults_per_kind_follow_the_paper_bits():
    settings = parse_settings()
    fc = settings.resolve("w", "fc")
    conv = settings.resolve("k", "conv")
    assert (fc.bits, fc.index_bits) == (5, 5)
    assert (conv.bits, conv.index_bits) == (8, 8)
    assert fc.sparsity == DEFAULTS["fc"]["sparsity"] and conv.sparsity == DEFAULTS["conv"]["sparsity"]
    assert fc.init == "linear"
    assert fc.sources["bits"] == "default for fc"
    assert settings.min_elements == DEFAULT_MIN_ELEMENTS


def test_one_value_applies_to_every_tensor():
    settings = parse_settings(sparsity="0.9", bits=6, index_bits="4", init="density")
    for kind in ("fc", "conv", "other"):
        r = settings.resolve("t", kind)
        assert (r.sparsity, r.bits, r.index_bits, r.init) == (0.9, 6, 4, "density")
        assert r.sources["bits"] == "--bits 6"


def test_most_specific_rule_wins():
    settings = parse_settings(bits="fc=5,conv=8,'enc*'=6,encoder.fc=7")
    assert settings.resolve("encoder.fc", "fc").bits == 7  # exact name
    assert settings.resolve("encoder.other", "fc").bits == 6  # glob beats kind
    assert settings.resolve("decoder.fc", "fc").bits == 5  # kind
    assert settings.resolve("decoder.k", "conv").bits == 8
    assert settings.resolve("decoder.e", "other").bits == DEFAULTS["other"]["bits"]  # built-in default
    settings = parse_settings(bits={None: 4, "fc": 6})
    assert settings.resolve("x", "other").bits == 4 and settings.resolve("x", "fc").bits == 6


def test_between_globs_the_more_literal_wins_and_ties_go_to_the_last():
    settings = parse_settings(bits="enc*=3,encoder.layer*=4")
    assert settings.resolve("encoder.layer1", "fc").bits == 4
    assert settings.resolve("enc.x", "fc").bits == 3
    settings = parse_settings(bits="*.a=3,b.*=4")
    assert settings.resolve("b.a", "fc").bits == 4
    settings = parse_settings(bits="b.*=4,*.a=3")
    assert settings.resolve("b.a", "fc").bits == 3


def test_quoted_glob_with_comma_and_name_prefix():
    settings = parse_settings(bits="'a,b*'=3,name:fc=6")
    assert settings.resolve("a,b1", "other").bits == 3
    assert settings.resolve("fc", "other").bits == 6  # a tensor literally called "fc"
    assert settings.resolve("w", "fc").bits == 5  # the kind fc keeps its default


def test_sparsity_and_quality_pick_the_more_specific():
    settings = parse_settings(sparsity="0.9", quality="fc=1.5")
    fc, conv = settings.resolve("w", "fc"), settings.resolve("k", "conv")
    assert (fc.sparsity, fc.quality) == (None, 1.5)
    assert (conv.sparsity, conv.quality) == (0.9, None)
    settings = parse_settings(quality="0.7")  # beats the built-in default sparsity
    assert settings.resolve("w", "fc").quality == 0.7 and settings.resolve("w", "fc").sparsity is None
    settings = parse_settings(sparsity="none")
    assert settings.resolve("w", "fc").sparsity is None
    assert parse_settings(sparsity={"fc": None}).resolve("w", "fc").sparsity is None  # a recipe's "none"
    with pytest.raises(SettingsError, match="both"):
        parse_settings(sparsity="fc=0.5", quality="fc=1.0").resolve("w", "fc")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": "9"}, "out of range"),
        ({"bits": "0"}, "out of range"),
        ({"bits": "five"}, "not an integer"),
        ({"bits": "fc=5.5"}, "not an integer"),
        ({"index_bits": "17"}, "out of range"),
        ({"sparsity": "1.5"}, "out of range"),
        ({"sparsity": "1"}, "below 1: sparsity 1 removes every weight"),
        ({"sparsity": 1.0}, "below 1"),
        ({"sparsity": {"fc": 1}}, "below 1"),
        ({"sparsity": "-0.1"}, "out of range"),
        ({"sparsity": "nan"}, "out of range"),
        ({"sparsity": "fc=half"}, "not a number"),
        ({"quality": "-1"}, "out of range"),
        ({"init": "kmeans"}, "unknown initialisation"),
        ({"bits": ""}, "empty value"),
        ({"bits": "fc=5,,conv=8"}, "empty item"),
        ({"bits": "fc=5,6"}, "no KEY="),
        ({"bits": "=5"}, "missing key"),
        ({"bits": "'fc=5"}, "unbalanced quote"),
        ({"bits": True}, "invalid value"),
        ({"min_elements": "-3"}, "out of range"),
        ({"min_elements": "many"}, "not an integer"),
        ({"exclude": ""}, "empty pattern"),
    ],
)
def test_bad_values_are_settings_errors(options, message):
    with pytest.raises(SettingsError, match=message):
        parse_settings(**options)


def test_names_and_globs_that_match_nothing_are_errors():
    weights = find_weights(gb.mlp())
    with pytest.raises(SettingsError, match=r"'enc\*' matches no floating-point weight"):
        parse_settings(bits="enc*=6").plan(weights)
    with pytest.raises(SettingsError, match="'w9' matches no"):
        parse_settings(sparsity="w9=0.5").plan(weights)
    with pytest.raises(SettingsError, match="--exclude nothing"):
        parse_settings(exclude="nothing*").plan(weights)
    # Kinds never need to match: a model without conv layers accepts conv=8.
    parse_settings(bits="conv=8").plan(weights)


def test_plan_skips_biases_small_and_excluded_tensors():
    plans = _plans(gb.mlp(), exclude=["w3"], sparsity="w1=0.5")
    assert plans["w1"].settings.sparsity == 0.5
    assert plans["w2"].settings.sparsity == DEFAULTS["fc"]["sparsity"]
    assert plans["w3"].settings is None and "excluded" in plans["w3"].skip_reason
    assert plans["b2"].settings is None and "bias" in plans["b2"].skip_reason
    # b1 (300 elements, the bias Add's operand) is a vector: dense unless named.
    assert plans["b1"].settings is None and "vector" in plans["b1"].skip_reason
    assert _plans(gb.mlp(), bits="b1=6")["b1"].settings.bits == 6
    plans = _plans(gb.mlp(), min_elements=100000)
    assert plans["w1"].settings is None and "fewer than 100000" in plans["w1"].skip_reason


def test_an_exact_name_compresses_a_bias_or_small_tensor():
    plans = _plans(gb.mlp(), bits="b2=6", min_elements="100000")
    assert plans["b2"].settings is not None and plans["b2"].settings.bits == 6
    assert plans["w1"].settings is None  # below min-elements, not named


def test_glob_matching_only_small_tensors_is_accepted():
    plans = _plans(gb.mlp(), bits="b*=6")
    assert plans["b1"].settings is None  # a vector: only its exact name compresses it
    assert plans["b2"].settings is None  # still a bias


def test_seed_is_carried_to_every_tensor():
    assert parse_settings(seed=7).resolve("w", "fc").seed == 7
