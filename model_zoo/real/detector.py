"""NudeNet 3.4.2 ``320n.onnx`` (Ultralytics YOLOv8n, 18 classes): scenes, pre/post-processing, metric.

Preprocessing and decoding follow ``nudenet/nudenet.py`` of the wheel, without
OpenCV: the image is padded on the right and bottom to a square with black, resized
to 320x320 (bilinear), scaled to [0, 1], RGB, NCHW. The output ``[1, 22, 2100]`` holds
per anchor ``cx, cy, w, h`` and 18 class scores; candidates scoring at least 0.2 go
through class-agnostic non-maximum suppression (IoU 0.45, score threshold 0.25), as
nudenet's ``cv2.dnn.NMSBoxes`` call does. Boxes stay in the 320x320 input frame.

The classes are nudity-related (faces, exposed or covered body parts). The task
metric is agreement with the original model, not correctness, so the inputs are
ordinary clothed-people scenes built from photos in the scikit-image wheel: whole
person photos, person crops and face crops (Labeled Faces in the Wild subset)
pasted on scene backgrounds; the model mostly answers ``FACE_FEMALE``/``FACE_MALE``
on them, and a few body-part classes at low scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from model_zoo.real import photos
from model_zoo.real.matching import MatchCounts, match_boxes
from model_zoo.real.text_images import degrade

Feed = dict[str, np.ndarray]
Runner = Callable[[Feed], Sequence[np.ndarray]]

INPUT_SIZE_PX = 320
CANDIDATE_SCORE = 0.2
NMS_SCORE = 0.25
NMS_IOU = 0.45
BOX_MIN_IOU = 0.5
CLASS_NAMES = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED",
    "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE",
    "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)


@dataclass(frozen=True)
class Detections:
    """Detections of one image: boxes ``[n, 4]`` (x0, y0, x1, y1), scores ``[n]``, class ids ``[n]``."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


def render_scene(rng: np.random.Generator, split: str) -> np.ndarray:
    """One RGB ``uint8`` scene with people: a person photo, or person and face crops on a background.

    Pasted crops never overlap, so each head stays visible.
    """
    width = int(rng.integers(360, 800))
    height = int(width / rng.uniform(0.7, 1.6))
    if rng.random() < 0.25:
        person = photos.load_photo(_pick(rng, photos.PERSON_PHOTOS[split]))
        image = Image.fromarray(photos.random_crop(person, width, height, rng))
    else:
        background = photos.load_photo(_pick(rng, photos.BACKGROUNDS[split]))
        image = Image.fromarray(photos.random_crop(background, width, height, rng))
        occupied: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(1, 4))):
            side = int(min(width, height) * rng.uniform(0.3, 0.6))
            position = _free_position(rng, occupied, width, height, side)
            if position is not None:
                patch = photos.head_crop(_pick(rng, photos.PERSON_PHOTOS[split]), side, rng)
                image.paste(Image.fromarray(patch), position)
        faces = photos.face_crops(split)
        for _ in range(int(rng.integers(0, 3))):
            _paste_grey_patch(rng, image, occupied, faces[int(rng.integers(0, len(faces)))])
        if rng.random() < 0.3:
            others = photos.non_face_crops(split)
            _paste_grey_patch(rng, image, occupied, others[int(rng.integers(0, len(others)))])
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.75, 1.25)))
    image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.8, 1.2)))
    return degrade(np.asarray(image, dtype=np.uint8), rng)


def _paste_grey_patch(
    rng: np.random.Generator, image: Image.Image, occupied: list[tuple[int, int, int, int]], grey_25px: np.ndarray
) -> None:
    """Paste a tinted, upscaled 25x25 grey crop where nothing has been pasted yet."""
    width, height = image.size
    side = int(min(width, height) * rng.uniform(0.22, 0.4))
    position = _free_position(rng, occupied, width, height, side)
    if position is None:
        return
    tint = np.array([1.0, rng.uniform(0.78, 0.92), rng.uniform(0.62, 0.82)], dtype=np.float32)
    with Image.fromarray(grey_25px) as small:
        upscaled = small.resize((side, side), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(side / 80))
        grey = np.asarray(upscaled, dtype=np.float32)
    colour = np.clip(grey[..., None] * tint, 0, 255).astype(np.uint8)
    image.paste(Image.fromarray(colour), position)


