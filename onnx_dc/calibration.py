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
:func:`find_layers` lists the weights whose input activation can be captured:
``MatMul`` (B), ``Gemm`` (B) and ``Conv`` (W) in the main graph, each weight
used by exactly one such node. Each layer is seen as ``Y = X W`` with ``X``
``[rows, K]`` and ``W`` ``[K, N]``: for ``MatMul`` rows are all leading
positions of A, for ``Gemm`` the rows of A (``A^T`` when ``transA``, times
``alpha``), for ``Conv`` the im2col patches (one row per output position and
image, one column per (input channel, kernel offset), honouring strides, pads,
``auto_pad``, dilations and groups; a grouped convolution is one block per
group, a depthwise convolution has ``K = kernel size``). Weights used elsewhere
(``ConvTranspose``, ``Gather`` embeddings, recurrent weights, subgraphs, shared
weights) have no statistics and are compressed without calibration.

:func:`capture_statistics` runs the model with onnxruntime, with the layers'
inputs added as graph outputs on a copy, and accumulates per layer and block,
in float64: ``X^T X``, the column sums of ``X`` and the row count (and, for
sequential mode, the cross terms with a reference model's activations). Nothing
else is kept, so the memory is ``sum K^2`` numbers whatever the number of
samples; layers are captured in several passes when their statistics would
exceed ``max_memory_bytes``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnx_dc.errors import CalibrationError, ModelError, SettingsError
from onnx_dc.model_io import attribute_subgraphs
from onnx_dc.refit import single_threaded_blas

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_MEMORY_BYTES",
    "DEFAULT_MAX_SAMPLES",
    "CalibrationData",
    "InputSpec",
    "LayerSpec",
    "LayerStatistics",
    "capture_statistics",
    "find_layers",
    "im2col",
    "input_specs",
    "load_calibration",
    "reused_statistics",
    "run_model",
]

DEFAULT_MAX_SAMPLES = 4096
"""Samples used when the caller sets no limit: Gram statistics of a few thousand
samples are stable for layers up to a few thousand inputs, and capture takes a
few seconds per million weights on a laptop."""

DEFAULT_BATCH_SIZE = 64
"""Samples per onnxruntime run when the inputs can be batched."""

DEFAULT_MAX_MEMORY_BYTES = 1 << 30
"""Statistics kept in memory at once; more layers than that are captured in several passes."""

LABELS_KEY = "labels"
"""Key of the labels array in evaluation files (``--eval E.npz``)."""

_IM2COL_CHUNK_ELEMENTS = 1 << 22  # patches materialised at once (32 MiB of float64)
_NARROW_INPUTS = 512  # Gram updates of narrower layers run on one BLAS thread (see LayerStatistics.update)


