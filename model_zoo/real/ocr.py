"""PP-OCR (rapidocr-onnxruntime 1.4.4) inputs, pre/post-processing and task metrics.

What rapidocr does and what this module does instead
----------------------------------------------------
rapidocr's own pipeline (its ``ch_ppocr_det``, ``ch_ppocr_cls`` and ``ch_ppocr_rec``
packages) needs OpenCV, pyclipper and Shapely. This module re-implements the few
pieces the metrics need with numpy, SciPy (already required by scikit-learn) and
Pillow, using the package's own settings (``config.yaml`` of 1.4.4):

* detection preprocessing: shorter side scaled up to 736 (``limit_type: min``), both
  sides rounded to multiples of 32, ``(x / 255 - 0.5) / 0.5``, BGR channel order
  (rapidocr reads images with OpenCV, so the models see BGR);
* DB postprocessing: probability > 0.3, 2x2 dilation, 8-connected components,
  box score = mean probability in the box ("fast" mode) >= 0.5, unclip by
  ``area * 1.6 / perimeter``, minimum side 3. Boxes are axis-aligned rectangles
  (rapidocr fits rotated rectangles with OpenCV; the rendered text here is horizontal,
  where the two agree);
* recognition: height 48, width ``48 * max(320 / 48, r)`` with ``r`` the widest
  aspect ratio of the batch, zero padding on the right, CTC greedy decoding with the
  dictionary stored in the model's ``metadata_props["character"]`` (blank first,
  space last, as rapidocr does). Generated inputs use ``r = 10`` (a batch holding a
  long line), so they share the shape ``[1, 3, 48, 480]``;
* direction classifier: ``[3, 48, 192]`` the same way; labels ``0`` and ``180``; a
  crop is rotated when the label is ``180`` with probability above 0.9.

Generated pages are 4:3, so every detection input is ``[1, 3, 736, 992]``; with the
fixed recognition width this lets feeds be stacked into one array (``.npz``).

Images are resized with Pillow's bilinear filter (OpenCV's differs slightly when
downscaling); the metrics compare a reference and a candidate model on identical
inputs, so this changes the inputs' look, not the comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from model_zoo.real import photos
from model_zoo.real.matching import MatchCounts, edit_distance, match_boxes
from model_zoo.real.text_images import (
    FontSet,
    TextStyle,
    degrade,
    draw_text,
    find_fonts,
    paper_background,
    sample_style,
    sample_text_line,
    text_extent,
)

Feed = dict[str, np.ndarray]
Runner = Callable[[Feed], Sequence[np.ndarray]]

DET_LIMIT_SIDE_PX = 736
DET_BINARY_THRESHOLD = 0.3
DET_BOX_THRESHOLD = 0.5
DET_UNCLIP_RATIO = 1.6
DET_MIN_SIDE_PX = 3
DET_MAX_CANDIDATES = 1000
REC_HEIGHT_PX = 48
REC_MIN_WIDTH_PX = 320
# Generated recognition inputs are padded as in a rapidocr batch whose widest line has
# this aspect ratio, so they all share one shape, [1, 3, 48, 480].
REC_BATCH_WH_RATIO = 10.0
# Generated pages are 4:3, so every detection input is [1, 3, 736, 992].
PAGE_HEIGHT_OVER_WIDTH = 0.75
CLS_SHAPE = (3, 48, 192)
CLS_LABELS = ("0", "180")
CLS_ROTATE_THRESHOLD = 0.9
BOX_MIN_IOU = 0.5


@dataclass(frozen=True)
class TextLineSample:
    """A rendered text-line crop (what the detector would hand to cls/rec) and its truth."""

    image: np.ndarray  # uint8 RGB [h, w, 3]
    text: str
    rotated_180: bool


@dataclass(frozen=True)
class TextPageSample:
    """A rendered page or scene with text lines and their ink boxes (image pixels)."""

    image: np.ndarray  # uint8 RGB [h, w, 3]
    boxes: np.ndarray  # float [n, 4] x0, y0, x1, y1
    texts: tuple[str, ...]


# ---------------------------------------------------------------- dictionary

def ctc_characters(character_metadata: str) -> list[str]:
    """The CTC class list from the rec model's ``character`` metadata: blank, dictionary, space."""
    return ["<blank>", *character_metadata.splitlines(), " "]


