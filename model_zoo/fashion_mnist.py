"""Fashion-MNIST loader and the explicit data splits used by the zoo.

The data are the four gzip-compressed IDX files of Zalando's Fashion-MNIST, as
shipped by Debian's ``dataset-fashion-mnist`` package in
``/usr/share/datasets/fashion-mnist/``. They are looked for, in this order, in:

1. the ``data_dir`` argument, when given (and only there);
2. ``$ONNX_DC_DATA_DIR/fashion-mnist`` and ``$ONNX_DC_DATA_DIR``, when the
   environment variable is set;
3. ``~/.cache/onnx-dc/fashion-mnist``;
4. ``/usr/share/datasets/fashion-mnist``.

Each file may be gzip-compressed (``*.gz``, as distributed) or plain.

What the zoo models expect: images as float32 ``[N, 1, 28, 28]`` with pixel
values scaled to ``[0, 1]`` (``uint8 / 255``, no mean/std normalisation),
labels as int64 ``[N]`` in ``0..9``.

Splits (the rule issue 5 relies on): calibration data come from the TRAINING
file only, evaluation data from the TEST file only. :func:`calibration_set`
and :func:`validation_set` draw disjoint rows of the training file from one
seeded permutation; :func:`evaluation_set` reads the test file.
"""

from __future__ import annotations

import functools
import gzip
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnx_dc.errors import OnnxDcError, SettingsError

__all__ = [
    "CLASS_NAMES",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "IMAGE_SHAPE",
    "LabelledImages",
    "N_CLASSES",
    "SPLIT_SIZES",
    "SYSTEM_DATA_DIR",
    "calibration_set",
    "candidate_data_dirs",
    "evaluation_set",
    "find_data_dir",
    "load_fashion_mnist",
    "read_idx",
    "validation_set",
]

