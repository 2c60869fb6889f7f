"""Calibration data and the layer statistics captured from it.

Calibration data are sample inputs of the model (no labels). They come from an
``.npz`` file (``--calib FILE.npz``), a mapping of arrays keyed by model input
name, or, from Python, an iterable of input dicts (one complete feed each, as
onnxruntime's ``CalibrationDataReader`` yields them).

The axis-0 rule (arrays keyed by input name; docs/CALIBRATION.md)
-------------------------------------------------------------------
Axis 0 of every array indexes samples. For a model input of rank ``r``:

* an array of rank ``r``: axis 0 *is* the input's batch axis; samples may be
  fed several at a time. If the model fixes that axis to ``d`` (``d = 1`` for
  models exported with batch 1), each run feeds ``d`` consecutive rows and the
  number of rows must be a multiple of ``d``;
* an array of rank ``r + 1``: each slice ``array[i]`` is one complete feed for
  that input (recurrent state inputs, scalar inputs, inputs without a batch axis);
* any other rank is refused, and so are arrays whose other dimensions contradict
  the model's fixed dimensions, arrays whose sample counts differ, keys that are
  not model inputs, missing inputs, non-castable element types, and inputs whose
  rank the model does not declare (ambiguous).

All inputs must have the same number of samples. When every input is batched
along a dynamic axis, ``batch_size`` samples go into one run; otherwise each
run is one sample.

Layers and statistics
---------------------
Which weights get captured statistics, and how each layer's input rows are
formed (im2col for convolutions), is in :mod:`onnx_dc.calibration.layers`; the
weights without them are searched by the model's output error
(:mod:`onnx_dc.calibration.proxies`).

:func:`capture_statistics` runs the model with onnxruntime, with the layers'
inputs added as graph outputs on a copy, and accumulates per layer and block,
in float64: ``X^T X``, the column sums of ``X`` and the row count (and, for
sequential mode, the cross terms with a reference model's activations). Nothing
else is kept, so the memory is ``sum K^2`` numbers whatever the number of
samples; layers are captured in several passes when their statistics would
exceed ``max_memory_bytes``.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnx_dc.errors import CalibrationError, SettingsError, first_line

__all__ = [
    "CalibrationData",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_SAMPLES",
    "InputSpec",
    "LABELS_KEY",
    "input_specs",
    "load_calibration",
    "read_labels",
    "read_npz",
]


DEFAULT_MAX_SAMPLES = 4096
"""Samples used when the caller sets no limit: Gram statistics of a few thousand
samples are stable for layers up to a few thousand inputs, and capture takes a
few seconds per million weights on a laptop."""

DEFAULT_BATCH_SIZE = 64
"""Samples per onnxruntime run when the inputs can be batched."""

LABELS_KEY = "labels"
"""Key of the labels array in evaluation files (``--eval E.npz``)."""


# ---------------------------------------------------------------------------
# Model inputs and calibration data


CalibrationSource = "str | os.PathLike | Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]] | CalibrationData"
"""What calibration data may be given as: an ``.npz`` path, arrays keyed by input name, an iterable of feeds."""
EvaluationSource = "str | os.PathLike | Mapping[str, np.ndarray]"
"""What evaluation data may be given as: an ``.npz`` path or arrays keyed by input name (and ``labels``)."""


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype and shape (``None`` for a dynamic or unknown dimension)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None: the model declares no shape

    @property
    def rank(self) -> int | None:
        """Number of dimensions, ``None`` when undeclared."""
        return None if self.shape is None else len(self.shape)


def input_specs(model: onnx.ModelProto, *, hint: str = "calibration supports tensor inputs only") -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers), in order.

    ``hint`` ends the error messages (what the caller's user can do instead).

    Raises:
        CalibrationError: an input that is not a tensor or has an unknown element type.
    """
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        if not vi.type.HasField("tensor_type"):
            raise CalibrationError(f"input {vi.name!r} is not a tensor; {hint}")
        ttype = vi.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        except (KeyError, TypeError, ValueError):
            raise CalibrationError(f"input {vi.name!r} has an unsupported element type {ttype.elem_type}; {hint}") from None
        shape = None
        if ttype.HasField("shape"):
            shape = tuple(
                int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None for d in ttype.shape.dim
            )
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