# ---------------------------------------------------------------------------
# Model inputs and calibration data


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

    def feeds(self, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """Yield ``(feed, n_samples_in_feed)`` over the first :attr:`n_samples` samples."""
        if batch_size < 1:
            raise SettingsError(f"batch_size must be >= 1, got {batch_size}")
        if self._arrays is None:
            yield from self._iter_feed_source()
            return
        step = batch_size if self.batchable else 1
        for start in range(0, self.n_samples, step):
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


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file. Raises :class:`CalibrationError` when it cannot be read."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"{p}: no such file")
    try:
        with np.load(p, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise CalibrationError(f"{p}: a single .npy array, expected an .npz keyed by input name")
            return {key: np.asarray(data[key]) for key in data.files}
    except CalibrationError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise CalibrationError(f"{p}: not a readable .npz file ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None


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


# ---------------------------------------------------------------------------
# Layers


@dataclass(frozen=True)
class LayerSpec:
    """A compressible weight whose input activation can be captured.

    The weight is viewed as ``groups`` blocks ``[K, N_g]`` (:meth:`to_blocks`).

    Attributes:
        weight: the weight's initializer name.
        op: ``MatMul``, ``Gemm`` or ``Conv``.
        node_name: the consuming node's name (or ``op#index``).
        activation: the name of the input activation (A or X).
        weight_shape: the stored weight's shape.
        groups: Conv groups (1 otherwise).
        trans_a, trans_b, alpha: Gemm attributes (defaults otherwise).
        conv: Conv attributes: kernel_shape, strides, pads (begin..., end...), dilations, auto_pad.
        bias: name of the bias initializer that adds to this layer's output per column
            (Gemm C, Conv B, or the constant of an ``Add`` right after a MatMul), or None.
        bias_scale: the factor the bias is multiplied by (Gemm ``beta``, else 1).
    """

    weight: str
    op: str
    node_name: str
    activation: str
    weight_shape: tuple[int, ...]
    groups: int = 1
    trans_a: bool = False
    trans_b: bool = False
    alpha: float = 1.0
    conv: Mapping[str, object] = field(default_factory=dict)
    bias: str | None = None
    bias_scale: float = 1.0

    @property
    def n_inputs(self) -> int:
        """``K``: inputs per block."""
        if self.op == "Conv":
            return int(np.prod(self.weight_shape[1:]))
        if self.op == "Gemm" and self.trans_b:
            return self.weight_shape[1]
        return self.weight_shape[0]

    @property
    def n_outputs(self) -> int:
        """Output columns over all blocks (output channels for Conv)."""
        if self.op == "Conv":
            return self.weight_shape[0]
        if self.op == "Gemm" and self.trans_b:
            return self.weight_shape[0]
        return self.weight_shape[1]

    @property
    def statistics_bytes(self) -> int:
        """Bytes of float64 Gram statistics (one ``K x K`` per group, plus cross terms in sequential mode)."""
        return 8 * self.groups * (self.n_inputs + 1) ** 2

    def to_blocks(self, weight: np.ndarray) -> list[np.ndarray]:
        """The stored weight as ``groups`` float64 blocks ``[K, N_g]`` (``Y_g = X_g W_g``)."""
        w = np.asarray(weight, dtype=np.float64)
        if self.op == "Conv":
            per_group = w.shape[0] // self.groups
            return [
                w[g * per_group : (g + 1) * per_group].reshape(per_group, -1).T.copy() for g in range(self.groups)
            ]
        if self.op == "Gemm" and self.trans_b:
            return [w.T.copy()]
        return [w.copy()]

    def from_blocks(self, blocks: Sequence[np.ndarray]) -> np.ndarray:
        """Inverse of :meth:`to_blocks` (float64, the stored weight's shape)."""
        if self.op == "Conv":
            per_group = self.weight_shape[0] // self.groups
            parts = [np.asarray(b).T.reshape((per_group, *self.weight_shape[1:])) for b in blocks]
            return np.concatenate(parts, axis=0)
        if self.op == "Gemm" and self.trans_b:
            return np.asarray(blocks[0]).T.copy()
        return np.asarray(blocks[0]).copy()

    def bias_to_blocks(self, bias: np.ndarray) -> list[np.ndarray]:
        """The effective per-column bias (``bias_scale * bias``) split per block."""
        b = self.bias_scale * np.asarray(bias, dtype=np.float64).reshape(-1)
        if b.size == 1 and self.n_outputs != 1:
            b = np.full(self.n_outputs, b[0])
        per_group = self.n_outputs // self.groups
        return [b[g * per_group : (g + 1) * per_group] for g in range(self.groups)]

    def rows(self, activation: np.ndarray) -> list[np.ndarray]:
        """The layer input as row matrices ``[rows, K]``, one per block (im2col for Conv)."""
        a = np.asarray(activation)
        if self.op == "Conv":
            return im2col(a, **self.conv, group=self.groups)  # type: ignore[arg-type]
        if self.op == "Gemm":
            a = a.reshape(a.shape[0], -1) if a.ndim != 2 else a
            if self.trans_a:
                a = a.T
            a = a.astype(np.float64)
            if self.alpha != 1.0:
                a = a * self.alpha
            return [a]
        k = self.n_inputs
        return [a.reshape(-1, k).astype(np.float64)]


def find_layers(model: onnx.ModelProto, names: Iterable[str] | None = None) -> list[LayerSpec]:
    """Every weight of the main graph whose input activation can be captured, in graph order.

    A weight qualifies when it is a float initializer used by exactly one node of
    the whole model, as ``MatMul`` B (2-D), ``Gemm`` B, or ``Conv`` W, with the
    activation input not itself a constant. ``names`` restricts the search.
    """
    graph = model.graph
    wanted = None if names is None else set(names)
    initializers = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in _all_nodes(graph):
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
        for attr in node.attribute:
            for sub in attribute_subgraphs(attr):
                for name in _outer_names(sub):
                    uses[name] = uses.get(name, 0) + 1
    for output in graph.output:
        uses[output.name] = uses.get(output.name, 0) + 1
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layers = []
    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        op = node.op_type
        if op not in ("MatMul", "Gemm", "Conv"):
            continue
        weight_name = node.input[1]
        tensor = initializers.get(weight_name)
        if tensor is None or tensor.data_type not in _FLOAT_TYPES or uses.get(weight_name, 0) != 1:
            continue
        if wanted is not None and weight_name not in wanted:
            continue
        if node.input[0] in initializers:
            continue
        shape = tuple(int(d) for d in tensor.dims)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        label = node.name or f"{op}#{index}"
        if op == "MatMul":
            if len(shape) != 2:
                continue
            bias, scale = _matmul_bias(node, consumers, initializers, uses, shape[1])
            layers.append(LayerSpec(weight_name, op, label, node.input[0], shape, bias=bias, bias_scale=scale))
        elif op == "Gemm":
            if len(shape) != 2:
                continue
            trans_b = bool(attrs.get("transB", 0))
            n_out = shape[0] if trans_b else shape[1]
            bias, beta = None, float(attrs.get("beta", 1.0))
            if len(node.input) > 2 and node.input[2]:
                c = initializers.get(node.input[2])
                if c is not None and uses.get(c.name, 0) == 1 and c.data_type in _FLOAT_TYPES and _is_row_bias(c, n_out):
                    bias = c.name
            layers.append(
                LayerSpec(
                    weight_name, op, label, node.input[0], shape,
                    trans_a=bool(attrs.get("transA", 0)), trans_b=trans_b, alpha=float(attrs.get("alpha", 1.0)),
                    bias=bias, bias_scale=beta,
                )
            )
        else:
            if len(shape) < 3:
                continue
            groups = int(attrs.get("group", 1))
            if groups < 1 or shape[0] % groups:
                continue
            n_spatial = len(shape) - 2
            kernel = tuple(int(k) for k in attrs.get("kernel_shape", shape[2:]))
            if kernel != shape[2:]:
                continue
            conv = {
                "kernel_shape": kernel,
                "strides": tuple(int(s) for s in attrs.get("strides", [1] * n_spatial)),
                "pads": tuple(int(p) for p in attrs.get("pads", [0] * (2 * n_spatial))),
                "dilations": tuple(int(d) for d in attrs.get("dilations", [1] * n_spatial)),
                "auto_pad": _text(attrs.get("auto_pad", "NOTSET")),
            }
            bias = None
            if len(node.input) > 2 and node.input[2]:
                b = initializers.get(node.input[2])
                if b is not None and uses.get(b.name, 0) == 1 and b.data_type in _FLOAT_TYPES and tuple(b.dims) == (shape[0],):
                    bias = b.name
            layers.append(LayerSpec(weight_name, op, label, node.input[0], shape, groups=groups, conv=conv, bias=bias))
    return layers


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _is_row_bias(tensor: onnx.TensorProto, n_out: int) -> bool:
    dims = tuple(int(d) for d in tensor.dims)
    return dims in ((n_out,), (1, n_out))


def _matmul_bias(node, consumers, initializers, uses, n_out) -> tuple[str | None, float]:
    """The constant of an ``Add`` that directly follows a MatMul (its only consumer), if per column."""
    out = node.output[0]
    after = consumers.get(out, [])
    if len(after) != 1 or uses.get(out, 0) != 1:
        return None, 1.0
    add = after[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
        return None, 1.0
    other = add.input[1] if add.input[0] == out else add.input[0]
    tensor = initializers.get(other)
    if tensor is None or uses.get(other, 0) != 1 or tensor.data_type not in _FLOAT_TYPES:
        return None, 1.0
    return (other, 1.0) if _is_row_bias(tensor, n_out) else (None, 1.0)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in attribute_subgraphs(attr):
                yield from _all_nodes(sub)


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes (used but not defined inside)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        defined.update(node.output)
        for attr in node.attribute:
            for sub in attribute_subgraphs(attr):
                used |= _outer_names(sub)
    used.update(o.name for o in graph.output)
    return used - defined


# ---------------------------------------------------------------------------
# im2col


def im2col(
    x: np.ndarray,
    *,
    kernel_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    auto_pad: str = "NOTSET",
    group: int = 1,
) -> list[np.ndarray]:
    """Patches of an N-d convolution input, one float64 row matrix per group.

    ``x`` is ``[N, C, *spatial]``. Row ``(n, output position)`` of group ``g``
    holds the inputs that output position reads, ordered ``(channel of the
    group, kernel offsets...)``, i.e. the layout of ``W[m].reshape(-1)`` for an
    ONNX weight ``W`` ``[M, C/group, *kernel]``; so ``rows @ W_g.reshape(M/group, -1).T``
    is the convolution output of group ``g`` (rows ordered by image, then output
    position in row-major order). Padding is zero; ``auto_pad`` follows the ONNX
    Conv definition.
    """
    x = np.asarray(x)
    geometry = _conv_geometry(x.shape, kernel_shape, strides, pads, dilations, auto_pad, group)
    n_spatial = x.ndim - 2
    padded = np.pad(x, [(0, 0), (0, 0)] + [(p0, p1) for p0, p1 in zip(geometry.pads[:n_spatial], geometry.pads[n_spatial:])])
    windows = np.lib.stride_tricks.sliding_window_view(padded, geometry.span, axis=tuple(range(2, 2 + n_spatial)))
    # windows: [N, C, *positions, *span]; keep every stride-th position and every dilation-th offset.
    index = (slice(None), slice(None))
    index += tuple(slice(None, (o - 1) * s + 1, s) for o, s in zip(geometry.out_shape, geometry.strides))
    index += tuple(slice(None, None, d) for d in geometry.dilations)
    patches = windows[index]  # [N, C, *out, *kernel]
    order = (0, *range(2, 2 + n_spatial), 1, *range(2 + n_spatial, 2 + 2 * n_spatial))
    patches = patches.transpose(order)  # [N, *out, C, *kernel]
    n_rows = x.shape[0] * int(np.prod(geometry.out_shape))
    per_group = x.shape[1] // group
    result = []
    for g in range(group):
        select = (slice(None),) * (1 + n_spatial) + (slice(g * per_group, (g + 1) * per_group),)
        result.append(np.ascontiguousarray(patches[select], dtype=np.float64).reshape(n_rows, -1))
    return result


@dataclass(frozen=True)
class _ConvGeometry:
    pads: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    span: tuple[int, ...]
    out_shape: tuple[int, ...]


def _conv_geometry(shape, kernel_shape, strides, pads, dilations, auto_pad, group) -> _ConvGeometry:
    if len(shape) < 3:
        raise CalibrationError(f"convolution input must be [N, C, spatial...], got shape {tuple(shape)}")
    n_spatial = len(shape) - 2
    kernel = tuple(int(k) for k in kernel_shape)
    strides = tuple(int(s) for s in (strides or [1] * n_spatial))
    dilations = tuple(int(d) for d in (dilations or [1] * n_spatial))
    pads = [int(p) for p in (pads or [0] * (2 * n_spatial))]
    if len(kernel) != n_spatial or len(strides) != n_spatial or len(dilations) != n_spatial or len(pads) != 2 * n_spatial:
        raise CalibrationError(f"convolution attributes do not match a {n_spatial}-d input of shape {tuple(shape)}")
    if shape[1] % group:
        raise CalibrationError(f"convolution input has {shape[1]} channels, not divisible by group={group}")
    spatial = shape[2:]
    span = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilations))
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        for i in range(n_spatial):
            out = -(-spatial[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + span[i] - spatial[i])
            small, large = total // 2, total - total // 2
            pads[i], pads[i + n_spatial] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    elif auto_pad == "VALID":
        pads = [0] * (2 * n_spatial)
    out_shape = tuple(
        (spatial[i] + pads[i] + pads[i + n_spatial] - span[i]) // strides[i] + 1 for i in range(n_spatial)
    )
    if any(o < 1 for o in out_shape):
        raise CalibrationError(f"convolution kernel {kernel} does not fit the input of shape {tuple(shape)}")
    return _ConvGeometry(tuple(pads), strides, dilations, span, out_shape)


# ---------------------------------------------------------------------------
# Statistics


@dataclass
class LayerStatistics:
    """Accumulated statistics of one layer's input (per block), float64.

    With ``a = [x, 1]`` the input row extended by a constant 1:

    Attributes:
        gram: per block, ``sum a a^T`` ``[K+1, K+1]`` (its last row/column are the
            column sums and the row count).
        cross: sequential mode only: per block, ``sum a a_ref^T`` with ``a_ref`` the
            reference (original) model's input for the same sample.
        gram_ref: sequential mode only: per block, ``sum a_ref a_ref^T``.
        n_rows: rows accumulated (samples times positions).
        n_samples: calibration samples seen.
    """

    layer: LayerSpec
    gram: list[np.ndarray]
    cross: list[np.ndarray] | None = None
    gram_ref: list[np.ndarray] | None = None
    n_rows: int = 0
    n_samples: int = 0

    @classmethod
    def empty(cls, layer: LayerSpec, *, with_reference: bool = False) -> LayerStatistics:
        """Zero statistics for ``layer``."""
        k = layer.n_inputs + 1
        zeros = lambda: [np.zeros((k, k)) for _ in range(layer.groups)]  # noqa: E731
        return cls(layer, zeros(), zeros() if with_reference else None, zeros() if with_reference else None)

    def update(self, activation: np.ndarray, reference: np.ndarray | None = None) -> None:
        """Add one batch of the layer's input (and, in sequential mode, the reference model's).

        Patches are formed a few samples at a time, so the memory stays bounded
        whatever the batch size.
        """
        if reference is not None and self.cross is None:
            raise CalibrationError("statistics created without reference terms")
        # Narrow blocks (depthwise convolutions: many tiny products) run faster on one BLAS thread.
        narrow = self.layer.n_inputs + 1 < _NARROW_INPUTS
        with single_threaded_blas() if narrow else contextlib.nullcontext():
            for blocks, ref_blocks in _row_chunks(self.layer, activation, reference):
                for g, rows in enumerate(blocks):
                    a = _extend(rows)
                    self.gram[g] += a.T @ a
                    if ref_blocks is not None:
                        r = _extend(ref_blocks[g])
                        self.cross[g] += a.T @ r  # type: ignore[index]
                        self.gram_ref[g] += r.T @ r  # type: ignore[index]
                self.n_rows += blocks[0].shape[0]

    def input_gram(self, block: int = 0, *, centered: bool = False) -> np.ndarray:
        """``X^T X`` of one block; ``centered``: of ``X`` minus its column means (the bias absorbs the mean)."""
        g = self.gram[block]
        k = g.shape[0] - 1
        if not centered:
            return g[:k, :k].copy()
        n = g[k, k]
        if n <= 0:
            return g[:k, :k].copy()
        s = g[k, :k]
        return g[:k, :k] - np.outer(s, s) / n

    def input_mean(self, block: int = 0) -> np.ndarray:
        """Column means of ``X`` (zeros when no rows were seen)."""
        g = self.gram[block]
        k = g.shape[0] - 1
        n = g[k, k]
        return g[k, :k] / n if n > 0 else np.zeros(k)


def _row_chunks(layer: LayerSpec, activation: np.ndarray, reference: np.ndarray | None):
    """Yield ``(blocks, reference blocks or None)`` over chunks of at most about ``_IM2COL_CHUNK_ELEMENTS`` values."""
    activation = np.asarray(activation)
    if reference is not None:
        reference = np.asarray(reference)
        if reference.shape != activation.shape:
            raise CalibrationError(
                f"layer {layer.weight!r}: reference activation of shape {reference.shape}, expected {activation.shape}"
            )
    if layer.op == "Conv":
        geometry = _conv_geometry(activation.shape, **layer.conv, group=layer.groups)  # type: ignore[arg-type]
        per_sample = int(np.prod(geometry.out_shape)) * layer.n_inputs * layer.groups
        step = max(1, _IM2COL_CHUNK_ELEMENTS // max(1, per_sample))
        for start in range(0, activation.shape[0], step):
            part = layer.rows(activation[start : start + step])
            ref = layer.rows(reference[start : start + step]) if reference is not None else None
            yield part, ref
        return
    blocks = layer.rows(activation)
    ref_blocks = layer.rows(reference) if reference is not None else None
    step = max(1, _IM2COL_CHUNK_ELEMENTS // max(1, layer.n_inputs))
    for start in range(0, blocks[0].shape[0], step):
        yield [b[start : start + step] for b in blocks], (
            None if ref_blocks is None else [b[start : start + step] for b in ref_blocks]
        )


def _extend(rows: np.ndarray) -> np.ndarray:
    out = np.empty((rows.shape[0], rows.shape[1] + 1))
    out[:, :-1] = rows
    out[:, -1] = 1.0
    return out


def capture_statistics(
    model: onnx.ModelProto,
    data: CalibrationData,
    layers: Sequence[LayerSpec],
    *,
    reference: onnx.ModelProto | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    progress: bool | Callable[[int, int], None] = False,
    description: str = "calibrating",
) -> dict[str, LayerStatistics]:
    """Run ``model`` on the calibration data and accumulate the statistics of each layer's input.

    Args:
        model: the model to run (not modified). Its graph must contain every
            layer's activation.
        data: the calibration samples.
        layers: from :func:`find_layers` (on ``model`` or on the model ``model`` was derived from).
        reference: sequential mode: the original model, run on the same samples;
            the cross terms with its activations are accumulated too.
        batch_size: samples per run when batchable.
        max_memory_bytes: statistics kept at once; beyond, layers are captured in several passes.
        progress: ``True`` for a tqdm bar on a terminal, or a callable ``(done, total)``.

    Returns:
        Layer statistics keyed by weight name (a new dict; inside :func:`reused_statistics`
        the same statistics objects as an earlier identical capture).
    """
    cache_key = None
    if _REUSE_STACK and reference is None:
        cache_key = (id(model), id(data), frozenset(layer.weight for layer in layers), batch_size)
        cached = _REUSE_STACK[-1].get(cache_key)
        if cached is not None:
            return dict(cached[2])
    factor = 3 if reference is not None else 1
    passes: list[list[LayerSpec]] = [[]]
    used = 0
    for layer in layers:
        size = factor * layer.statistics_bytes
        if passes[-1] and used + size > max_memory_bytes:
            passes.append([])
            used = 0
        passes[-1].append(layer)
        used += size
    stats: dict[str, LayerStatistics] = {}
    total = _known_total(data) * len(passes)
    bar = _Progress(progress, total, description)
    try:
        for group in passes:
            if not group:
                continue
            names = list(dict.fromkeys(layer.activation for layer in group))
            current = {layer.weight: LayerStatistics.empty(layer, with_reference=reference is not None) for layer in group}
            runner = _Runner(model, names)
            ref_runner = _Runner(reference, names) if reference is not None else None
            for feed, count in data.feeds(batch_size):
                values = runner.run(feed)
                ref_values = ref_runner.run(feed) if ref_runner is not None else None
                for layer in group:
                    current[layer.weight].update(
                        values[layer.activation], None if ref_values is None else ref_values[layer.activation]
                    )
                    current[layer.weight].n_samples += count
                bar.advance(count)
            stats.update(current)
    finally:
        bar.close()
    if cache_key is not None:
        _REUSE_STACK[-1][cache_key] = (model, data, dict(stats))  # model and data kept alive: their ids stay theirs
    return stats


_REUSE_STACK: list[dict] = []


@contextlib.contextmanager
def reused_statistics() -> Iterator[None]:
    """Inside the block, :func:`capture_statistics` of the same model and data objects, layers and
    batch size (without a reference model) runs once; later calls get the same statistics.

    For callers that capture twice from unchanged objects (the automatic search captures the
    original model's statistics for its candidates, and the final non-sequential compression
    of the chosen configuration captures them again). Neither the model nor the data may be
    modified inside the block; the statistics are freed when it ends.
    """
    _REUSE_STACK.append({})
    try:
        yield
    finally:
        _REUSE_STACK.pop()


def run_model(
    model: onnx.ModelProto,
    data: CalibrationData,
    *,
    outputs: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    library: str | None = None,
) -> dict[str, np.ndarray]:
    """Run ``model`` on all samples of ``data``; each output concatenated along axis 0 over the runs.

    ``outputs`` default to the model's graph outputs. ``library``: a custom operator library to register.
    """
    names = list(outputs) if outputs is not None else [o.name for o in model.graph.output]
    runner = _Runner(model, names, library=library)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed, _ in data.feeds(batch_size):
        values = runner.run(feed)
        for n in names:
            v = np.asarray(values[n])
            parts[n].append(v if v.ndim else v.reshape(1))
    return {n: np.concatenate(p, axis=0) if p else np.empty(0) for n, p in parts.items()}


class _Runner:
    """An onnxruntime session returning the given value names (added as graph outputs on a pruned copy)."""

    def __init__(self, model: onnx.ModelProto, names: Sequence[str], *, library: str | None = None) -> None:
        import onnxruntime as ort

        self.names = list(names)
        prepared = _with_outputs(model, self.names)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if library is not None:
            options.register_custom_ops_library(library)
        self._tmp: tempfile.TemporaryDirectory | None = None
        try:
            if prepared.ByteSize() > _SERIALIZE_LIMIT_BYTES:
                self._tmp = tempfile.TemporaryDirectory(prefix="onnx-dc-calib-")
                path = Path(self._tmp.name) / "model.onnx"
                onnx.save_model(prepared, str(path), save_as_external_data=True, location="model.data")
                self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            else:
                self.session = ort.InferenceSession(prepared.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types
            raise ModelError(f"onnxruntime cannot run the model for calibration: {_first_line(exc)}") from None
        self.input_names = {i.name for i in self.session.get_inputs()}

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self.names, {k: v for k, v in feed.items() if k in self.input_names})
        except Exception as exc:
            raise CalibrationError(f"onnxruntime failed on the calibration data: {_first_line(exc)}") from None
        return dict(zip(self.names, values))

    def __del__(self) -> None:
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()


_SERIALIZE_LIMIT_BYTES = 1_900_000_000


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are ``names``, without the nodes they do not need."""
    graph = model.graph
    producers: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for out in node.output:
            if out:
                producers[out] = node
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | set(producers)
    missing = [n for n in names if n not in known]
    if missing:
        raise ModelError(f"the model has no value named {', '.join(map(repr, missing))}")
    needed_nodes: list[int] = []
    seen: set[int] = set()
    index_of = {id(node): i for i, node in enumerate(graph.node)}
    stack = [n for n in names]
    needed_values: set[str] = set()
    while stack:
        name = stack.pop()
        if name in needed_values:
            continue
        needed_values.add(name)
        node = producers.get(name)
        if node is None:
            continue
        i = index_of[id(node)]
        if i in seen:
            continue
        seen.add(i)
        needed_nodes.append(i)
        stack.extend(n for n in node.input if n)
        for attr in node.attribute:
            for sub in attribute_subgraphs(attr):
                stack.extend(_outer_names(sub))
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    g = copy.graph
    keep = sorted(seen)
    nodes = [g.node[i] for i in keep]
    del g.node[:]
    g.node.extend(nodes)
    inits = [t for t in g.initializer if t.name in needed_values]
    del g.initializer[:]
    g.initializer.extend(inits)
    types = _value_types(model)
    del g.output[:]
    for name in names:
        vi = types.get(name)
        if vi is None:
            vi = helper.make_empty_tensor_value_info(name)
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        g.output.append(vi)
    return copy


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Value infos of the main graph (inferred where possible, without shapes: only the element type matters)."""
    infos: dict[str, onnx.ValueInfoProto] = {}
    try:
        if model.ByteSize() < _SERIALIZE_LIMIT_BYTES:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        else:
            inferred = model
    except Exception:
        inferred = model
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            slim = onnx.ValueInfoProto()
            slim.name = vi.name
            slim.type.tensor_type.elem_type = vi.type.tensor_type.elem_type
            infos[vi.name] = slim
    return infos


def _known_total(data: CalibrationData) -> int:
    return data.n_samples if data.n_samples >= 0 else (data.max_samples or 0)


class _Progress:
    def __init__(self, progress: bool | Callable[[int, int], None], total: int, description: str) -> None:
        self.callback = progress if callable(progress) else None
        self.total = total
        self.done = 0
        self.bar = None
        if progress is True and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total or None, unit="sample", desc=description, leave=False)

    def advance(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
