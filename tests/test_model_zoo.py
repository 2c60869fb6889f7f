"""Tests of model_zoo: Fashion-MNIST loader and splits, the committed LeNets, the evaluation command."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import model_zoo
from model_zoo import MODELS, get_model, get_model_path, list_models
from model_zoo.evaluate import (
    CUSTOM_OPS_DOMAIN,
    create_session,
    evaluate,
    evaluate_accuracy,
    main as evaluate_main,
    predict_classes,
    uses_custom_ops,
)
from model_zoo.fashion_mnist import (
    CLASS_NAMES,
    SYSTEM_DATA_DIR,
    DatasetFormatError,
    DatasetNotFoundError,
    calibration_set,
    candidate_data_dirs,
    evaluation_set,
    find_data_dir,
    load_fashion_mnist,
    read_idx,
    validation_set,
)
from onnx_dc.errors import ModelError, OnnxDcError, SettingsError

FILE_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

try:
    find_data_dir()
    HAVE_DATA = True
except DatasetNotFoundError:
    HAVE_DATA = False
# `make setup` installs the data set; a machine without it fails these tests rather than skipping them.
needs_data = pytest.mark.usefixtures("_require_data")


@pytest.fixture
def _require_data() -> None:
    if not HAVE_DATA:
        pytest.fail("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_dataset(directory: Path, n_train: int = 60000, n_test: int = 10000, *, source: Path | None = None) -> None:
    """Write the four files: symlinks to the real ones, or synthetic arrays of the given sizes."""
    directory.mkdir(parents=True, exist_ok=True)
    if source is not None:
        for name in FILE_NAMES:
            (directory / name).symlink_to(source / name)
        return
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        (directory / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
        (directory / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))


# ---------------------------------------------------------------- loader


@pytest.mark.slow  # the full suite only: reads all of Fashion-MNIST
@needs_data
def test_load_real_files_shapes_dtypes_and_ranges() -> None:
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = load_fashion_mnist(split)
        assert images.shape == (n, 1, 28, 28) and images.dtype == np.float32
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert float(images.min()) == 0.0 and float(images.max()) == 1.0
        # Fashion-MNIST is balanced: 6000 / 1000 images per class.
        assert np.array_equal(np.bincount(labels, minlength=10), np.full(10, n // 10))
        # pixels are k / 255 exactly
        assert np.allclose(np.round(images * 255) / 255, images, atol=0)


@needs_data
def test_loaded_arrays_are_read_only_and_cached() -> None:
    images, labels = load_fashion_mnist("test")
    with pytest.raises(ValueError):
        images[0, 0, 0, 0] = 1.0
    with pytest.raises(ValueError):
        labels[0] = 3
    again_images, _ = load_fashion_mnist("test")
    assert again_images is images


def test_unknown_split_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="split"):
        load_fashion_mnist("validation")


def test_missing_data_message_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist("test", data_dir=tmp_path)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path) in message
    assert "\n" not in message
    assert isinstance(info.value, OnnxDcError)


def test_search_order_env_var_then_user_cache_then_system(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ONNX_DC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    dirs = candidate_data_dirs()
    assert dirs == [
        tmp_path / "fashion-mnist",
        tmp_path,
        tmp_path / "home" / ".cache" / "onnx-dc" / "fashion-mnist",
        SYSTEM_DATA_DIR,
    ]
    assert candidate_data_dirs(tmp_path / "x") == [tmp_path / "x"]


@needs_data
def test_env_var_directory_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _write_dataset(tmp_path / "fashion-mnist", source=find_data_dir())
    monkeypatch.setenv("ONNX_DC_DATA_DIR", str(tmp_path))
    assert find_data_dir() == tmp_path / "fashion-mnist"
    images, labels = load_fashion_mnist("test")
    reference_images, reference_labels = load_fashion_mnist("test", data_dir=SYSTEM_DATA_DIR)
    assert np.array_equal(images, reference_images) and np.array_equal(labels, reference_labels)


def test_plain_and_gzip_idx_files_read_the_same(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(array))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    assert np.array_equal(read_idx(tmp_path / "a", expected_ndim=3), array)
    assert np.array_equal(read_idx(tmp_path / "a.gz", expected_ndim=3), array)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x01\x00\x08\x03" + b"\x00" * 12, "magic"),
        (b"\x00\x00\x0d\x03" + b"\x00" * 12, "unsigned byte"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"\x00" * 4, "dimensions"),
        (b"\x00\x00\x08\x03" + struct.pack(">III", 2, 28, 28) + b"\x00" * 100, "payload"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated"),
        (b"\x1f\x8b not really gzip", "cannot read"),
        (b"", "magic"),
    ],
    ids=["bad-magic", "float-type", "wrong-ndim", "short-payload", "short-header", "bad-gzip", "empty"],
)
def test_invalid_idx_files_are_rejected(tmp_path: Path, payload: bytes, match: str) -> None:
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(payload)
    with pytest.raises(DatasetFormatError, match=match):
        read_idx(path, expected_ndim=3)


def test_wrong_image_count_is_rejected(tmp_path: Path) -> None:
    _write_dataset(tmp_path, n_train=60000, n_test=20)
    with pytest.raises(DatasetFormatError, match="expected"):
        load_fashion_mnist("test", data_dir=tmp_path)


def test_out_of_range_label_is_rejected(tmp_path: Path) -> None:
    _write_dataset(tmp_path, n_train=60000, n_test=10000)
    labels = np.zeros(10000, dtype=np.uint8)
    labels[7] = 10
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
    with pytest.raises(DatasetFormatError, match="label 10"):
        load_fashion_mnist("test", data_dir=tmp_path)


# ---------------------------------------------------------------- splits


@needs_data
def test_calibration_comes_from_train_and_evaluation_from_test() -> None:
    calibration = calibration_set(500, seed=3)
    evaluation = evaluation_set(300)
    train_images, train_labels = load_fashion_mnist("train")
    test_images, _ = load_fashion_mnist("test")
    assert calibration.split == "train" and evaluation.split == "test"
    assert np.array_equal(calibration.images, train_images[calibration.indices])
    assert np.array_equal(calibration.labels, train_labels[calibration.indices])
    assert np.array_equal(evaluation.images, test_images[:300])
    assert len(np.unique(calibration.indices)) == 500
    # No calibration image is (byte-for-byte) an evaluation image.
    test_rows = {row.tobytes() for row in test_images.reshape(len(test_images), -1)}
    assert not any(row.tobytes() in test_rows for row in calibration.images.reshape(500, -1))


@needs_data
def test_calibration_and_validation_are_disjoint_and_seeded() -> None:
    calibration = calibration_set(30000, seed=7)
    validation = validation_set(30000, seed=7)
    assert validation.split == "train"
    assert np.intersect1d(calibration.indices, validation.indices).size == 0
    assert np.array_equal(np.sort(np.concatenate([calibration.indices, validation.indices])), np.arange(60000))
    assert np.array_equal(calibration_set(100, seed=7).indices, calibration.indices[:100])
    assert not np.array_equal(calibration_set(100, seed=8).indices, calibration.indices[:100])


@needs_data
def test_seeded_evaluation_subset() -> None:
    first = evaluation_set(200, seed=1)
    assert np.array_equal(first.indices, evaluation_set(200, seed=1).indices)
    assert np.all(np.diff(first.indices) > 0)
    assert len(evaluation_set()) == 10000


@pytest.mark.parametrize("n_samples", [0, -1, 60001])
def test_out_of_range_sample_counts(n_samples: int) -> None:
    with pytest.raises(SettingsError, match="n_samples"):
        calibration_set(n_samples)


def test_non_integer_sample_count() -> None:
    with pytest.raises(TypeError):
        calibration_set(1.5)  # type: ignore[arg-type]


@needs_data
def test_save_npz_round_trip(tmp_path: Path) -> None:
    calibration = calibration_set(64, seed=0)
    path = tmp_path / "calib.npz"
    calibration.save_npz(path, input_name="input", labels=False)
    with np.load(path) as data:
        assert sorted(data.files) == ["input"]
        assert np.array_equal(data["input"], calibration.images)
    calibration.save_npz(path)
    with np.load(path) as data:
        assert sorted(data.files) == ["input", "labels"]
        assert np.array_equal(data["labels"], calibration.labels)
    assert [p.name for p in tmp_path.iterdir()] == ["calib.npz"]  # no temporary file left


# ---------------------------------------------------------------- registry and committed models


def test_registry() -> None:
    assert list_models() == ["lenet_300_100", "lenet5"]
    entry = get_model("lenet5")
    assert entry.path == model_zoo.MODELS_DIR / "lenet5.onnx"
    with pytest.raises(ModelError, match="unknown zoo model"):
        get_model_path("alexnet")


@pytest.mark.parametrize("name", list(MODELS))
def test_committed_model_file(name: str) -> None:
    entry = get_model(name)
    path = get_model_path(name)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == [entry.input_name]
    assert [o.name for o in model.graph.output] == [entry.output_name]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == list(entry.input_shape)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {opset.domain for opset in model.opset_import} == {""}
    assert not uses_custom_ops(model)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    assert metadata["class_names"].count('"') == 2 * len(CLASS_NAMES)
    assert all(init.data_type == TensorProto.FLOAT for init in model.graph.initializer)


def test_model_architectures() -> None:
    def weight_shapes(name: str) -> dict[str, list[int]]:
        model = onnx.load(str(get_model_path(name)))
        return {init.name: list(init.dims) for init in model.graph.initializer if init.name.endswith("weight")}

    assert weight_shapes("lenet_300_100") == {"fc1.weight": [300, 784], "fc2.weight": [100, 300],
                                              "fc3.weight": [10, 100]}
    assert weight_shapes("lenet5") == {"conv1.weight": [20, 1, 5, 5], "conv2.weight": [50, 20, 5, 5],
                                       "fc1.weight": [500, 800], "fc2.weight": [10, 500]}


@needs_data
@pytest.mark.parametrize("name", list(MODELS))
def test_test_set_accuracy_is_as_recorded(name: str) -> None:
    entry = get_model(name)
    result = evaluate(get_model_path(name))
    assert result.n_images == 10000 and result.split == "test" and not result.custom_ops
    assert result.accuracy >= entry.test_accuracy - 0.005


# ---------------------------------------------------------------- evaluation


def _with_flat_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """LeNet-300-100 taking [N, 784] (same weights): drop the Flatten node."""
    flat = onnx.ModelProto()
    flat.CopyFrom(model)
    graph = flat.graph
    flatten = next(node for node in graph.node if node.op_type == "Flatten")
    graph.node.remove(flatten)
    for node in graph.node:
        node.input[:] = ["input" if name == flatten.output[0] else name for name in node.input]
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 784]))
    del graph.value_info[:]
    return flat


def _with_fixed_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    fixed.graph.output[0].type.tensor_type.shape.dim[0].dim_value = batch
    del fixed.graph.value_info[:]
    return fixed


@needs_data
def test_evaluate_proto_limit_batching_and_input_rank() -> None:
    path = get_model_path("lenet_300_100")
    model = onnx.load(str(path))
    reference = evaluate(path, limit=700)
    assert reference.n_images == 700
    assert evaluate(model, limit=700, batch_size=64) == reference
    assert evaluate(_with_flat_input(model), limit=700) == reference
    assert evaluate(_with_fixed_batch(model, 128), limit=700) == reference
    assert evaluate_accuracy(model, limit=700) == reference.accuracy
    # on another labelled set
    validation = validation_set(400, seed=0)
    on_validation = evaluate(model, dataset=validation)
    assert on_validation.split == "train" and on_validation.n_images == 400


@needs_data
def test_predictions_match_a_numpy_forward_pass() -> None:
    model = onnx.load(str(get_model_path("lenet_300_100")))
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    images = evaluation_set(300).images
    hidden = images.reshape(300, -1)
    for layer in ("fc1", "fc2"):
        hidden = np.maximum(hidden @ weights[f"{layer}.weight"].T + weights[f"{layer}.bias"], 0)
    logits = hidden @ weights["fc3.weight"].T + weights["fc3.bias"]
    session, _ = create_session(model)
    predicted = predict_classes(session, images)
    agree = np.mean(predicted == logits.argmax(axis=1))
    assert agree >= 0.995  # ties within float rounding may flip a rare image


def _custom_domain_model() -> onnx.ModelProto:
    node = helper.make_node("DCNoSuchOp", ["input"], ["logits"], domain=CUSTOM_OPS_DOMAIN)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(CUSTOM_OPS_DOMAIN, 1)])


def test_custom_ops_detection() -> None:
    model = _custom_domain_model()
    assert uses_custom_ops(model)
    # inside an If branch, without the opset import
    inner = _custom_domain_model().graph
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    if_node = helper.make_node("If", ["c"], ["logits"], then_branch=inner, else_branch=inner)
    outer = helper.make_graph([if_node], "outer", [cond], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)])
    assert uses_custom_ops(helper.make_model(outer, opset_imports=[helper.make_opsetid("", 17)]))
    assert not uses_custom_ops(onnx.load(str(get_model_path("lenet5"))))


def test_compressed_model_without_library_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match=CUSTOM_OPS_DOMAIN):
        create_session(_custom_domain_model(), custom_ops=False)


def test_missing_or_invalid_model_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such model file"):
        evaluate(tmp_path / "absent.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 this is not a protobuf \xff\xff")
    with pytest.raises(ModelError):
        evaluate(garbage)
    with pytest.raises(SettingsError):
        evaluate(get_model_path("lenet5"), limit=0)


def test_wrong_model_interface_is_rejected() -> None:
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 32, 32])],
    )
    session, _ = create_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(ModelError, match="expected"):
        predict_classes(session, np.zeros((2, 1, 28, 28), np.float32))


@needs_data
def test_command_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert evaluate_main(["lenet5", "--limit", "250"]) == 0
    out = capsys.readouterr().out
    assert "/250 Fashion-MNIST test images" in out and "top-1 accuracy" in out
    assert evaluate_main([str(get_model_path("lenet_300_100")), "--limit", "50", "--json"]) == 0
    assert '"n_images": 50' in capsys.readouterr().out
    assert evaluate_main([str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@needs_data
@pytest.mark.parametrize("name", list(MODELS))
def test_compressed_and_decompressed_models_agree(name: str) -> None:
    import onnx_dc

    compressed = onnx_dc.compress(get_model_path(name)).model
    assert uses_custom_ops(compressed)
    with_library = evaluate(compressed, limit=2000)
    assert with_library.custom_ops
    decompressed = onnx_dc.decompress(compressed)
    assert not uses_custom_ops(decompressed)
    plain = evaluate(decompressed, limit=2000)
    assert not plain.custom_ops
    assert abs(with_library.n_correct - plain.n_correct) <= 2  # identical weights; float summation order only


# ---------------------------------------------------------------- training script (the `train` extra, installed by make setup)


@pytest.mark.slow  # the full suite only: trains a LeNet with torch
@needs_data
@pytest.mark.parametrize("name", list(MODELS))
def test_training_script_exports_a_model_onnxruntime_agrees_with(name: str, tmp_path: Path) -> None:
    from model_zoo import train_lenet

    train = calibration_set(256, seed=0)
    recipe = train_lenet.TrainingRecipe(epochs=1, batch_size=64, max_lr=1e-3, weight_decay=0.0, dropout=0.1,
                                        max_shift_px=1, flip=True)
    model = train_lenet.train_model(name, train.images, train.labels, recipe, seed=0, log_every_epochs=10)
    images = evaluation_set(100).images
    onnx_model = train_lenet.build_onnx(name, model, {"note": "test"})
    max_abs_diff = train_lenet.check_onnx_matches_torch(onnx_model, train_lenet._predict_logits(model, images), images)
    assert max_abs_diff < 1e-4
    assert [i.name for i in onnx_model.graph.input] == ["input"]
    assert [o.name for o in onnx_model.graph.output] == ["logits"]
