"""The registry of real pretrained ONNX models that ship inside PyPI wheels.

Each :class:`RealModel` knows where its file comes from (a pinned wheel and a
SHA-256), how to make realistic inputs for calibration and for evaluation (two
explicit, disjoint splits) and a task-level fidelity metric comparing a reference
model with a candidate on evaluation inputs. Metrics take *runners*: an
``onnxruntime.InferenceSession`` or any callable ``feed -> list of outputs``; this
module never creates sessions, so callers decide on providers, threads and custom
operator libraries.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from onnx_dc.errors import CalibrationError, ModelError
from model_zoo.real import detector, ocr, photos
from model_zoo.real.fetch import WheelFile, fetch_wheel_file

Feed = dict[str, np.ndarray]
Runner = Callable[[Feed], Sequence[np.ndarray]]

SPLITS = photos.SPLITS
_SPLIT_KEYS = {"calib": 0, "eval": 1}


def as_runner(model: Any) -> Runner:
    """Turn an onnxruntime session (anything with ``run`` and ``get_inputs``) or a callable into a runner."""
    if hasattr(model, "run") and hasattr(model, "get_inputs"):
        return lambda feed: model.run(None, feed)
    if callable(model):
        return model
    raise ModelError(
        f"expected an onnxruntime.InferenceSession or a callable feed -> outputs, got {type(model).__name__}"
    )


@dataclass(frozen=True)
class Sample:
    """One generated input (``feed``) with what the generator knows about it (``truth``)."""

    feed: Feed
    truth: Any


class RealModel(ABC):
    """A real pretrained model from a PyPI wheel, with input generators and a task metric."""

    name: str
    description: str
    source: WheelFile
    input_name: str
    primary: str
    """Key of :meth:`task_metric`'s result that summarises fidelity; higher is better, 1.0 is perfect."""

    def __init__(self, name: str, description: str, source: WheelFile, input_name: str, primary: str) -> None:
        self.name = name
        self.description = description
        self.source = source
        self.input_name = input_name
        self.primary = primary

    def __repr__(self) -> str:
        return f"RealModel({self.name!r}, {self.source.requirement} {self.source.member})"

    def path(self) -> Path:
        """Local path of the verified model file, downloading and extracting it if needed."""
        return fetch_wheel_file(self.source)

    def load(self) -> onnx.ModelProto:
        """The model as an :class:`onnx.ModelProto` (checksum verified first)."""
        return onnx.load(str(self.path()))

    def make_samples(self, split: str, n: int, seed: int = 0) -> list[Sample]:
        """``n`` generated inputs with their ground truth, for ``split`` ``"calib"`` or ``"eval"``.

        Sample ``i`` depends only on ``(model, split, seed, i)``, so a smaller ``n`` gives
        a prefix of a larger one. The splits use independent random streams and disjoint
        source photos (see ``photos.BACKGROUNDS``), so no input is shared between them.
        """
        _check_split_args(split, n, seed)
        salt = zlib.crc32(self.name.encode())
        return [
            self._make_sample(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(salt, _SPLIT_KEYS[split], index))), split)
            for index in range(n)
        ]

    def make_inputs(self, split: str, n: int, seed: int = 0) -> list[Feed]:
        """``n`` input feeds ``{input_name: float32 array}`` (batch 1) for ``split``."""
        return [sample.feed for sample in self.make_samples(split, n, seed)]

    def task_metric(self, reference: Any, candidate: Any, inputs: Sequence[Feed]) -> dict[str, float]:
        """Compare the candidate's task answers with the reference's on ``inputs``.

        ``reference`` and ``candidate`` are sessions or callables (see :func:`as_runner`).
        The result always holds :attr:`primary` (higher is better, 1.0 when identical).
        """
        return self._metric(as_runner(reference), as_runner(candidate), inputs)

    def truth_metric(self, runner: Any, samples: Sequence[Sample]) -> dict[str, float]:
        """How well ``runner`` does against the generator's own ground truth (a sanity check of the inputs)."""
        raise ModelError(f"{self.name} has no ground truth for its generated inputs")

    @abstractmethod
    def _make_sample(self, rng: np.random.Generator, split: str) -> Sample: ...

    @abstractmethod
    def _metric(self, reference: Runner, candidate: Runner, inputs: Sequence[Feed]) -> dict[str, float]: ...


class TextDetectionModel(RealModel):
    """PP-OCR DB text detector: inputs are rendered pages and scenes, metric is box F1."""

    def _make_sample(self, rng: np.random.Generator, split: str) -> Sample:
        page = ocr.render_text_page(rng, split, _dictionary_of(_REC_SOURCE))
        return Sample(feed={self.input_name: ocr.det_preprocess(page.image)}, truth=page)

    def _metric(self, reference: Runner, candidate: Runner, inputs: Sequence[Feed]) -> dict[str, float]:
        return ocr.det_metric(reference, candidate, inputs)

    def truth_metric(self, runner: Any, samples: Sequence[Sample]) -> dict[str, float]:
        """Box F1 of ``runner`` against the rendered lines' ink boxes."""
        return ocr.det_truth_metric(as_runner(runner), [sample.truth for sample in samples])


