"""Tests for onnx_dc.graph.model_io: loading (external data, bad files) and atomic saving."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper as nh

import graph_builders as gb
from onnx_dc.graph import model_io
from onnx_dc.errors import ModelError
from onnx_dc.graph.model_io import check_output_path, external_data_files, load_model, save_model


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: nh.to_array(t) for t in model.graph.initializer}


def test_load_path_and_copy_of_proto(tmp_path):
    model = gb.mlp()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    loaded = load_model(path)
    assert loaded.SerializeToString() == model.SerializeToString()
    copy = load_model(model)
    assert copy is not model
    copy.graph.initializer[0].name = "changed"
    assert model.graph.initializer[0].name == "w1"


def test_load_external_data(tmp_path):
    model = gb.mlp()
    path = tmp_path / "ext.onnx"
    onnx.save(gb.mlp(), path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.bin", size_threshold=0)
    assert external_data_files(path) == [(tmp_path / "ext.bin").resolve()]
    loaded = load_model(path)
    for name, array in _weights(model).items():
        np.testing.assert_array_equal(_weights(loaded)[name], array)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in loaded.graph.initializer)


def test_missing_external_data_is_a_model_error(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(gb.mlp(), path, save_as_external_data=True, location="ext.bin", size_threshold=0)
    (tmp_path / "ext.bin").unlink()
    with pytest.raises(ModelError, match="cannot load external data"):
        load_model(path)


def test_proto_with_unloaded_external_data_is_refused(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(gb.mlp(), path, save_as_external_data=True, location="ext.bin", size_threshold=0)
    with pytest.raises(ModelError, match="pass the model's file path"):
        load_model(onnx.load(path, load_external_data=False))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is a text file, not a model\n", "not an ONNX model"),
        (b"", "not an ONNX model"),
        (bytes(range(256)) * 4, "not an ONNX model"),
    ],
)
def test_not_onnx_is_a_model_error(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        load_model(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(ModelError, match="is a directory"):
        load_model(tmp_path)


def test_save_is_complete_and_leaves_no_temporary_files(tmp_path):
    model = gb.mlp()
    saved = save_model(model, tmp_path / "out.onnx")
    assert saved.external_data_path is None
    assert os.listdir(tmp_path) == ["out.onnx"]
    assert onnx.load(tmp_path / "out.onnx").SerializeToString() == model.SerializeToString()
    assert saved.size_bytes == (tmp_path / "out.onnx").stat().st_size
    assert ((tmp_path / "out.onnx").stat().st_mode & 0o777) == (0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_with_external_data_round_trips_and_leaves_model_unchanged(tmp_path):
    model = gb.mlp()
    before = model.SerializeToString()
    saved = save_model(model, tmp_path / "out.onnx", external_data=True)
    assert model.SerializeToString() == before
    assert saved.external_data_path == tmp_path / "out.onnx.data"
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]
    reloaded = load_model(tmp_path / "out.onnx")
    for name, array in _weights(model).items():
        np.testing.assert_array_equal(_weights(reloaded)[name], array)
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def test_models_over_the_protobuf_limit_get_external_data(tmp_path, monkeypatch):
    """The 2 GB rule, exercised with a lowered limit (a real 2 GB model does not fit a unit test)."""
    model = gb.mlp()
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT_BYTES", 10_000)
    saved = save_model(model, tmp_path / "big.onnx")
    assert saved.external_data_path is not None
    assert (tmp_path / "big.onnx").stat().st_size < 10_000
    with pytest.raises(ModelError, match="needs external data"):
        save_model(model, tmp_path / "big2.onnx", external_data=False)
    assert not (tmp_path / "big2.onnx").exists()
    reloaded = load_model(tmp_path / "big.onnx")
    np.testing.assert_array_equal(_weights(reloaded)["w1"], _weights(model)["w1"])


def test_failed_or_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous content")

    def fail(path, data):
        Path(path).write_bytes(data[:10])  # a partial write, then the failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io, "_write_bytes", fail)
    with pytest.raises(ModelError, match="No space left on device"):
        save_model(gb.mlp(), out)
    assert out.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == ["out.onnx"]

    def interrupt(path, data):
        Path(path).write_bytes(data[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(model_io, "_write_bytes", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_model(gb.mlp(), out, external_data=True)
    assert out.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == ["out.onnx"]


def test_file_size_limit_gives_a_clear_error_and_no_file(tmp_path):
    """A real write failure (RLIMIT_FSIZE stands in for a full disk) in a child process."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        sys.path[:0] = [{str(Path(__file__).parent)!r}]
        import graph_builders as gb
        from onnx_dc.graph.model_io import save_model
        from onnx_dc.errors import ModelError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            save_model(gb.mlp(), {str(tmp_path / "out.onnx")!r})
        except ModelError as exc:
            print(exc)
            sys.exit(3)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert "cannot write" in result.stdout and "too large" in result.stdout.lower()
    assert os.listdir(tmp_path) == []


