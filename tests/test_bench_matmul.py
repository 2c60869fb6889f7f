"""benchmarks/bench_matmul.py runs end to end at a tiny size (timings are not checked)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the full suite only: a benchmark at a tiny size

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_matmul.py"


def test_benchmark_runs_at_tiny_size() -> None:
    command = [sys.executable, str(SCRIPT), "--size", "96", "--batches", "1", "3", "--threads", "1", "2",
               "--min-time", "0.01"]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    error = float(re.search(r"max relative error (\S+)", out).group(1))
    assert error < 1e-5
    rows = re.findall(r"^(gaussian|relu 50%)\s+(\d)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x", out, re.MULTILINE)
    assert {(r[0], r[1], r[2]) for r in rows} == {
        (inputs, threads, batch) for inputs in ("gaussian", "relu 50%") for threads in "12" for batch in ("1", "3")
    }
    for row in rows:
        dense_ms, compressed_ms, ratio = map(float, row[3:])
        assert dense_ms > 0 and compressed_ms > 0
        assert abs(ratio - dense_ms / compressed_ms) <= 0.02 * ratio + 0.01  # printed values are rounded
    memory = re.findall(r"(\d) thread\(s\), (gaussian|relu 50%) model:\s+dense \+[-\d.]+ MB, compressed \+[-\d.]+ MB", out)
    assert set(memory) == {(threads, inputs) for threads in "12" for inputs in ("gaussian", "relu 50%")}