def _free_position(
    rng: np.random.Generator, occupied: list[tuple[int, int, int, int]], width: int, height: int, side: int
) -> tuple[int, int] | None:
    """A top-left corner for a ``side`` square that overlaps no occupied box (recorded), or None."""
    for _ in range(30):
        x = int(rng.integers(0, max(1, width - side)))
        y = int(rng.integers(0, max(1, height - side)))
        if all(x + side <= x0 or x >= x1 or y + side <= y0 or y >= y1 for x0, y0, x1, y1 in occupied):
            occupied.append((x, y, x + side, y + side))
            return x, y
    return None


def _pick(rng: np.random.Generator, names: Sequence[str]) -> str:
    return names[int(rng.integers(0, len(names)))]


def preprocess(pixels_rgb: np.ndarray) -> np.ndarray:
    """Model input ``float32 [1, 3, 320, 320]``: pad right/bottom to a square, resize, ``/ 255``."""
    height, width = pixels_rgb.shape[:2]
    side = max(height, width)
    square = np.zeros((side, side, 3), dtype=np.uint8)
    square[:height, :width] = pixels_rgb
    with Image.fromarray(square) as image:
        resized = np.asarray(image.resize((INPUT_SIZE_PX, INPUT_SIZE_PX), Image.Resampling.BILINEAR), dtype=np.float32)
    return (resized / 255.0).transpose(2, 0, 1)[None].astype(np.float32)


def decode(output: np.ndarray) -> list[Detections]:
    """YOLOv8 head ``[batch, 4 + classes, anchors]`` -> detections per image after NMS."""
    output = np.asarray(output, dtype=np.float32)
    results = []
    for rows in output.transpose(0, 2, 1):
        class_scores = rows[:, 4:]
        scores = class_scores.max(axis=1)
        keep = scores >= CANDIDATE_SCORE
        centre, size = rows[keep, 0:2], rows[keep, 2:4]
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float64)
        chosen = non_max_suppression(boxes, scores[keep].astype(np.float64))
        results.append(Detections(
            boxes=boxes[chosen],
            scores=scores[keep][chosen].astype(np.float64),
            classes=class_scores[keep].argmax(axis=1)[chosen],
        ))
    return results


def non_max_suppression(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices kept by greedy class-agnostic NMS (score >= 0.25, IoU > 0.45 suppresses)."""
    order = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] >= NMS_SCORE]
    kept: list[int] = []
    areas = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)
    while order:
        best, order = order[0], order[1:]
        kept.append(best)
        if not order:
            break
        rest = np.asarray(order)
        top_left = np.maximum(boxes[best, :2], boxes[rest, :2])
        bottom_right = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        overlap = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
        union = areas[best] + areas[rest] - overlap
        iou = np.divide(overlap, union, out=np.zeros_like(overlap), where=union > 0)
        order = [int(i) for i in rest[iou <= NMS_IOU]]
    return np.asarray(kept, dtype=np.int64)


def detection_metric(reference: Runner, candidate: Runner, inputs: Sequence[Feed]) -> dict[str, float]:
    """Detector fidelity: candidate detections matched to the reference's at IoU >= 0.5.

    ``box_f1`` (primary) requires the same class; ``box_f1_any_class`` ignores it;
    ``mean_matched_iou`` and ``score_mae`` describe the class-matched pairs.
    """
    with_class = MatchCounts()
    any_class = MatchCounts()
    score_error = 0.0
    reference_boxes = candidate_boxes = 0
    for feed in inputs:
        expected_all = decode(reference(feed)[0])
        found_all = decode(candidate(feed)[0])
        for expected, found in zip(expected_all, found_all, strict=True):
            counts, pairs = match_boxes(
                expected.boxes, found.boxes, min_iou=BOX_MIN_IOU,
                reference_labels=expected.classes, candidate_labels=found.classes,
            )
            with_class.add(counts)
            any_class.add(match_boxes(expected.boxes, found.boxes, min_iou=BOX_MIN_IOU)[0])
            score_error += sum(abs(expected.scores[r] - found.scores[c]) for r, c in pairs)
            reference_boxes += len(expected.boxes)
            candidate_boxes += len(found.boxes)
    return {
        "box_f1": with_class.f1,
        "box_precision": with_class.precision,
        "box_recall": with_class.recall,
        "box_f1_any_class": any_class.f1,
        "mean_matched_iou": with_class.mean_matched_iou,
        "score_mae": score_error / with_class.true_positives if with_class.true_positives else 0.0,
        "reference_boxes": float(reference_boxes),
        "candidate_boxes": float(candidate_boxes),
        "inputs": float(len(inputs)),
    }
