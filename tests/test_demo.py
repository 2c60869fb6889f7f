"""Tests for model_zoo.demo: the README's main job runs and reports what it measured."""

from __future__ import annotations

import io
import re

import onnx
import pytest

from graph_builders import ops_library  # noqa: F401  (fixture)
from model_zoo.demo import main, run_demo

pytestmark = pytest.mark.slow  # the full suite only: the demo end to end on the zoo models


def test_demo_compresses_lenet_300_100_and_reports_accuracy_and_sizes(tmp_path, ops_library):
    out = io.StringIO()
    figures = run_demo("lenet_300_100", workdir=tmp_path, out=out)
    text = out.getvalue()
    assert "total (every weight)" in text and "file size" in text
    assert re.search(r"original\s+\d+\.\d\d %", text)
    assert re.search(r"compressed, onnx-dc operator library\s+\d+\.\d\d %", text)
    assert re.search(r"decompressed, plain onnxruntime\s+\d+\.\d\d %", text)
    assert figures["accuracy_custom_ops"] == figures["accuracy_decompressed"]
    assert figures["accuracy_custom_ops"] >= figures["accuracy_before"] - 0.01
    assert figures["compressed_file_bytes"] < figures["original_file_bytes"] / 5
    onnx.checker.check_model(str(tmp_path / "lenet_300_100.dc.onnx"), full_check=True)
    assert (tmp_path / "lenet_300_100.decompressed.onnx").exists()


def test_demo_command_line(tmp_path, capsys):
    assert main(["--model", "lenet5", "--keep", str(tmp_path), "--sparsity", "fc=0.5,conv=0.2"]) == 0
    assert "--sparsity fc=0.5,conv=0.2" in capsys.readouterr().out
    assert main(["--keep", str(tmp_path), "--bits", "12"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--bits" in err