def test_check_output_path_refuses_to_overwrite_inputs(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(gb.mlp(), src, save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    with pytest.raises(ModelError, match="same file as the input"):
        check_output_path(src, [src])
    with pytest.raises(ModelError, match="same file as the input"):
        check_output_path(tmp_path / "." / "in.onnx", [src])
    link = tmp_path / "link.onnx"
    link.symlink_to(src)
    with pytest.raises(ModelError, match="same file as the input"):
        check_output_path(link, [src])
    hard = tmp_path / "hard.onnx"
    os.link(src, hard)
    with pytest.raises(ModelError, match="same file as the input"):
        check_output_path(hard, [src])
    # Writing "in.onnx.data" as a model would clobber the input's external data.
    with pytest.raises(ModelError, match="belongs to the input model"):
        check_output_path(tmp_path / "in.onnx.data", [src])
    with pytest.raises(ModelError, match="is a directory"):
        check_output_path(tmp_path, [src])
    with pytest.raises(ModelError, match="does not exist"):
        check_output_path(tmp_path / "no" / "out.onnx", [src])
    assert check_output_path(tmp_path / "out.onnx", [src]) == tmp_path / "out.onnx"


def _constant_weight_model(ir_version: int = 8) -> onnx.ModelProto:
    """``y = relu(x @ w + b)`` with ``w`` and ``b`` in Constant nodes, a Reshape shape Constant and an If subgraph."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    then_graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["inner"], value=nh.from_array(np.ones(3, np.float32)))],
        "then", [], [onnx.helper.make_tensor_value_info("inner", onnx.TensorProto.FLOAT, [3])],
    )
    nodes = [
        onnx.helper.make_node("Constant", [], ["w"], value=nh.from_array(w, "ignored_name")),
        onnx.helper.make_node("Constant", [], ["b"], value=nh.from_array(b)),
        onnx.helper.make_node("Constant", [], ["shape"], value=nh.from_array(np.array([-1, 3], np.int64))),
        onnx.helper.make_node("Constant", [], ["flag"], value_int=1),
        onnx.helper.make_node("Constant", [], ["also_out"], value=nh.from_array(np.float32(2.0))),
        onnx.helper.make_node("MatMul", ["x", "w"], ["xw"]),
        onnx.helper.make_node("Add", ["xw", "b"], ["pre"]),
        onnx.helper.make_node("Reshape", ["pre", "shape"], ["flat"]),
        onnx.helper.make_node("Cast", ["flag"], ["cond"], to=onnx.TensorProto.BOOL),
        onnx.helper.make_node("If", ["cond"], ["branch"], then_branch=then_graph, else_branch=then_graph),
        onnx.helper.make_node("Add", ["flat", "branch"], ["y"]),
    ]
    graph = onnx.helper.make_graph(
        nodes, "constants",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3]),
         onnx.helper.make_tensor_value_info("also_out", onnx.TensorProto.FLOAT, [])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    return model


def test_constants_to_initializers_moves_tensor_constants_and_nothing_else():
    import onnxruntime as ort

    model = _constant_weight_model()
    before = model.SerializeToString()
    converted = model_io.constants_to_initializers(model)
    assert model.SerializeToString() == before  # the caller's model is untouched
    onnx.checker.check_model(converted, full_check=True)
    inits = {t.name: nh.to_array(t) for t in converted.graph.initializer}
    assert sorted(inits) == ["b", "shape", "w"]
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    np.testing.assert_array_equal(inits["w"], nh.to_array(constants["w"].attribute[0].t))
    # value_int Constant and the one that is a graph output stay nodes; the If body is not touched
    remaining = [n.output[0] for n in converted.graph.node]
    assert remaining == ["flag", "also_out", "xw", "pre", "flat", "cond", "branch", "y"]
    assert converted.graph.node[6].attribute[0].g.node[0].op_type == "Constant"
    assert [i.name for i in converted.graph.input] == ["x"] and len(converted.graph.output) == 2
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
           for m in (model, converted)]
    for a, b in zip(*run):
        np.testing.assert_array_equal(a, b)


def test_constants_to_initializers_names_and_old_ir():
    model = _constant_weight_model()
    only_w = model_io.constants_to_initializers(model, names=["w"])
    assert [t.name for t in only_w.graph.initializer] == ["w"]
    assert [n.output[0] for n in only_w.graph.node][:3] == ["b", "shape", "flag"]
    unchanged = model_io.constants_to_initializers(model, names=[])
    assert unchanged.SerializeToString() == model.SerializeToString() and unchanged is not model
    old = _constant_weight_model(ir_version=3)  # initializers would have to be graph inputs: left alone
    assert model_io.constants_to_initializers(old).SerializeToString() == old.SerializeToString()
