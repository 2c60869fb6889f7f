"""Tests of model_zoo.calibration_table: which rows each mode computes, and the splits it relies on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model_zoo import calibration_table
from model_zoo.calibration_table import format_markdown, main


def test_halves_are_disjoint_and_cover_the_test_split():
    a, b = calibration_table.test_halves()  # (imported through the module: pytest would collect test_halves)
    assert len(a) == len(b) == 5000
    assert np.intersect1d(a, b).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(10000))


@pytest.mark.slow  # the full suite only: calibrated compressions of both LeNets
def test_fixed_only_computes_the_fixed_settings_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    table = tmp_path / "table.md"
    code = main(["--models", "lenet_300_100", "--fixed-only", "--quick", "--calib-samples", "256",
                 "--json", str(out), "--out", str(table)])
    assert code == 0
    rows = json.loads(out.read_text())
    methods = [r["method"] for r in rows]
    assert methods == [
        "original (float32)",
        "magnitude one-shot (paper's recipe, no retraining)",
        "+ centroid refit",
        "+ weight refit",
        "+ sequential",
        "+ downstream weighting",
    ]
    assert not any("automatic" in m for m in methods)
    # the same per-layer settings (the paper's) in every fixed row
    assert len({r["settings"] for r in rows[1:]}) == 1
    assert all(r["ratio"] > 10 for r in rows[1:])
    assert table.read_text().strip() == format_markdown(_rows(rows), 256).strip()


def _rows(dicts):
    from model_zoo.calibration_table import Row

    return [Row(**d) for d in dicts]


def test_fixed_only_and_automatic_only_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--models", "lenet_300_100", "--fixed-only", "--automatic-only"])
    assert info.value.code == 2
    assert "exclude each other" in capsys.readouterr().err
