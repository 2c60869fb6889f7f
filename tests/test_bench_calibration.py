"""Runs benchmarks/bench_calibration.py at a tiny size so the script cannot rot (no timing is checked)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the full suite only: a benchmark at a tiny size

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_calibration.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_calibration", BENCH)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_calibration_runs_and_prints_its_tables(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "rows.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "calibration cost vs model size" in text and "peak memory vs number of samples" in text
    rows = json.loads(out.read_text())
    assert [r["width"] for r in rows["sizes"]] == [16, 32]
    assert [r["samples"] for r in rows["samples"]] == [16, 64]
    # the statistics are (K+1)^2 float64 per layer, whatever the number of samples
    assert {r["statistics_bytes"] for r in rows["samples"]} == {3 * 33 * 33 * 8}
    for r in rows["sizes"] + rows["samples"]:
        assert r["seconds"] > 0 and r["peak_rss_bytes"] > 0