SYSTEM_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_DIR_ENV = "ONNX_DC_DATA_DIR"
IMAGE_SHAPE = (1, 28, 28)
N_CLASSES = 10
SPLIT_SIZES = {"train": 60000, "test": 10000}
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILE_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX magic: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions.
_IDX_UBYTE = 0x08
_GET_DATA_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` (files land in /usr/share/datasets/fashion-mnist/) "
    "or put the four IDX .gz files in ~/.cache/onnx-dc/fashion-mnist or $ONNX_DC_DATA_DIR"
)


class DatasetNotFoundError(OnnxDcError, FileNotFoundError):
    """The Fashion-MNIST files are not in any of the searched directories."""


class DatasetFormatError(OnnxDcError, ValueError):
    """A Fashion-MNIST file exists but is not a valid IDX file of the expected shape."""


@dataclass(frozen=True, eq=False)
class LabelledImages:
    """A labelled subset of one Fashion-MNIST split.

    Attributes:
        images: float32 ``[N, 1, 28, 28]`` in ``[0, 1]``.
        labels: int64 ``[N]`` class ids (see :data:`CLASS_NAMES`).
        split: ``"train"`` or ``"test"``: the file the rows come from.
        indices: int64 ``[N]`` row numbers of the images in that file.
    """

    images: np.ndarray
    labels: np.ndarray
    split: str
    indices: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def save_npz(self, path: str | os.PathLike, *, input_name: str = "input", labels: bool = True) -> None:
        """Write the images (keyed by ``input_name``) and optionally ``labels`` to an .npz, atomically.

        This is the file layout of onnx-dc's ``--calib`` (inputs only) and ``--eval`` (inputs and
        ``labels``) options.
        """
        arrays = {input_name: self.images}
        if labels:
            if input_name == "labels":
                raise SettingsError("input_name 'labels' clashes with the labels array")
            arrays["labels"] = self.labels
        path = Path(path)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)
            os.chmod(tmp_name, 0o666 & ~_current_umask())  # mkstemp creates 0600
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def candidate_data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for the dataset, in order (see the module docstring)."""
    if data_dir is not None:
        return [Path(data_dir)]
    dirs: list[Path] = []
    env_dir = os.environ.get(DATA_DIR_ENV)
    if env_dir:
        dirs += [Path(env_dir) / "fashion-mnist", Path(env_dir)]
    dirs += [Path.home() / ".cache" / "onnx-dc" / "fashion-mnist", SYSTEM_DATA_DIR]
    return dirs


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the first searched directory that holds all four Fashion-MNIST files.

    Raises:
        DatasetNotFoundError: none does; the message says how to get the data.
    """
    searched = candidate_data_dirs(data_dir)
    for directory in searched:
        stems = [stem for pair in _FILE_STEMS.values() for stem in pair]
        if all(_find_file(directory, stem) is not None for stem in stems):
            return directory
    where = ", ".join(str(d) for d in searched)
    raise DatasetNotFoundError(f"Fashion-MNIST not found (looked in {where}): {_GET_DATA_HINT}")


def read_idx(path: str | os.PathLike, *, expected_ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzip-compressed or plain) into a uint8 array.

    Validates the magic number, the number of dimensions and that the payload
    length equals the product of the dimensions.

    Raises:
        DatasetFormatError: the file is not such an IDX file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetFormatError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetFormatError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != _IDX_UBYTE:
        raise DatasetFormatError(f"{path}: IDX element type 0x{raw[2]:02x}, expected unsigned byte (0x08)")
    ndim = raw[3]
    if ndim != expected_ndim:
        raise DatasetFormatError(f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim}")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DatasetFormatError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    n_values = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header_size != n_values:
        raise DatasetFormatError(
            f"{path}: IDX payload is {len(raw) - header_size} bytes, dimensions {dims} need {n_values}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


@functools.lru_cache(maxsize=4)
def _load_split_cached(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    image_stem, label_stem = _FILE_STEMS[split]
    image_path = _find_file(directory, image_stem)
    label_path = _find_file(directory, label_stem)
    if image_path is None or label_path is None:
        raise DatasetNotFoundError(f"Fashion-MNIST {split} files not found in {directory}: {_GET_DATA_HINT}")
    pixels = read_idx(image_path, expected_ndim=3)
    labels = read_idx(label_path, expected_ndim=1)
    n_expected = SPLIT_SIZES[split]
    if pixels.shape != (n_expected, *IMAGE_SHAPE[1:]):
        raise DatasetFormatError(f"{image_path}: images of shape {pixels.shape}, expected ({n_expected}, 28, 28)")
    if labels.shape != (n_expected,):
        raise DatasetFormatError(f"{label_path}: {labels.shape[0]} labels, expected {n_expected}")
    if int(labels.max()) >= N_CLASSES:
        raise DatasetFormatError(f"{label_path}: label {int(labels.max())} out of range 0..{N_CLASSES - 1}")
    images = (pixels.astype(np.float32) / np.float32(255.0)).reshape(n_expected, *IMAGE_SHAPE)
    labels64 = labels.astype(np.int64)
    # Shared between callers through the cache: make accidental in-place edits fail loudly.
    images.flags.writeable = False
    labels64.flags.writeable = False
    return images, labels64


def load_fashion_mnist(split: str, *, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load one whole split of Fashion-MNIST.

    Args:
        split: ``"train"`` (60 000 images) or ``"test"`` (10 000 images).
        data_dir: directory holding the IDX files; default: search (module docstring).

    Returns:
        ``(images, labels)``: float32 ``[N, 1, 28, 28]`` in ``[0, 1]`` and int64 ``[N]``.
        Both arrays are read-only (they are cached); copy before modifying.

    Raises:
        DatasetNotFoundError: the files are not found (message says how to get them).
        DatasetFormatError: a file is corrupt or of the wrong shape.
    """
    if split not in _FILE_STEMS:
        raise SettingsError(f"unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'")
    directory = find_data_dir(data_dir).resolve()
    return _load_split_cached(directory, split)


def _check_count(n_samples: int, available: int, what: str) -> None:
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)):
        raise TypeError(f"{what}: n_samples must be an int, got {type(n_samples).__name__}")
    if not 1 <= n_samples <= available:
        raise SettingsError(f"{what}: n_samples={n_samples} out of range 1..{available}")


def _train_permutation(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(SPLIT_SIZES["train"])


def _subset(split: str, indices: np.ndarray, data_dir: str | os.PathLike | None) -> LabelledImages:
    images, labels = load_fashion_mnist(split, data_dir=data_dir)
    indices = np.asarray(indices, dtype=np.int64)
    return LabelledImages(images=images[indices], labels=labels[indices], split=split, indices=indices)


def calibration_set(
    n_samples: int = 1024, *, seed: int = 0, data_dir: str | os.PathLike | None = None
) -> LabelledImages:
    """Random rows of the TRAINING split for calibration (never test images).

    Takes the first ``n_samples`` rows of a permutation of the 60 000 training
    rows seeded by ``seed``; :func:`validation_set` with the same seed takes
    rows from the other end, so the two are disjoint whenever their sizes add
    up to at most 60 000.
    """
    _check_count(n_samples, SPLIT_SIZES["train"], "calibration_set")
    return _subset("train", _train_permutation(seed)[:n_samples], data_dir)


def validation_set(
    n_samples: int = 5000, *, seed: int = 0, data_dir: str | os.PathLike | None = None
) -> LabelledImages:
    """Random rows of the TRAINING split held apart from :func:`calibration_set` (same seed).

    For a task-level budget during an automatic settings search, so that the
    search never looks at the test images that the final accuracy is reported on.
    Takes the last ``n_samples`` rows of the permutation that calibration takes the first rows of.
    """
    _check_count(n_samples, SPLIT_SIZES["train"], "validation_set")
    return _subset("train", _train_permutation(seed)[-n_samples:], data_dir)


def evaluation_set(
    n_samples: int | None = None, *, seed: int | None = None, data_dir: str | os.PathLike | None = None
) -> LabelledImages:
    """Rows of the TEST split for evaluation (never training images).

    Args:
        n_samples: how many images; ``None`` for all 10 000.
        seed: ``None`` takes the first ``n_samples`` rows in file order; an int
            takes a random subset seeded by it (sorted by row number).
    """
    n_test = SPLIT_SIZES["test"]
    if n_samples is None:
        n_samples = n_test
    _check_count(n_samples, n_test, "evaluation_set")
    if seed is None:
        indices = np.arange(n_samples, dtype=np.int64)
    else:
        indices = np.sort(np.random.default_rng(seed).choice(n_test, size=n_samples, replace=False))
    return _subset("test", indices, data_dir)