@lru_cache(maxsize=4)
def _allowed_characters(characters: tuple[str, ...]) -> frozenset[str]:
    return frozenset(ch for ch in characters[1:] if len(ch) == 1)


# ---------------------------------------------------------------- rendering

def render_text_line(
    rng: np.random.Generator,
    split: str,
    characters: Sequence[str],
    *,
    allow_rotation: bool,
    fonts: FontSet | None = None,
) -> TextLineSample:
    """Render one text line with a detector-like margin on paper or a photo-backed sign.

    With ``allow_rotation`` half the lines are turned upside down (direction-classifier
    inputs); otherwise lines are upright (what the recogniser sees after the classifier).
    """
    fonts = fonts or find_fonts()
    text, needs_cjk = sample_text_line(rng, _allowed_characters(tuple(characters)))
    style = sample_style(rng, fonts, needs_cjk, (18, 44))
    left, top, right, bottom = text_extent(text, style)
    ink_width, ink_height = right - left, bottom - top
    margin_x = int(rng.integers(2, max(3, ink_height // 2 + 1)))
    margin_y = int(rng.integers(2, max(3, ink_height // 3 + 1)))
    width, height = ink_width + 2 * margin_x, ink_height + 2 * margin_y
    background = _background(rng, split, width, height, style)
    with Image.fromarray(background) as canvas:
        draw_text(canvas, text, style, margin_x, margin_y)
        pixels = np.asarray(canvas, dtype=np.uint8)
    pixels = degrade(pixels, rng)
    rotated = allow_rotation and bool(rng.random() < 0.5)
    if rotated:
        pixels = np.ascontiguousarray(pixels[::-1, ::-1])
    return TextLineSample(image=pixels, text=text, rotated_180=rotated)


def render_text_page(rng: np.random.Generator, split: str, characters: Sequence[str], fonts: FontSet | None = None) -> TextPageSample:
    """Render a document page (paper) or a scene (photo with sign panels) holding several lines."""
    fonts = fonts or find_fonts()
    allowed = _allowed_characters(tuple(characters))
    width = int(rng.integers(480, 900))
    height = int(round(width * PAGE_HEIGHT_OVER_WIDTH))
    on_photo = bool(rng.random() < 0.5)
    page_style = sample_style(rng, fonts, False, (16, 40))
    if on_photo:
        photo = photos.load_photo(_pick(rng, photos.BACKGROUNDS[split]))
        background = photos.random_crop(photo, width, height, rng)
    else:
        background = paper_background(rng, width, height, page_style.paper_rgb)
    scale = width / 640.0
    boxes: list[tuple[int, int, int, int]] = []
    texts: list[str] = []
    with Image.fromarray(background) as canvas:
        y = int(rng.integers(8, 40))
        for _ in range(int(rng.integers(3, 9))):
            text, needs_cjk = sample_text_line(rng, allowed)
            line_style = sample_style(rng, fonts, needs_cjk, (int(16 * scale), int(40 * scale)))
            if not on_photo:
                line_style = TextStyle(line_style.font_path, line_style.size_px, _ink_for(page_style, rng), page_style.paper_rgb)
            left, top, right, bottom = text_extent(text, line_style)
            ink_width, ink_height = right - left, bottom - top
            pad = max(4, ink_height // 3)
            if ink_width + 2 * pad + 16 > width or y + ink_height + 2 * pad + 8 > height:
                break
            x = int(rng.integers(8, width - ink_width - 2 * pad - 7))
            if on_photo:
                panel = paper_background(rng, ink_width + 2 * pad, ink_height + 2 * pad, line_style.paper_rgb)
                canvas.paste(Image.fromarray(panel), (x, y))
            boxes.append(draw_text(canvas, text, line_style, x + pad, y + pad))
            texts.append(text)
            y += ink_height + 2 * pad + int(rng.integers(4, 30))
        pixels = np.asarray(canvas, dtype=np.uint8)
    return TextPageSample(image=degrade(pixels, rng), boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4), texts=tuple(texts))


def _ink_for(page_style: TextStyle, rng: np.random.Generator) -> tuple[int, int, int]:
    jitter = rng.integers(-20, 21, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(page_style.ink_rgb) + jitter, 0, 255))


def _background(rng: np.random.Generator, split: str, width: int, height: int, style: TextStyle) -> np.ndarray:
    paper = paper_background(rng, width, height, style.paper_rgb)
    if rng.random() < 0.25:
        photo = photos.load_photo(_pick(rng, photos.BACKGROUNDS[split]))
        crop = photos.random_crop(photo, width, height, rng).astype(np.float32)
        return np.clip(0.3 * crop + 0.7 * paper, 0, 255).astype(np.uint8)
    return paper


def _pick(rng: np.random.Generator, names: Sequence[str]) -> str:
    return names[int(rng.integers(0, len(names)))]


# ---------------------------------------------------------------- preprocessing

def _normalise_bgr(pixels_rgb: np.ndarray) -> np.ndarray:
    """``uint8 RGB [h, w, 3]`` -> ``float32 [3, h, w]`` in BGR order, ``(x / 255 - 0.5) / 0.5``."""
    bgr = pixels_rgb[..., ::-1].astype(np.float32)
    return ((bgr / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    with Image.fromarray(np.ascontiguousarray(pixels)) as image:
        return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)


def det_input_size(height: int, width: int) -> tuple[int, int]:
    """rapidocr's detection size: shorter side up to 736, each side rounded to a multiple of 32."""
    ratio = DET_LIMIT_SIDE_PX / min(height, width) if min(height, width) < DET_LIMIT_SIDE_PX else 1.0
    resized_height = max(32, int(round(int(height * ratio) / 32) * 32))
    resized_width = max(32, int(round(int(width * ratio) / 32) * 32))
    return resized_height, resized_width


def det_preprocess(pixels_rgb: np.ndarray) -> np.ndarray:
    """Detection model input ``float32 [1, 3, H, W]`` for one RGB image."""
    height, width = det_input_size(*pixels_rgb.shape[:2])
    return _normalise_bgr(_resize(pixels_rgb, width, height))[None]


def rec_preprocess(pixels_rgb: np.ndarray, batch_max_wh_ratio: float | None = None) -> np.ndarray:
    """Recognition model input ``float32 [1, 3, 48, W]`` for one text-line crop.

    ``W = 48 * max(320 / 48, r)`` where ``r`` is ``batch_max_wh_ratio`` (the widest
    line of the batch, as rapidocr pads a batch) or, when None, the line's own aspect
    ratio. A line wider than ``W`` is squeezed to ``W``, as in rapidocr.
    """
    height, width = pixels_rgb.shape[:2]
    ratio = width / height if batch_max_wh_ratio is None else batch_max_wh_ratio
    input_width = int(REC_HEIGHT_PX * max(REC_MIN_WIDTH_PX / REC_HEIGHT_PX, ratio))
    return _pad_right(pixels_rgb, REC_HEIGHT_PX, input_width)[None]


def cls_preprocess(pixels_rgb: np.ndarray) -> np.ndarray:
    """Direction classifier input ``float32 [1, 3, 48, 192]`` for one text-line crop."""
    _, input_height, input_width = CLS_SHAPE
    return _pad_right(pixels_rgb, input_height, input_width)[None]


def _pad_right(pixels_rgb: np.ndarray, input_height: int, input_width: int) -> np.ndarray:
    height, width = pixels_rgb.shape[:2]
    resized_width = min(input_width, int(math.ceil(input_height * width / height)))
    out = np.zeros((3, input_height, input_width), dtype=np.float32)
    out[:, :, :resized_width] = _normalise_bgr(_resize(pixels_rgb, resized_width, input_height))
    return out


# ---------------------------------------------------------------- postprocessing

def db_boxes(probability_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Text boxes from a DB probability map ``[H, W]`` (or ``[1, 1, H, W]``), in map pixels.

    Returns ``(boxes [n, 4] as x0, y0, x1, y1, scores [n])``.
    """
    probability = np.asarray(probability_map, dtype=np.float32).reshape(probability_map.shape[-2:])
    height, width = probability.shape
    mask = probability > DET_BINARY_THRESHOLD
    # OpenCV's 2x2 dilation anchors at the kernel's (1, 1): a pixel turns on when it,
    # its upper, left or upper-left neighbour is on.
    dilated = mask.copy()
    dilated[1:, :] |= mask[:-1, :]
    dilated[:, 1:] |= mask[:, :-1]
    dilated[1:, 1:] |= mask[:-1, :-1]
    labels, count = ndimage.label(dilated, structure=np.ones((3, 3), dtype=bool))
    boxes: list[tuple[float, float, float, float]] = []
    scores: list[float] = []
    for region in ndimage.find_objects(labels)[:DET_MAX_CANDIDATES]:
        if region is None:
            continue
        y_min, y_max = region[0].start, region[0].stop - 1
        x_min, x_max = region[1].start, region[1].stop - 1
        box_width, box_height = x_max - x_min, y_max - y_min
        if min(box_width, box_height) < DET_MIN_SIDE_PX:
            continue
        score = float(probability[y_min:y_max + 1, x_min:x_max + 1].mean())
        if score < DET_BOX_THRESHOLD:
            continue
        distance = box_width * box_height * DET_UNCLIP_RATIO / (2.0 * (box_width + box_height))
        if min(box_width, box_height) + 2 * distance < DET_MIN_SIDE_PX + 2:
            continue
        boxes.append((
            float(np.clip(round(x_min - distance), 0, width)),
            float(np.clip(round(y_min - distance), 0, height)),
            float(np.clip(round(x_max + distance), 0, width)),
            float(np.clip(round(y_max + distance), 0, height)),
        ))
        scores.append(score)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores, dtype=np.float64)


def ctc_greedy_decode(probabilities: np.ndarray, characters: Sequence[str]) -> list[tuple[str, float]]:
    """Best-path CTC decoding of ``[batch, time, classes]``: collapse repeats, drop blanks (class 0).

    Returns ``(text, mean probability of the kept steps)`` per batch item.
    """
    probabilities = np.asarray(probabilities)
    best = probabilities.argmax(axis=2)
    best_probability = probabilities.max(axis=2)
    results = []
    for indices, confidence in zip(best, best_probability):
        keep = np.ones(len(indices), dtype=bool)
        keep[1:] = indices[1:] != indices[:-1]
        keep &= indices != 0
        text = "".join(characters[i] for i in indices[keep])
        results.append((text, float(confidence[keep].mean()) if keep.any() else 0.0))
    return results


# ---------------------------------------------------------------- metrics

def det_metric(reference: Runner, candidate: Runner, inputs: Sequence[Feed]) -> dict[str, float]:
    """Detection fidelity: text boxes of the candidate matched to the reference's at IoU >= 0.5.

    ``box_f1`` (primary), precision, recall, mean IoU of matched boxes, and the pixel
    IoU of the two binarised probability maps (all pooled over the inputs).
    """
    counts = MatchCounts()
    intersection = union = 0
    reference_boxes = 0
    for feed in inputs:
        reference_map = np.asarray(reference(feed)[0])
        candidate_map = np.asarray(candidate(feed)[0])
        expected, _ = db_boxes(reference_map)
        found, _ = db_boxes(candidate_map)
        image_counts, _ = match_boxes(expected, found, min_iou=BOX_MIN_IOU)
        counts.add(image_counts)
        reference_boxes += len(expected)
        reference_mask = reference_map > DET_BINARY_THRESHOLD
        candidate_mask = candidate_map > DET_BINARY_THRESHOLD
        intersection += int(np.count_nonzero(reference_mask & candidate_mask))
        union += int(np.count_nonzero(reference_mask | candidate_mask))
    return {
        "box_f1": counts.f1,
        "box_precision": counts.precision,
        "box_recall": counts.recall,
        "mean_matched_iou": counts.mean_matched_iou,
        "text_pixel_iou": intersection / union if union else 1.0,
        "reference_boxes": float(reference_boxes),
        "inputs": float(len(inputs)),
    }


def rec_metric(reference: Runner, candidate: Runner, inputs: Sequence[Feed], characters: Sequence[str]) -> dict[str, float]:
    """Recognition fidelity: the candidate's decoded strings against the reference's.

    ``exact_match`` (primary): share of lines read identically once leading and
    trailing spaces are stripped (the recogniser flips a space at a line's ends on the
    slightest change, which no OCR user sees as a different reading; inner spaces
    count). ``exact_match_raw`` compares the strings as decoded. ``char_error_rate``:
    edit distance over reference length (stripped, pooled), also given as
    ``char_accuracy = 1 - CER`` (clipped at 0) for higher-is-better plots.
    """
    exact = exact_raw = 0
    errors = 0
    reference_chars = 0
    lines = 0
    for feed in inputs:
        expected_lines = ctc_greedy_decode(reference(feed)[0], characters)
        found_lines = ctc_greedy_decode(candidate(feed)[0], characters)
        for (expected_raw, _), (found_raw, _) in zip(expected_lines, found_lines, strict=True):
            expected, found = expected_raw.strip(" "), found_raw.strip(" ")
            exact_raw += expected_raw == found_raw
            exact += expected == found
            errors += edit_distance(expected, found)
            reference_chars += len(expected)
            lines += 1
    cer = errors / reference_chars if reference_chars else float(errors > 0)
    return {
        "exact_match": exact / lines if lines else 1.0,
        "exact_match_raw": exact_raw / lines if lines else 1.0,
        "char_error_rate": cer,
        "char_accuracy": max(0.0, 1.0 - cer),
        "inputs": float(lines),
    }


def cls_metric(reference: Runner, candidate: Runner, inputs: Sequence[Feed]) -> dict[str, float]:
    """Direction-classifier fidelity: agreement of the argmax label and of the rotate decision."""
    label_agree = decision_agree = 0
    probability_diff = 0.0
    for feed in inputs:
        expected = np.asarray(reference(feed)[0]).reshape(-1, 2)
        found = np.asarray(candidate(feed)[0]).reshape(-1, 2)
        label_agree += int(np.sum(expected.argmax(1) == found.argmax(1)))
        decision_agree += int(np.sum(_rotate_decision(expected) == _rotate_decision(found)))
        probability_diff += float(np.abs(expected[:, 1] - found[:, 1]).sum())
    count = sum(int(np.asarray(next(iter(feed.values()))).shape[0]) for feed in inputs)
    return {
        "label_agreement": label_agree / count if count else 1.0,
        "rotate_decision_agreement": decision_agree / count if count else 1.0,
        "mean_abs_prob_diff": probability_diff / count if count else 0.0,
        "inputs": float(count),
    }


def _rotate_decision(probabilities: np.ndarray) -> np.ndarray:
    return (probabilities.argmax(1) == 1) & (probabilities.max(1) > CLS_ROTATE_THRESHOLD)


# ---------------------------------------------------------------- ground truth (sanity of the inputs)

def det_truth_metric(runner: Runner, samples: Sequence[TextPageSample]) -> dict[str, float]:
    """How well ``runner`` finds the rendered lines (IoU >= 0.5 against the ink boxes)."""
    counts = MatchCounts()
    for sample in samples:
        feed_image = det_preprocess(sample.image)
        scale_x = feed_image.shape[3] / sample.image.shape[1]
        scale_y = feed_image.shape[2] / sample.image.shape[0]
        truth = sample.boxes * np.array([scale_x, scale_y, scale_x, scale_y])
        found, _ = db_boxes(np.asarray(runner({"x": feed_image})[0]))
        image_counts, _ = match_boxes(truth, found, min_iou=BOX_MIN_IOU)
        counts.add(image_counts)
    return {"box_f1": counts.f1, "box_precision": counts.precision, "box_recall": counts.recall}


def rec_truth_metric(runner: Runner, samples: Sequence[TextLineSample], characters: Sequence[str]) -> dict[str, float]:
    """How well ``runner`` reads the rendered lines (turned upright first, as the classifier would).

    Spaces are ignored here: the recogniser often adds or drops a space at a line's ends
    or between Chinese and Latin text, which says nothing about the inputs' realism.
    """
    exact = errors = total = 0
    for sample in samples:
        upright = np.ascontiguousarray(sample.image[::-1, ::-1]) if sample.rotated_180 else sample.image
        feed = {"x": rec_preprocess(upright, REC_BATCH_WH_RATIO)}
        found = _without_spaces(ctc_greedy_decode(runner(feed)[0], characters)[0][0])
        truth = _without_spaces(sample.text)
        exact += found == truth
        errors += edit_distance(truth, found)
        total += len(truth)
    return {"exact_match": exact / len(samples), "char_error_rate": errors / total}


def _without_spaces(text: str) -> str:
    return "".join(text.split())


def cls_truth_metric(runner: Runner, samples: Sequence[TextLineSample]) -> dict[str, float]:
    """How often ``runner`` gets the rendered lines' orientation (0 or 180) right."""
    correct = 0
    for sample in samples:
        probabilities = np.asarray(runner({"x": cls_preprocess(sample.image)})[0]).reshape(-1, 2)
        correct += int(probabilities[0].argmax() == int(sample.rotated_180))
    return {"accuracy": correct / len(samples)}
