"""Large-model machinery at small size: parallel = serial, external data in and out, lazy loading, OOM.

The models are benchmarks/scale_models.py MatMul stacks (the benchmark's models, small).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from graph_builders import ops_library  # noqa: F401  (fixture)
from onnx import numpy_helper

import onnx_dc
from benchmarks.scale_models import small_spec, write_matmul_stack
from onnx_dc.graph.model_io import external_data_files
from onnx_dc.graph.tensor_store import open_model, read_structure, tensor_values

REPO_ROOT = Path(__file__).resolve().parents[1]


def _files(path: Path) -> dict[str, bytes]:
    """The output model and its data file, by name suffix."""
    found = {"onnx": path.read_bytes()}
    data = path.with_name(path.name + ".data")
    if data.exists():
        found["data"] = data.read_bytes()
    return found


@pytest.fixture(scope="module")
def stacks(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("stacks")
    widths = (1200, 1000, 257, 300, 64)  # the first weight (4.8 MB) is spilled when a proto is given to workers
    return {
        "inline": write_matmul_stack(small_spec("inline", widths, external=False), directory / "inline.onnx"),
        "external": write_matmul_stack(small_spec("external", widths, external=True, seed=1), directory / "external.onnx"),
    }


def test_aborting_workers_while_a_result_is_half_sent_does_not_hang(tmp_path):
    """A worker terminated in the middle of sending its result (a SIGTERM at that moment hung compress):
    the pool's manager thread must not wait forever for the rest of the message."""
    script = tmp_path / "half_sent.py"
    script.write_text(textwrap.dedent("""
        import os, struct
        import numpy as np
        from onnx_dc.api.parallel import TensorWorkers
        from onnx_dc.codec.tensor import TensorSettings

        if __name__ == "__main__":
            workers = TensorWorkers(2)
            values = np.arange(64, dtype=np.float32).reshape(8, 8)
            task = workers.task("w", values, TensorSettings(), shape=values.shape, dtype=values.dtype)
            assert len(list(workers.run([task]))) == 1
            # What a worker stopped mid-send leaves: a message header promising more bytes than follow.
            os.write(workers._executor._result_queue._writer.fileno(), struct.pack("!i", 1000) + b"x" * 10)
            workers.close(abort=True)
            print("closed")
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert completed.returncode == 0 and completed.stdout.strip() == "closed", completed.stderr


@pytest.mark.parametrize("kind", ["inline", "external"])
def test_serial_and_parallel_outputs_are_identical(stacks, tmp_path, kind):
    source = stacks[kind]
    outputs = {}
    for jobs in (1, 2, 3):
        directory = tmp_path / f"jobs{jobs}"  # same file names: the data file's name is in the model
        directory.mkdir()
        onnx_dc.compress(source, directory / "out.onnx", jobs=jobs)
        outputs[jobs] = _files(directory / "out.onnx")
        onnx_dc.compress(source, directory / "ext.onnx", jobs=jobs, external_data=True)
        outputs[jobs, "external"] = _files(directory / "ext.onnx")
    assert outputs[1] == outputs[2] == outputs[3]
    assert outputs[1, "external"] == outputs[2, "external"] == outputs[3, "external"]
    # An in-memory model: large tensors reach the workers through a spill file.
    proto = onnx.load(str(source))
    serial = onnx_dc.compress(proto, jobs=1).model.SerializeToString()
    assert onnx_dc.compress(proto, jobs=2).model.SerializeToString() == serial


def test_the_command_line_takes_jobs(stacks, tmp_path):
    for jobs in ("1", "2"):
        result = subprocess.run([sys.executable, "-m", "onnx_dc", "compress", str(stacks["external"]), "-o",
                                 str(tmp_path / f"{jobs}.onnx"), "--jobs", jobs, "--no-progress"],
                                capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
    assert (tmp_path / "1.onnx").read_bytes() == (tmp_path / "2.onnx").read_bytes()
    bad = subprocess.run([sys.executable, "-m", "onnx_dc", "compress", str(stacks["external"]), "-o",
                          str(tmp_path / "x.onnx"), "--jobs", "0"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert bad.returncode == 2 and bad.stderr.strip() == "onnx-dc: error: jobs must be an integer >= 1, got 0"


@pytest.mark.parametrize("kind", ["inline", "external"])
@pytest.mark.parametrize("external_output", [False, True])
def test_external_data_round_trips(stacks, tmp_path, ops_library, kind, external_output):
    source = stacks[kind]
    out = tmp_path / "out.onnx"
    result = onnx_dc.compress(source, out, external_data=True if external_output else None)
    assert out.with_name("out.onnx.data").exists() == external_output
    onnx.checker.check_model(str(out), full_check=True)
    # inspect reads the containers one at a time from the file: the same table as compress printed.
    assert onnx_dc.inspect(out).to_dict()["tensors"] == result.report.to_dict()["tensors"]
    cosines = []
    for use_library in (True, False):
        # random weights, 4 layers at the defaults: errors compound, so thresholds below validate's own
        report = onnx_dc.validate(source, out, use_library=use_library, min_cosine=0.8, min_top1_agreement=None)
        assert report.passed and report.used_library == use_library
        cosines.append(report.outputs[0].cosine)
    assert cosines[0] > 0.8 and abs(cosines[0] - cosines[1]) < 1e-4  # random weights, 4 layers: errors compound
    restored = tmp_path / "restored.onnx"
    onnx_dc.decompress(out, restored, external_data=True if external_output else None)
    dense = onnx.load(str(restored))
    for name, tensor in result.compressed.items():
        values = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
        np.testing.assert_array_equal(values[name], tensor.quantized)


def test_open_model_leaves_the_weights_in_their_files(stacks):
    for kind, path in stacks.items():
        loaded = onnx.load(str(path))
        lazy = open_model(path)
        assert lazy.ByteSize() < 10_000  # the graph only
        for tensor, full in zip(lazy.graph.initializer, loaded.graph.initializer):
            assert tensor.data_location == onnx.TensorProto.EXTERNAL
            values = tensor_values(tensor, path.parent)
            assert isinstance(values, np.memmap)
            np.testing.assert_array_equal(values, numpy_helper.to_array(full))
        expected = [] if kind == "inline" else [path.with_name(path.name + ".data").resolve()]
        assert external_data_files(path) == expected
        assert read_structure(path).graph.initializer[0].external_data[0].value == (
            path.name if kind == "inline" else path.name + ".data")


def test_truncated_external_data_is_one_line(stacks, tmp_path):
    source = stacks["external"]
    copy = tmp_path / source.name
    copy.write_bytes(source.read_bytes())
    data = source.with_name(source.name + ".data").read_bytes()
    copy.with_name(copy.name + ".data").write_bytes(data[: len(data) // 2])
    result = subprocess.run([sys.executable, "-m", "onnx_dc", "compress", str(copy), "-o", str(tmp_path / "o.onnx")],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "cannot load external data" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


_OOM_CHILD = textwrap.dedent("""
    import resource, sys
    import onnx_dc.api.cli, onnx_dc.api.convert, onnx_dc.api.functions, onnx_dc.api.parallel, onnx_dc.codec.tensor_task
    size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    limit = size + int(sys.argv[1]) * 2**20  # what is mapped now (interpreter, libraries) plus a margin
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.exit(onnx_dc.api.cli.main(sys.argv[2:]))
""")


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_out_of_memory_is_one_line_with_exit_2_and_no_output(tmp_path, jobs):
    source = write_matmul_stack(small_spec("oom", (4096, 4096, 16), external=True), tmp_path / "oom.onnx")
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", _OOM_CHILD, "48", "compress", str(source), "-o", str(out), "--jobs", jobs],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()  # stage lines (not a terminal), then the one error line
    errors = [line for line in lines if line.startswith("onnx-dc: error:")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = lines[-1]
    assert line.startswith("onnx-dc: error: out of memory compressing tensor 'layers.0.weight' (4096x4096 float32, 64 MiB)")
    assert "MiB" in line and "--jobs" in line or "memory limit" in line
    assert list(out.parent.iterdir()) == []


def test_progress_names_the_stage_and_reports_large_loads_and_writes(stacks, tmp_path, monkeypatch, capsys):
    """Not on a terminal: one line per stage, loading and writing included for large models (a lowered
    threshold here); the step under way is known to error messages."""
    from onnx_dc.api import convert
    from onnx_dc.progress import current_stage, running

    monkeypatch.setattr(convert, "_LONG_STEP_BYTES", 0)
    onnx_dc.compress(stacks["external"], tmp_path / "out.onnx", progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"onnx-dc: loading {stacks['external']} (") and "one tensor at a time" in lines[0]
    assert lines[1] == "onnx-dc: compressing 4 tensors"
    assert lines[2].startswith(f"onnx-dc: writing {tmp_path / 'out.onnx'} (") and len(lines) == 3
    with pytest.raises(MemoryError), running("compressing"), running("writing"):
        raise MemoryError
    assert current_stage() == "writing"


def _dc_matmul_session(container: bytes, k: int, n: int, library: str, *, resident: int | None, trans_b: int = 0,
                       bias: np.ndarray | None = None, relu: int = 0):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    attributes = {"trans_b": trans_b, "relu": relu, **({} if resident is None else {"resident": resident})}
    node = helper.make_node("DCMatMul", ["x", "w"] + (["b"] if bias is not None else []), ["y"],
                            domain="ai.onnx_dc", **attributes)
    initializers = [numpy_helper.from_array(np.frombuffer(container, np.uint8).copy(), "w")]
    if bias is not None:
        initializers.append(numpy_helper.from_array(bias, "b"))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx_dc", 1)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_dc_matmul_on_a_weight_kept_compressed(ops_library):
    """resident=1: decoded chunk by chunk in every run; the same products as the in-memory layouts."""
    from onnx_dc.codec.tensor import TensorSettings, compress_tensor

    rng = np.random.default_rng(8)
    for trial in range(8):
        k, n = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        trans_b = trial % 2
        weight = (rng.standard_normal((n, k) if trans_b else (k, n)) * 0.1).astype(np.float32)
        settings = TensorSettings(sparsity=[0.0, 0.3, 0.95, 0.999][trial % 4], bits=5, index_bits=3,
                                  layout=["auto", "sparse", "dense"][trial % 3])
        compressed = compress_tensor(weight, settings)
        bias = rng.standard_normal(n).astype(np.float32) if trial % 3 == 0 else None
        quantized = (compressed.quantized.T if trans_b else compressed.quantized).astype(np.float64)
        for rows in (1, 3, 70):
            x = rng.standard_normal((rows, k)).astype(np.float32)
            expected = x.astype(np.float64) @ quantized + (0 if bias is None else bias)
            if trial % 2:
                expected = np.maximum(expected, 0)
            for resident in (0, 1):
                session = _dc_matmul_session(compressed.container, k, n, ops_library, resident=resident,
                                             trans_b=trans_b, bias=bias, relu=trial % 2)
                got = session.run(None, {"x": x})[0]
                np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * (np.abs(expected).max() + 1))


def test_a_large_weight_stays_compressed_by_default(ops_library):
    """An 8448 x 4096 weight with 4-bit codes: 33 MiB of code panels (over 32 MiB and 1.5x its container),
    so by default it is kept as its container; a 4224 x 4096 one gets its layout."""
    from onnx_dc.codec.tensor import TensorSettings, encode_tensor

    rng = np.random.default_rng(9)
    for k, resident_by_default in ((8448, True), (4224, False)):
        weight = rng.standard_normal((k, 4096), dtype=np.float32)
        container = encode_tensor(weight, TensorSettings(sparsity=0.0, bits=4)).container
        del weight
        x = rng.standard_normal((2, k)).astype(np.float32)
        automatic = _dc_matmul_session(container, k, 4096, ops_library, resident=None).run(None, {"x": x})[0]
        resident = _dc_matmul_session(container, k, 4096, ops_library, resident=1).run(None, {"x": x})[0]
        layout = _dc_matmul_session(container, k, 4096, ops_library, resident=0).run(None, {"x": x})[0]
        np.testing.assert_array_equal(automatic, resident if resident_by_default else layout)  # the same kernel
        np.testing.assert_allclose(resident, layout, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("external", [False, True])
def test_large_single_files_are_written_a_tensor_at_a_time(stacks, tmp_path, monkeypatch, external):
    """Streamed single files (a lowered threshold here): the same model as the serialized one, and dense
    weights left in the input's files are copied from there."""
    from onnx_dc.graph import model_io

    source = stacks["external" if external else "inline"]
    plain = tmp_path / "plain.onnx"  # from a loaded model: small, serialized in one piece
    onnx_dc.compress(onnx.load(str(source)), plain, recipe=onnx_dc.api.recipe.Recipe(exclude=("layers.1.weight",)))
    monkeypatch.setattr(model_io, "STREAM_MIN_BYTES", 0)
    streamed = tmp_path / "streamed.onnx"
    result = onnx_dc.compress(source, streamed, recipe=onnx_dc.api.recipe.Recipe(exclude=("layers.1.weight",)))
    assert not streamed.with_name("streamed.onnx.data").exists()
    assert streamed.read_bytes() != plain.read_bytes()  # another field order...
    loaded = [onnx.load(str(path)) for path in (streamed, plain)]
    for model in loaded:  # onnx.load marks the tensors it read from external data DEFAULT explicitly
        for tensor in model.graph.initializer:
            tensor.ClearField("data_location")
    assert loaded[0].SerializeToString() == loaded[1].SerializeToString()  # ...the same model
    dense = {t.name: t for t in result.model.graph.initializer}["layers.1.weight"]
    assert dense.data_location == onnx.TensorProto.EXTERNAL  # the result refers to the input's bytes
    onnx.checker.check_model(str(streamed), full_check=True)


def test_calibration_stays_within_its_memory_budget():
    """--max-memory: layers whose statistics exceed it are fitted without the sequential terms or take
    the plain path (said so in the fit table); runs shrink to fit the activations."""
    from calibration_models import classifier, inputs

    from onnx_dc.api.calibrated import describe_calibration
    from onnx_dc.calibration.capture import capture_statistics
    from onnx_dc.calibration.data import load_calibration
    from onnx_dc.calibration.layers import find_layers
    from onnx_dc.calibration.model_fit import compress_with_calibration
    from onnx_dc.calibration.options import CalibrationOptions, LayerSettings

    model = classifier(seed=11, sizes=(16, 64, 48, 32, 6))  # Gram statistics: 2.3, 33.8, 19.2, 8.7 kB
    data = load_calibration({"x": inputs(200, seed=12)}, model)
    settings = {f"fc{i}.weight": LayerSettings(sparsity=0.8, bits=3) for i in range(4)}
    result = compress_with_calibration(model, data, settings, CalibrationOptions(max_memory_bytes=20_000))
    fits = result.results
    assert not fits["fc1.weight"].calibrated and "memory budget" in fits["fc1.weight"].note
    assert all(fits[f"fc{i}.weight"].calibrated for i in (0, 2, 3))
    assert "plain (statistics over the memory budget" in describe_calibration(result)
    # Capture: the same statistics whatever the budget; a small budget takes one sample per run.
    layers = find_layers(model)
    runs = []
    small = capture_statistics(model, data, layers, max_memory_bytes=1, progress=lambda done, total: runs.append(done))
    large = capture_statistics(model, data, layers)
    assert len(runs) == 4 * 200  # four passes (one layer each), a sample per run
    for layer in layers:
        np.testing.assert_allclose(small[layer.weight].gram[0], large[layer.weight].gram[0], rtol=1e-9, atol=1e-9)


def test_max_memory_flag(tmp_path):
    from onnx_dc.api.cli import main, parse_size
    from onnx_dc.errors import SettingsError

    assert parse_size("512M", "--max-memory") == 512 * 2**20 and parse_size("1.5g", "--max-memory") == 3 * 2**29
    assert parse_size("1000", "--max-memory") == 1000
    for bad in ("lots", "0", "-1G", "2X"):
        with pytest.raises(SettingsError, match="--max-memory"):
            parse_size(bad, "--max-memory")
    model = tmp_path / "m.onnx"
    write_matmul_stack(small_spec("m", (64, 48, 32), external=False), model)
    assert main(["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--max-memory", "1G", "--no-progress"]) == 2


@pytest.mark.parametrize("external", [False, True])
def test_calibrated_fits_leave_large_weights_in_their_files(tmp_path, monkeypatch, external):
    """--calib on a model over STREAMED_CALIBRATION_BYTES: opened with its weights left in their files
    (anchored references, sessions on hard-linked data); the fits match those of the model held in memory
    (the first layer's exactly; later layers' inputs come from onnxruntime runs without prepacked weights,
    which round differently)."""
    import tempfile

    import onnx_dc.api.calibrated as calibrated
    from onnx_dc.api.recipe import CalibrationRecipe, Recipe
    from onnx_dc.calibration.options import CalibrationOptions

    source = write_matmul_stack(small_spec("s", (160, 96, 64, 32), external=external, seed=4), tmp_path / "s.onnx")
    calib = {"x": np.random.default_rng(3).standard_normal((24, 160)).astype(np.float32)}
    recipe = Recipe(calibration=CalibrationRecipe(options=CalibrationOptions(refit_rounds=1, sequential=False)))
    in_memory = onnx_dc.compress(source, tmp_path / "memory.onnx", recipe=recipe, calib=calib)
    monkeypatch.setattr(calibrated, "STREAMED_CALIBRATION_BYTES", 0)
    opened = []
    real_open = calibrated.open_model
    monkeypatch.setattr(calibrated, "open_model", lambda *a, **k: opened.append(k) or real_open(*a, **k))
    streamed = onnx_dc.compress(source, tmp_path / "streamed.onnx", recipe=recipe, calib=calib)
    assert opened == [{"anchored": True}]

    def containers(result):
        return {t.name: bytes(t.raw_data) for t in result.model.graph.initializer if t.name.endswith("__dc")}

    assert list(containers(streamed)) == list(containers(in_memory)) and len(containers(streamed)) == 3
    assert containers(streamed)["layers.0.weight__dc"] == containers(in_memory)["layers.0.weight__dc"]
    assert [r.relative_error for r in streamed.calibration.results.values()] == pytest.approx(
        [r.relative_error for r in in_memory.calibration.results.values()], rel=1e-3
    )
    assert streamed.report.original_bytes == in_memory.report.original_bytes
    assert streamed.report.original_file_bytes == pytest.approx(in_memory.report.original_file_bytes, rel=0.01)
    assert not any(p.name.startswith("onnx-dc-calib-") for p in Path(tempfile.gettempdir()).iterdir())


def test_anchored_references_are_the_loaders_own(stacks, tmp_path):
    """open_model(anchored=True) writes the directory itself: an anchor in the file is replaced."""
    from onnx_dc.graph.tensor_store import ANCHOR_KEY, anchor_of, tensor_array

    source = stacks["external"]
    model = onnx.load(str(source), load_external_data=False)
    forged = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    entry = forged.external_data.add()
    entry.key, entry.value = ANCHOR_KEY, "/"
    copy = tmp_path / "external.onnx"
    onnx.save(model, str(copy))
    for data in external_data_files(source):
        os.link(data, tmp_path / data.name)
    opened = open_model(copy, anchored=True)
    tensor = next(t for t in opened.graph.initializer if t.name == forged.name)
    assert anchor_of(tensor) == str(tmp_path.resolve())
    assert [e.key for e in tensor.external_data].count(ANCHOR_KEY) == 1
    np.testing.assert_array_equal(tensor_array(tensor), tensor_values(tensor, tmp_path))
    with pytest.raises(onnx_dc.errors.ModelError, match="directory is not known"):
        tensor_array(next(t for t in open_model(copy).graph.initializer if t.name == forged.name))


def test_large_layers_get_the_cheap_fits_and_say_so(tmp_path, monkeypatch):
    """--calib alone on layers over LARGE_FIT_COST: activation-aware pruning and k-means, a note saying so;
    options given explicitly are used as given."""
    import onnx_dc.api.calibrated as calibrated

    model = tmp_path / "m.onnx"
    write_matmul_stack(small_spec("m", (96, 64, 32), external=False), model)
    calib = {"x": np.random.default_rng(0).standard_normal((32, 96)).astype(np.float32)}
    full = onnx_dc.compress(model, calib=calib)
    assert not any("large layers" in note for note in full.report.notes)
    monkeypatch.setattr(calibrated, "LARGE_FIT_COST", 0.0)
    cheap = onnx_dc.compress(model, calib=calib)
    assert any("large layers" in note for note in cheap.report.notes)
    assert {r.criterion for r in cheap.calibration.results.values()} == {"activation"}
    from onnx_dc.api.recipe import CalibrationRecipe, Recipe
    from onnx_dc.calibration.options import CalibrationOptions

    given = onnx_dc.compress(
        model, recipe=Recipe(calibration=CalibrationRecipe(options=CalibrationOptions(criterion="obs"))), calib=calib
    )
    assert {r.criterion for r in given.calibration.results.values()} == {"obs"}


def test_calibration_groups_stay_within_the_budget():
    from onnx_dc.calibration.layers import find_layers
    from onnx_dc.calibration.model_fit import _groups_within
    from calibration_models import classifier

    layers = find_layers(classifier(seed=11, sizes=(16, 64, 48, 32, 6)))  # 2.3, 33.8, 19.2, 8.7 kB
    groups = _groups_within(layers, 40_000)
    assert [[layer.weight for layer in g] for g in groups] == [["fc0.weight", "fc1.weight"], ["fc2.weight", "fc3.weight"]]
    assert [len(g) for g in _groups_within(layers, 1)] == [1, 1, 1, 1]
