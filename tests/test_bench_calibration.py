"""Runs benchmarks/bench_calibration.py at a tiny size so the script cannot rot (no timing is checked)."""

from __future__ import annotations

import json

import pytest
from bench_loader import load_benchmark

pytestmark = pytest.mark.slow  # the full suite only: a benchmark at a tiny size


def test_bench_calibration_runs_and_prints_its_tables(tmp_path, capsys):
    bench = load_benchmark("bench_calibration")
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