class CalibrationData:
    """Validated calibration samples for one model (see the module docstring for the rules).

    Build it with :func:`load_calibration`. :meth:`feeds` yields complete
    onnxruntime feeds; :attr:`n_samples` counts samples (rows of batched arrays,
    or feeds).
    """

    def __init__(
        self,
        specs: Sequence[InputSpec],
        *,
        arrays: Mapping[str, np.ndarray] | None = None,
        per_feed: frozenset[str] = frozenset(),
        feed_source: Iterable[Mapping[str, np.ndarray]] | None = None,
        n_samples: int,
        rows_per_sample: Mapping[str, int] | None = None,
        max_samples: int | None = None,
        description: str = "",
    ) -> None:
        self.specs = list(specs)
        self._arrays = dict(arrays) if arrays is not None else None
        self._per_feed = per_feed
        self._feed_source = feed_source
        self._rows_per_sample = dict(rows_per_sample or {})
        self.n_samples = n_samples
        self.max_samples = max_samples
        self.description = description

    @property
    def batchable(self) -> bool:
        """True when several samples can go into one run (every input batched on a dynamic axis 0)."""
        if self._arrays is None:
            return False
        return not self._per_feed and all(
            spec.shape is not None and spec.shape and spec.shape[0] is None for spec in self.specs
        )

    def feeds(
        self, batch_size: int = DEFAULT_BATCH_SIZE, *, sizes: Callable[[], int] | None = None
    ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """Yield ``(feed, n_samples_in_feed)`` over the first :attr:`n_samples` samples.

        ``sizes``: called before each batchable feed for its number of samples (at most
        ``batch_size``), so a caller can shrink the batches as it learns what they cost.
        """
        if batch_size < 1:
            raise SettingsError(f"batch_size must be >= 1, got {batch_size}")
        if self._arrays is None:
            yield from self._iter_feed_source()
            return
        start = 0
        while start < self.n_samples:
            step = max(1, min(batch_size, sizes() if sizes is not None else batch_size)) if self.batchable else 1
            stop = min(self.n_samples, start + step)
            feed = {}
            for spec in self.specs:
                array = self._arrays[spec.name]
                if spec.name in self._per_feed:
                    feed[spec.name] = np.asarray(array[start])  # 0-d stays an array for onnxruntime
                else:
                    rows = self._rows_per_sample.get(spec.name, 1)
                    feed[spec.name] = array[start * rows : stop * rows]
            yield feed, stop - start
            start = stop

    def materialised(self) -> CalibrationData:
        """The same data with a known :attr:`n_samples` (feeds of an iterable are read once and kept)."""
        if self._arrays is not None or self.n_samples >= 0:
            return self
        feeds = [feed for feed, _ in self._iter_feed_source()]
        if not feeds:
            raise CalibrationError("the calibration iterable yielded no feeds")
        counts = [_samples_in_feed(self.specs, feed) for feed in feeds]
        return CalibrationData(
            self.specs, feed_source=feeds, n_samples=int(sum(counts)), description=self.description
        )

    def split(self, n_holdout: int, *, seed: int = 0) -> tuple[CalibrationData, CalibrationData]:
        """Split the data into (fit, holdout) parts of ``n_samples - n_holdout`` and ``n_holdout`` samples.

        The holdout samples are chosen at random (``seed``) and never overlap the fit part.
        Data given as feeds is split by whole feeds: the holdout part gets random
        feeds until it holds at least ``n_holdout`` samples, the fit part keeps at least one.

        Raises:
            CalibrationError: too few samples (or feeds) to split.
        """
        if self._arrays is None:
            return self._split_feeds(n_holdout, seed)
        if not 1 <= n_holdout < self.n_samples:
            raise CalibrationError(f"cannot hold {n_holdout} of {self.n_samples} calibration samples apart")
        order = np.random.default_rng(seed).permutation(self.n_samples)
        parts = []
        for index in (np.sort(order[n_holdout:]), np.sort(order[:n_holdout])):
            arrays = {}
            for spec in self.specs:
                array = self._arrays[spec.name]
                rows = 1 if spec.name in self._per_feed else self._rows_per_sample.get(spec.name, 1)
                take = (index[:, None] * rows + np.arange(rows)[None, :]).reshape(-1)
                arrays[spec.name] = array[take]
            parts.append(
                CalibrationData(
                    self.specs,
                    arrays=arrays,
                    per_feed=self._per_feed,
                    n_samples=int(index.size),
                    rows_per_sample=self._rows_per_sample,
                    description=self.description,
                )
            )
        return parts[0], parts[1]

    def _split_feeds(self, n_holdout: int, seed: int) -> tuple[CalibrationData, CalibrationData]:
        data = self.materialised()
        feeds = list(data._feed_source or [])
        counts = [_samples_in_feed(self.specs, feed) for feed in feeds]
        if len(feeds) < 2 or n_holdout < 1:
            raise CalibrationError(
                f"cannot hold {n_holdout} of {data.n_samples} calibration samples apart: "
                f"the data is {len(feeds)} feed(s); give more feeds or --eval data"
            )
        order = np.random.default_rng(seed).permutation(len(feeds))
        held, taken = [], 0
        for index in order[:-1]:  # the fit part keeps at least one feed
            held.append(int(index))
            taken += counts[index]
            if taken >= n_holdout:
                break
        held_set = set(held)
        parts = []
        for chosen in ([i for i in range(len(feeds)) if i not in held_set], sorted(held)):
            parts.append(
                CalibrationData(
                    self.specs,
                    feed_source=[feeds[i] for i in chosen],
                    n_samples=int(sum(counts[i] for i in chosen)),
                    description=self.description,
                )
            )
        return parts[0], parts[1]

    def _iter_feed_source(self) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        assert self._feed_source is not None
        produced = 0
        for index, feed in enumerate(self._feed_source):
            if self.max_samples is not None and produced >= self.max_samples:
                return
            checked = _check_feed(self.specs, feed, index)
            count = _samples_in_feed(self.specs, checked)
            produced += count
            yield checked, count


def load_calibration(
    source: str | os.PathLike | Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]] | CalibrationData,
    model: onnx.ModelProto,
    *,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    allow_labels: bool = False,
) -> CalibrationData:
    """Validate calibration data against the model's inputs.

    Args:
        source: an ``.npz`` path, a mapping of arrays keyed by input name, an
            iterable of feeds (dicts of arrays, each a complete feed), or an
            existing :class:`CalibrationData` (returned as is).
        model: the model the data are for.
        max_samples: use at most this many samples (the first ones); ``None``: all.
        allow_labels: accept (and ignore) a ``labels`` array in a file or mapping.

    Raises:
        CalibrationError: unreadable file, or data breaking the axis-0 rule
            (the message names the input).
    """
    if isinstance(source, CalibrationData):
        return source
    if max_samples is not None and (isinstance(max_samples, bool) or int(max_samples) < 1):
        raise SettingsError(f"max_samples must be >= 1, got {max_samples}")
    specs = input_specs(model)
    if isinstance(source, (str, os.PathLike)):
        arrays = read_npz(source)
        return _from_arrays(specs, arrays, max_samples, allow_labels, str(source))
    if isinstance(source, Mapping):
        return _from_arrays(specs, {k: np.asarray(v) for k, v in source.items()}, max_samples, allow_labels, "arrays")
    if isinstance(source, Iterable):
        feeds = source
        if iter(source) is source:  # a one-shot iterator: keep what is used, so it can be read again
            feeds = _materialise(source, specs, max_samples)
        return CalibrationData(
            specs, feed_source=feeds, n_samples=-1, max_samples=max_samples, description="iterable of feeds"
        )
    raise CalibrationError(
        f"calibration data must be an .npz path, a dict of arrays or an iterable of feeds, got {type(source).__name__}"
    )


_ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive of .npy files
_NPY_MAGIC = b"\x93NUMPY"


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file (``numpy.savez``). Raises :class:`CalibrationError` when it cannot be read."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"{p}: no such file")
    try:
        with open(p, "rb") as file:
            magic = file.read(len(_ZIP_MAGIC))
    except OSError as exc:
        raise CalibrationError(f"{p}: cannot be read ({first_line(exc)})") from None
    if magic == _NPY_MAGIC[: len(_ZIP_MAGIC)]:
        raise CalibrationError(f"{p}: a single .npy array, expected an .npz keyed by input name (numpy.savez)")
    if magic != _ZIP_MAGIC:
        raise CalibrationError(f"{p}: not an .npz file of arrays (write one with numpy.savez, keyed by input name)")
    try:
        with np.load(p, allow_pickle=False) as data:
            return {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:  # e.g. pickled object arrays
        raise CalibrationError(f"{p}: not an .npz file of arrays ({first_line(exc)})") from None


def read_labels(path: str | os.PathLike | Mapping[str, np.ndarray]) -> np.ndarray:
    """The integer ``labels`` array of an evaluation file (``--eval``). Raises :class:`CalibrationError`."""
    arrays = read_npz(path) if isinstance(path, (str, os.PathLike)) else dict(path)
    if LABELS_KEY not in arrays:
        raise CalibrationError(f"{path if isinstance(path, (str, os.PathLike)) else 'evaluation data'}: no {LABELS_KEY!r} array")
    labels = np.asarray(arrays[LABELS_KEY])
    if labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise CalibrationError(f"{LABELS_KEY!r} must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    return labels.astype(np.int64)


def _from_arrays(
    specs: Sequence[InputSpec],
    arrays: dict[str, np.ndarray],
    max_samples: int | None,
    allow_labels: bool,
    description: str,
) -> CalibrationData:
    names = {s.name for s in specs}
    if allow_labels and LABELS_KEY not in names:
        arrays = {k: v for k, v in arrays.items() if k != LABELS_KEY}
    unknown = sorted(set(arrays) - names)
    if unknown:
        hint = " (a 'labels' array belongs in --eval data)" if LABELS_KEY in unknown else ""
        raise CalibrationError(
            f"{description}: {', '.join(map(repr, unknown))} not an input of the model "
            f"(its inputs: {', '.join(s.name for s in specs)}){hint}"
        )
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise CalibrationError(f"{description}: no array for model input(s) {', '.join(map(repr, missing))}")
    per_feed: set[str] = set()
    rows_per_sample: dict[str, int] = {}
    counts: dict[str, int] = {}
    checked: dict[str, np.ndarray] = {}
    for spec in specs:
        array = _cast(spec, arrays[spec.name])
        if spec.shape is None:
            raise CalibrationError(
                f"input {spec.name!r}: the model does not declare its rank, so axis 0 of the array is ambiguous "
                "(add a shape to the model input)"
            )
        rank = len(spec.shape)
        if array.ndim == rank + 1:
            _check_dims(spec, array.shape[1:], 0, "each slice along axis 0")
            per_feed.add(spec.name)
            counts[spec.name] = array.shape[0]
        elif array.ndim == rank and rank > 0:
            _check_dims(spec, array.shape, 1, "the array")
            fixed = spec.shape[0]
            if fixed is not None:
                if array.shape[0] % fixed:
                    raise CalibrationError(
                        f"input {spec.name!r}: the model fixes axis 0 to {fixed}, so the array's {array.shape[0]} rows "
                        f"must be a multiple of {fixed} (or give one feed per slice: shape [N, {', '.join(map(str, _dims(spec)))}])"
                    )
                rows_per_sample[spec.name] = fixed
                counts[spec.name] = array.shape[0] // fixed
            else:
                counts[spec.name] = array.shape[0]
        else:
            expected = f"rank {rank} (axis 0 = batch axis) or rank {rank + 1} (one feed per slice)" if rank else "rank 1 (one value per sample)"
            raise CalibrationError(
                f"input {spec.name!r}: array of shape {array.shape} (rank {array.ndim}) does not fit the model input "
                f"{_describe_shape(spec)}: expected {expected}"
            )
        checked[spec.name] = array
    distinct = set(counts.values())
    if len(distinct) > 1:
        detail = ", ".join(f"{name}: {n}" for name, n in counts.items())
        raise CalibrationError(f"{description}: inputs have different numbers of samples along axis 0 ({detail})")
    n_samples = distinct.pop() if distinct else 0
    if n_samples == 0:
        raise CalibrationError(f"{description}: no samples (axis 0 has length 0)")
    if max_samples is not None:
        n_samples = min(n_samples, int(max_samples))
    return CalibrationData(
        specs,
        arrays=checked,
        per_feed=frozenset(per_feed),
        n_samples=n_samples,
        rows_per_sample=rows_per_sample,
        max_samples=max_samples,
        description=description,
    )


def _dims(spec: InputSpec) -> list[str]:
    return ["?" if d is None else str(d) for d in (spec.shape or ())]


def _describe_shape(spec: InputSpec) -> str:
    return "[" + ", ".join(_dims(spec)) + "]"


def _check_dims(spec: InputSpec, shape: tuple[int, ...], first_axis: int, what: str) -> None:
    assert spec.shape is not None
    for axis in range(first_axis, len(spec.shape)):
        want = spec.shape[axis]
        if want is not None and shape[axis] != want:
            raise CalibrationError(
                f"input {spec.name!r}: {what} has shape {tuple(shape)}, but the model input is "
                f"{_describe_shape(spec)} (axis {axis} must be {want})"
            )


def _cast(spec: InputSpec, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == spec.dtype:
        return array
    if array.dtype.kind in "biuf" and spec.dtype.kind in "biuf" and np.can_cast(array.dtype, spec.dtype, "same_kind"):
        return array.astype(spec.dtype)
    raise CalibrationError(f"input {spec.name!r}: {array.dtype} data cannot be used for a {spec.dtype} input")


def _check_feed(specs: Sequence[InputSpec], feed: Mapping[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    if not isinstance(feed, Mapping):
        raise CalibrationError(f"feed {index}: expected a dict of arrays keyed by input name, got {type(feed).__name__}")
    names = {s.name for s in specs}
    unknown = sorted(set(feed) - names)
    if unknown:
        raise CalibrationError(f"feed {index}: {', '.join(map(repr, unknown))} not an input of the model")
    checked = {}
    for spec in specs:
        if spec.name not in feed:
            raise CalibrationError(f"feed {index}: no array for model input {spec.name!r}")
        array = _cast(spec, feed[spec.name])
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise CalibrationError(
                    f"feed {index}: input {spec.name!r} has shape {array.shape}, the model expects {_describe_shape(spec)} "
                    "(each feed of an iterable is one complete feed)"
                )
            _check_dims(spec, array.shape, 0, f"feed {index}")
        checked[spec.name] = array
    return checked


def _samples_in_feed(specs: Sequence[InputSpec], feed: Mapping[str, np.ndarray]) -> int:
    """Rows along a dynamic axis 0 when every input has one, else 1."""
    if specs and all(s.shape and s.shape[0] is None for s in specs):
        counts = {int(np.shape(feed[s.name])[0]) for s in specs}
        if len(counts) == 1:
            return max(1, counts.pop())
    return 1


def _materialise(
    iterator: Iterator[Mapping[str, np.ndarray]], specs: Sequence[InputSpec], max_samples: int | None
) -> list[dict[str, np.ndarray]]:
    feeds, produced = [], 0
    for index, feed in enumerate(iterator):
        if max_samples is not None and produced >= max_samples:
            break
        checked = _check_feed(specs, feed, index)
        feeds.append(checked)
        produced += _samples_in_feed(specs, checked)
    if not feeds:
        raise CalibrationError("the calibration iterable yielded no feeds")
    return feeds
