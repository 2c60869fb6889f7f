"""graph/linked_copy.py: a model whose weights stay in their files, written where onnxruntime loads it."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest

from benchmarks.scale_models import small_spec, write_matmul_stack
from onnx_dc.graph.linked_copy import write_linked_copy
from onnx_dc.graph.tensor_store import ANCHOR_KEY, open_model


def _run(path, x):
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("links", [True, False])
def test_the_copy_computes_what_the_model_does(tmp_path, monkeypatch, external, links):
    source = write_matmul_stack(small_spec("m", (200, 120, 40), external=external, seed=2), tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((3, 200)).astype(np.float32)
    expected = _run(source, x)
    if not links:  # a file system without hard links (or another device): the data are copied
        def refuse(*args):
            raise OSError("no links here")

        monkeypatch.setattr(os, "link", refuse)
    directory = tmp_path / "copy"
    directory.mkdir()
    path = write_linked_copy(open_model(source, anchored=True), directory)
    np.testing.assert_array_equal(_run(path, x), expected)
    written = open_model(path)
    assert all(ANCHOR_KEY not in {e.key for e in t.external_data} for t in written.graph.initializer)
    linked = [p for p in directory.iterdir() if p.name.startswith("linked-")]
    assert len(linked) == 1
    assert (os.stat(linked[0]).st_nlink > 1) == links


def test_inline_tensors_of_a_model_in_memory_are_written_out(tmp_path):
    import onnx

    source = write_matmul_stack(small_spec("m", (200, 120, 40), external=False, seed=2), tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((3, 200)).astype(np.float32)
    directory = tmp_path / "copy"
    directory.mkdir()
    path = write_linked_copy(onnx.load(str(source)), directory)
    np.testing.assert_array_equal(_run(path, x), _run(source, x))
    assert (directory / "inline.data").stat().st_size == 200 * 120 * 4  # the 120 x 40 weight (19 kB) stays in the graph