class TextRecognitionModel(RealModel):
    """PP-OCR CTC text recogniser: inputs are upright rendered lines, metric is exact match / CER."""

    def characters(self) -> list[str]:
        """CTC classes of this model (blank, its dictionary from metadata, space)."""
        return _dictionary_of(self.source)

    def _make_sample(self, rng: np.random.Generator, split: str) -> Sample:
        line = ocr.render_text_line(rng, split, self.characters(), allow_rotation=False)
        return Sample(feed={self.input_name: ocr.rec_preprocess(line.image, ocr.REC_BATCH_WH_RATIO)}, truth=line)

    def _metric(self, reference: Runner, candidate: Runner, inputs: Sequence[Feed]) -> dict[str, float]:
        return ocr.rec_metric(reference, candidate, inputs, self.characters())

    def truth_metric(self, runner: Any, samples: Sequence[Sample]) -> dict[str, float]:
        """Exact match and CER of ``runner``'s reading against the rendered text."""
        return ocr.rec_truth_metric(as_runner(runner), [sample.truth for sample in samples], self.characters())


class TextDirectionModel(RealModel):
    """PP-OCR 0/180 degree text direction classifier: half the lines upside down, metric is label agreement."""

    def _make_sample(self, rng: np.random.Generator, split: str) -> Sample:
        line = ocr.render_text_line(rng, split, _dictionary_of(_REC_SOURCE), allow_rotation=True)
        return Sample(feed={self.input_name: ocr.cls_preprocess(line.image)}, truth=line)

    def _metric(self, reference: Runner, candidate: Runner, inputs: Sequence[Feed]) -> dict[str, float]:
        return ocr.cls_metric(reference, candidate, inputs)

    def truth_metric(self, runner: Any, samples: Sequence[Sample]) -> dict[str, float]:
        """Orientation accuracy of ``runner`` on the rendered lines."""
        return ocr.cls_truth_metric(as_runner(runner), [sample.truth for sample in samples])


class ObjectDetectionModel(RealModel):
    """YOLOv8 detector: inputs are people scenes, metric is class-aware box F1 against the reference."""

    def _make_sample(self, rng: np.random.Generator, split: str) -> Sample:
        scene = detector.render_scene(rng, split)
        return Sample(feed={self.input_name: detector.preprocess(scene)}, truth=None)

    def _metric(self, reference: Runner, candidate: Runner, inputs: Sequence[Feed]) -> dict[str, float]:
        return detector.detection_metric(reference, candidate, inputs)


def stack_feeds(feeds: Sequence[Feed]) -> dict[str, np.ndarray]:
    """Concatenate batch-1 feeds along axis 0 into one feed (e.g. to save as ``.npz``).

    Every model here generates inputs of one fixed shape, so its feeds always stack.
    """
    if not feeds:
        raise CalibrationError("no feeds to stack")
    names = set(feeds[0])
    for feed in feeds:
        if set(feed) != names:
            raise CalibrationError(f"feeds have different input names: {sorted(names)} vs {sorted(feed)}")
    stacked = {}
    for name in sorted(names):
        shapes = {feed[name].shape[1:] for feed in feeds}
        if len(shapes) != 1:
            raise CalibrationError(f"input {name!r} has feeds of different shapes {sorted(shapes)}; they cannot be stacked")
        stacked[name] = np.concatenate([feed[name] for feed in feeds], axis=0)
    return stacked


def _check_split_args(split: str, n: int, seed: int) -> None:
    if split not in SPLITS:
        raise CalibrationError(f"unknown split {split!r}; use 'calib' or 'eval'")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise CalibrationError(f"number of inputs must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CalibrationError(f"seed must be a non-negative integer, got {seed!r}")


@lru_cache(maxsize=None)
def _dictionary_tuple(source: WheelFile) -> tuple[str, ...]:
    model = onnx.load(str(fetch_wheel_file(source)), load_external_data=False)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    if "character" not in metadata:
        raise ModelError(f"{source.member} has no 'character' metadata (the CTC dictionary)")
    return tuple(ocr.ctc_characters(metadata["character"]))


def _dictionary_of(source: WheelFile) -> list[str]:
    return list(_dictionary_tuple(source))


_RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")
_DET_SOURCE = WheelFile(
    *_RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", 4745517,
)
_REC_SOURCE = WheelFile(
    *_RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
    "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", 10857958,
)
_CLS_SOURCE = WheelFile(
    *_RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", 585532,
)
_NUDENET_SOURCE = WheelFile(
    "nudenet", "3.4.2", "nudenet/320n.onnx",
    "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f", 12150158,
)

_MODELS: dict[str, RealModel] = {
    model.name: model
    for model in (
        TextDetectionModel(
            "ppocrv4-det", "PP-OCRv4 DB text detector (Chinese/English), from rapidocr-onnxruntime 1.4.4",
            _DET_SOURCE, "x", "box_f1",
        ),
        TextRecognitionModel(
            "ppocrv4-rec", "PP-OCRv4 SVTR-LCNet CTC text recogniser, 6625 classes, from rapidocr-onnxruntime 1.4.4",
            _REC_SOURCE, "x", "exact_match",
        ),
        TextDirectionModel(
            "ppocr-mobile-v2-cls", "PP-OCR mobile v2.0 text direction classifier (0/180), from rapidocr-onnxruntime 1.4.4",
            _CLS_SOURCE, "x", "label_agreement",
        ),
        ObjectDetectionModel(
            "nudenet-320n", "NudeNet YOLOv8n body-part detector, 320x320, 18 classes, from nudenet 3.4.2",
            _NUDENET_SOURCE, "images", "box_f1",
        ),
    )
}


def list_models() -> list[str]:
    """Names of the registered real models."""
    return list(_MODELS)


def get(name: str) -> RealModel:
    """The registered model called ``name``; :class:`ModelError` lists the known names otherwise."""
    try:
        return _MODELS[name]
    except KeyError:
        raise ModelError(f"unknown real model {name!r}; known: {', '.join(_MODELS)}") from None
