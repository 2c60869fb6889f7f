"""Runs benchmarks/bench_kmeans.py at a tiny size so the script cannot rot (no timing is checked)."""

from __future__ import annotations

import numpy as np
from bench_loader import load_benchmark


def test_bench_kmeans_runs_and_prints_its_table(capsys):
    bench = load_benchmark("bench_kmeans")
    assert bench.main(["--sizes", "3000", "--clusters", "4", "16", "--repeats", "1", "--converge-iter", "2000"]) == 0
    output = capsys.readouterr().out
    lines = [line for line in output.splitlines() if line.startswith("| 3,000 |")]
    implementations = [line.split("|")[3].strip() for line in lines]
    assert implementations == ["sklearn", "ours", "ours, at sklearn's inertia", "ours, to convergence"] * 2
    assert "speed-up vs sklearn" in output and "inertia / sklearn" in output
    assert output.count("at the same or lower inertia ours is") == 2
    assert "HIGHER inertia" not in output


def test_same_inertia_row_is_the_fewest_iterations_reaching_sklearn():
    bench = load_benchmark("bench_kmeans")
    weights = bench.pruned_gaussian(4000, seed=1)
    assert weights.dtype == np.float32 and np.all(np.abs(weights) > 1.6 * bench.SIGMA)
    init = bench.initial_centroids(weights, 8, "linear")
    reference = bench.run_sklearn(weights, init, max_iter=300, budget_s=1e9)
    row = bench.run_ours_at_inertia(weights, init, reference.inertia, limit=5000, repeats=1)
    assert row.inertia <= reference.inertia
    if row.max_iter > 1:
        fewer = bench.kmeans_1d(weights, 8, init=init, max_iter=row.max_iter - 1)
        assert fewer.inertia > reference.inertia


def test_sklearn_iterations_are_capped_to_the_time_budget():
    bench = load_benchmark("bench_kmeans")
    weights = bench.pruned_gaussian(3000, seed=2)
    init = bench.initial_centroids(weights, 4, "linear")
    row = bench.run_sklearn(weights, init, max_iter=300, budget_s=0.0)
    assert row.max_iter == 1 and "capped 300->1" in row.note
