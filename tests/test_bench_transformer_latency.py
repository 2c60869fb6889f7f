"""benchmarks/bench_transformer_latency.py runs end to end on a small BERT test model (timings are not checked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from bench_loader import load_benchmark

REPO = Path(__file__).resolve().parents[1]

bench = load_benchmark("bench_transformer_latency")


def test_every_variant_is_timed_at_every_shape_and_thread_count():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (1, 8), dtype=np.int64)
    one = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    two = {k: np.concatenate([v, v]) for k, v in one.items()}
    rows = bench.measure("bert", REPO / "tests/models/bert_dynamo.onnx", {"1 x 8": one, "2 x 8": two}, [1, 2], 0.05)
    seen = {(r["shape"], r["threads"], r["variant"]) for r in rows}
    assert seen == {(s, t, v) for s in ("1 x 8", "2 x 8") for t in (1, 2) for v in bench.VARIANTS}
    assert all(r["median_ms"] > 0 and r["blocks"] >= 5 for r in rows)
    assert all(r["ratio"] == 1.0 for r in rows if r["variant"] == "original")
