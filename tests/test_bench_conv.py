"""benchmarks/bench_conv.py runs end to end at a tiny size (timings are not checked)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_conv.py"


def test_layers_table_runs_at_tiny_size() -> None:
    layers = ["cls.conv17 1x1 16->88", "cls.conv18 dw5x5 88", "cls.conv0 3x3 s2 3->8"]
    command = [sys.executable, str(SCRIPT), "layers", "--layers", *layers, "--variants", "u4", "p90",
               "--threads", "1", "--rounds", "1", "--min-block-ms", "1", "--clock", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = re.findall(r"^(cls\.\S+ .+?)\s+1\s+([\d.]+)\s+1\.00x\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)\s+([\d.]+)x$",
                      result.stdout, re.MULTILINE)
    assert [row[0] for row in rows] == layers
    error = float(re.search(r"max err vs Conv on the decoded weight: dc ([\d.e+-]+)", result.stdout).group(1))
    assert error < 1e-5


def test_layout_bytes_follow_the_layout_rules() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    from types import SimpleNamespace

    from bench_conv import layout_bytes

    def tensor(n: int, kept: int, values: int) -> SimpleNamespace:
        return SimpleNamespace(n_weights=n, n_kept=kept, codebook_size=values, shape=(8, n // 8))

    assert layout_bytes(tensor(8000, 8000, 256)) == 8000 + 1024  # 8-bit: a byte per weight
    assert layout_bytes(tensor(8000, 7200, 256)) == 8000 + 1000 + 1024  # pruned 8-bit: plus the mask
    assert layout_bytes(tensor(8000, 8000, 16)) == 4000 + 1024  # 4-bit: nibbles
    assert layout_bytes(tensor(8000, 4000, 16)) == 4000 + 1000 + 1024  # pruned 4-bit: nibbles and the mask
    assert layout_bytes(tensor(8000, 4000, 8)) == 4000 + 1024  # pruned 3-bit: the zero symbol fits a nibble
    assert layout_bytes(tensor(8000, 800, 64)) == 4 * 800 + 8 * 8 + 1024  # 10 % kept: the index layout


def test_models_table_runs_and_reuses_its_cache(tmp_path: Path) -> None:
    command = [sys.executable, str(SCRIPT), "models", "--models", "ppocr-mobile-v2-cls", "--settings", "s0b8",
               "--threads", "1", "--rounds", "1", "--min-block-ms", "1", "--clock", "cpu", "--cache", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "s0b8: compressed in" in first.stdout
    assert (tmp_path / "ppocr-mobile-v2-cls.s0b8.dc.onnx").exists()
    second = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "compressed in" not in second.stdout
    assert re.search(r"ppocr-mobile-v2-cls\s+thr 1: original\s+[\d.]+ ms\s+1\.00x\s+dc s0b8\s+[\d.]+ ms\s+[\d.]+x",
                     second.stdout)
