"""benchmarks/bench_conv_policy.py runs end to end at a tiny size (timings are not checked)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_conv_policy.py"


def test_benchmark_runs_at_tiny_size() -> None:
    command = [sys.executable, str(SCRIPT), "--rounds", "2", "--runs-per-block", "1", "--models", "lenet5"]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    layers = re.findall(r"^(conv[12]) (\d+)% pruned\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x", out, re.MULTILINE)
    assert {(name, pruned) for name, pruned, *_ in layers} == {
        (name, pruned) for name in ("conv1", "conv2") for pruned in ("10", "30", "50", "90")
    }
    policies = re.findall(r"^lenet5\s+(.+?)\s+([\d.]+)\s+([\d.]+)x$", out, re.MULTILINE)
    labels = {label for label, *_ in policies}
    assert {"original", "DCConv (all 2-D convs)", "DCDecompress + Conv"} <= labels
    assert {"original, convs only", "DCConv (all 2-D convs), convs only"} <= labels
