"""Checking that a compressed model still answers like the original.

:func:`validate_models` runs both models with onnxruntime on the same inputs
(an ``.npz`` keyed by input name, a dict, or inputs generated from the
original's input specs) and compares every output: max and mean absolute
difference, cosine similarity and, for outputs whose last axis holds scores,
top-1 agreement. The compressed model runs through the onnx-dc custom operator
library when it is available; otherwise through its decompressed form (the
same quantized weights in standard operators), and the report says which.

Thresholds (:class:`Thresholds`): by default every floating-point output must
keep a cosine similarity of at least :data:`DEFAULT_MIN_COSINE` with the
original's and, on given inputs, every classifier-shaped output (floats, at
least two values on the last axis, which holds the classes) a top-1 agreement
of at least :data:`DEFAULT_MIN_TOP1_AGREEMENT`. Generated inputs are random,
far from what a classifier was trained on, so top-1 agreement is only reported
on them unless a threshold is given explicitly. ``None`` turns a check off.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import onnx
from onnx import helper

from onnx_dc.calibration.data import input_specs, read_npz
from onnx_dc.errors import CalibrationError, LibraryNotFoundError, ModelError, OnnxDcError, first_line
from onnx_dc.graph import model_io
from onnx_dc.graph.model_io import load_model, save_model, tensor_bytes
from onnx_dc.graph.restore import decompress_model, has_custom_ops
from onnx_dc.graph.tensor_store import read_structure

# Generated inputs: the first dynamic axis (the batch) gets this size, the others the second.
GENERATED_BATCH = 1
GENERATED_DIM = 32
GENERATED_SEED = 0

DEFAULT_MIN_COSINE = 0.99
"""Default: every float output's cosine with the original's is at least this."""
DEFAULT_MIN_TOP1_AGREEMENT = 0.95
"""Default, on given inputs: classifier-shaped outputs pick the original's class on at least this share of rows.
LeNet-300-100 and LeNet-5 compressed with the defaults agree on 97.2 % and 98.5 % of 2 000 test images."""
DEFAULT: Final = "default"
"""Threshold argument meaning "the default rule" (see :class:`Thresholds`)."""

ThresholdArgument = float | None | Literal["default"]


@dataclass(frozen=True)
class Thresholds:
    """The limits a validation applies; ``None`` is not checked.

    Attributes:
        max_abs_diff: every output's max absolute difference is at most this.
        min_cosine: every float output's cosine similarity is at least this.
        min_top1_agreement: every classifier-shaped output agrees on the argmax of its last axis
            on at least this share (0..1) of its rows.
        defaults: names of the limits that are the built-in defaults rather than given.
        top1_skipped: why the default top-1 agreement was not applied (generated inputs), else None.
    """

    max_abs_diff: float | None = None
    min_cosine: float | None = DEFAULT_MIN_COSINE
    min_top1_agreement: float | None = DEFAULT_MIN_TOP1_AGREEMENT
    defaults: tuple[str, ...] = ()
    top1_skipped: str | None = None

    @classmethod
    def resolve(
        cls,
        max_abs_diff: ThresholdArgument = None,
        min_cosine: ThresholdArgument = DEFAULT,
        min_top1_agreement: ThresholdArgument = DEFAULT,
        *,
        generated_inputs: bool = False,
    ) -> Thresholds:
        """The thresholds of :func:`validate_models`'s arguments (``"default"``: the default rule). Raises
        :class:`CalibrationError` for values out of range."""
        defaults = []
        if max_abs_diff == DEFAULT:
            max_abs_diff = None
        if min_cosine == DEFAULT:
            min_cosine = DEFAULT_MIN_COSINE
            defaults.append("min_cosine")
        skipped = None
        if min_top1_agreement == DEFAULT:
            if generated_inputs:
                min_top1_agreement = None
                skipped = (f"top-1 agreement not checked: the inputs are generated (random), not a classifier's "
                           f"data; give --inputs (default then {DEFAULT_MIN_TOP1_AGREEMENT:.0%}) or --min-top1-agreement")
            else:
                min_top1_agreement = DEFAULT_MIN_TOP1_AGREEMENT
                defaults.append("min_top1_agreement")
        if max_abs_diff is not None and not (_is_number(max_abs_diff) and max_abs_diff >= 0):
            raise CalibrationError(f"--max-abs-diff must be a number >= 0, got {max_abs_diff!r}")
        if min_cosine is not None and not (_is_number(min_cosine) and -1 <= min_cosine <= 1):
            raise CalibrationError(f"--min-cosine must be between -1 and 1, got {min_cosine!r}")
        if min_top1_agreement is not None and not (_is_number(min_top1_agreement) and 0 <= min_top1_agreement <= 1):
            raise CalibrationError(
                f"--min-top1-agreement must be a fraction between 0 and 1 (0.99 = 99 %), got {min_top1_agreement!r}"
            )
        return cls(max_abs_diff, min_cosine, min_top1_agreement, tuple(defaults), skipped)

    def describe(self) -> list[str]:
        """The limits applied, e.g. ``["cosine >= 0.99 (default)"]``."""
        limits = []
        if self.max_abs_diff is not None:
            limits.append(f"max abs diff <= {self.max_abs_diff:g}")
        if self.min_cosine is not None:
            limits.append(f"cosine >= {self.min_cosine:g}" + (" (default)" if "min_cosine" in self.defaults else ""))
        if self.min_top1_agreement is not None:
            limits.append(f"top-1 agreement >= {100 * self.min_top1_agreement:g}%"
                          + (" (default)" if "min_top1_agreement" in self.defaults else ""))
        return limits

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the three limits (null: not checked), which are defaults, and the skip note."""
        return {
            "max_abs_diff": self.max_abs_diff,
            "min_cosine": self.min_cosine,
            "min_top1_agreement": self.min_top1_agreement,
            "defaults": list(self.defaults),
            "applied": self.describe(),
            "top1_skipped": self.top1_skipped,
        }


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class OutputComparison:
    """How one output of the compressed model compares with the original's."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    mean_abs_diff: float
    cosine: float | None  # None for non-float outputs
    top1_agreement: float | None  # None when the output has no class axis
    passed: bool
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "max_abs_diff": _finite_or_str(self.max_abs_diff),
            "mean_abs_diff": _finite_or_str(self.mean_abs_diff),
            "cosine": None if self.cosine is None else _finite_or_str(self.cosine),
            "top1_agreement": self.top1_agreement,
            "passed": self.passed,
            "problem": self.problem,
        }


@dataclass
class ValidationReport:
    """Per-output comparison of two models, the thresholds applied and how the compressed model ran."""

    outputs: list[OutputComparison]
    runner: str
    used_library: bool
    inputs_source: str
    thresholds: Thresholds = field(default_factory=Thresholds)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every output is within the thresholds (and shapes and dtypes agree)."""
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable report."""
        return {
            "passed": self.passed,
            "runner": self.runner,
            "used_library": self.used_library,
            "inputs": self.inputs_source,
            "thresholds": self.thresholds.to_dict(),
            "outputs": [o.to_dict() for o in self.outputs],
            "notes": list(self.notes),
        }

    def format_table(self) -> str:
        """The comparison as a text table plus a verdict line."""
        header = ["output", "shape", "max abs diff", "mean abs diff", "cosine", "top-1 agree", "ok"]
        rows = []
        for o in self.outputs:
            rows.append(
                [
                    o.name,
                    "x".join(str(d) for d in o.shape) or "scalar",
                    f"{o.max_abs_diff:.3g}",
                    f"{o.mean_abs_diff:.3g}",
                    "-" if o.cosine is None else f"{o.cosine:.6f}",
                    "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.1f}%",
                    "yes" if o.passed else "NO",
                ]
            )
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        right = {2, 3, 4, 5}

        def fmt(row: list[str]) -> str:
            return "  ".join(row[i].rjust(widths[i]) if i in right else row[i].ljust(widths[i]) for i in range(len(row))).rstrip()

        lines = [f"compressed model ran through: {self.runner}", f"inputs: {self.inputs_source}", fmt(header)]
        lines.append("-" * len(lines[-1]))
        lines += [fmt(r) for r in rows]
        for o in self.outputs:
            if o.problem:
                lines.append(f"{o.name}: {o.problem}")
        lines += [f"note: {n}" for n in self.notes]
        if self.thresholds.top1_skipped:
            lines.append(f"note: {self.thresholds.top1_skipped}")
        limits = self.thresholds.describe()
        verdict = "PASSED" if self.passed else "FAILED"
        lines.append(f"{verdict} ({', '.join(limits) if limits else 'no thresholds: outputs finite and shaped alike'})")
        return "\n".join(lines)


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an ``.npz`` file of arrays keyed by model input name. Raises :class:`CalibrationError`."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"{p}: no such inputs file")
    return read_npz(p)


def generate_inputs(model: onnx.ModelProto, *, seed: int = GENERATED_SEED) -> dict[str, np.ndarray]:
    """Inputs built from the model's input specs: dynamic axes small, floats standard normal, integers 0."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in input_specs(model, hint="give the inputs with --inputs FILE.npz"):
        dtype = spec.dtype
        shape = [
            dim if dim is not None else (GENERATED_BATCH if axis == 0 else GENERATED_DIM)
            for axis, dim in enumerate(spec.shape or ())
        ]
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = np.asarray(rng.random(shape) < 0.5)  # 0-d stays an ndarray, which onnxruntime needs
        else:
            raise CalibrationError(f"input {spec.name!r} of type {dtype} cannot be generated; use --inputs FILE.npz")
    return feeds


def validate_models(
    original: onnx.ModelProto | Path,
    compressed: onnx.ModelProto | Path,
    *,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    max_abs_diff: ThresholdArgument = None,
    min_cosine: ThresholdArgument = DEFAULT,
    min_top1_agreement: ThresholdArgument = DEFAULT,
    use_library: bool | None = None,
) -> ValidationReport:
    """Run ``original`` and ``compressed`` on the same inputs and compare their outputs.

    Thresholds: a number is checked, ``None`` is not, ``"default"`` applies the default rule
    (:class:`Thresholds`: cosine >= 0.99 for every float output; top-1 agreement >= 95 % for
    classifier-shaped outputs, on given inputs only). ``use_library``: ``None`` uses the custom
    operator library when it can be found and falls back to decompressing the model otherwise;
    ``True`` requires it (raises :class:`LibraryNotFoundError`); ``False`` always decompresses.
    A model given as a path is run from its file (its weights are not loaded here; onnxruntime
    reads its external data itself).
    """
    original_source, original = original, _structure(original)
    compressed_source, compressed = compressed, _structure(compressed)
    thresholds = Thresholds.resolve(max_abs_diff, min_cosine, min_top1_agreement, generated_inputs=inputs is None)
    if inputs is None:
        feeds = generate_inputs(original)
        source = (
            f"generated from the input specs (seed {GENERATED_SEED}; dynamic axes: first {GENERATED_BATCH}, "
            f"others {GENERATED_DIM}; floats standard normal, integers 0)"
        )
    elif isinstance(inputs, (str, os.PathLike)):
        feeds = load_inputs(inputs)
        source = str(inputs)
    else:
        feeds = {k: np.asarray(v) for k, v in inputs.items()}
        source = "given arrays"
    feeds = _check_feeds(original, feeds)

    library: str | None = None
    notes: list[str] = []
    if has_custom_ops(compressed):
        if use_library is not False:
            try:
                from onnx_dc.graph.library import ops_library_path

                library = str(ops_library_path())
            except (ImportError, LibraryNotFoundError) as exc:
                if use_library:
                    raise LibraryNotFoundError(f"custom operator library not available: {first_line(exc)}") from None
                notes.append(f"custom operator library not available ({first_line(exc)})")
        if library is not None:
            runner = f"onnx-dc custom operator library ({library})"
            run_model = compressed_source
        else:
            runner = "decompressed model (standard onnxruntime operators)"
            run_model = load_model(compressed_source)
            decompress_model(run_model)
    else:
        runner = "plain onnxruntime (the model has no onnx-dc operators)"
        run_model = compressed_source

    expected = _run(original_source, feeds, None, "original model")
    actual = _run(run_model, feeds, library, "compressed model")
    comparisons = []
    for name, ref in expected.items():
        if name not in actual:
            comparisons.append(OutputComparison(name, tuple(ref.shape), math.inf, math.inf, None, None, False, "missing from the compressed model's outputs"))
            continue
        comparisons.append(_compare(name, ref, actual[name], thresholds))
    return ValidationReport(comparisons, runner, library is not None, source, thresholds, notes)


def _check_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    initializers = {t.name for t in model.graph.initializer}
    required = [vi for vi in model.graph.input if vi.name not in initializers]
    names = {vi.name for vi in model.graph.input}
    unknown = sorted(set(feeds) - names)
    if unknown:
        raise CalibrationError(
            f"inputs {', '.join(map(repr, unknown))} are not inputs of the model "
            f"(its inputs: {', '.join(vi.name for vi in required)})"
        )
    missing = [vi.name for vi in required if vi.name not in feeds]
    if missing:
        raise CalibrationError(f"no data for model input(s) {', '.join(map(repr, missing))}")
    checked = {}
    for vi in model.graph.input:
        if vi.name not in feeds:
            continue
        array = feeds[vi.name]
        ttype = vi.type.tensor_type
        if ttype.elem_type:
            want = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
            if array.dtype != want:
                if array.dtype.kind in "fiub" and want.kind in "fiub":
                    array = array.astype(want)
                else:
                    raise CalibrationError(f"input {vi.name!r}: got {array.dtype} data, the model expects {want}")
        if ttype.HasField("shape") and len(ttype.shape.dim) != array.ndim:
            raise CalibrationError(
                f"input {vi.name!r}: got an array of rank {array.ndim}, the model expects rank {len(ttype.shape.dim)}"
            )
        for axis, dim in enumerate(ttype.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0 and array.shape[axis] != dim.dim_value:
                raise CalibrationError(
                    f"input {vi.name!r}: axis {axis} has size {array.shape[axis]}, the model expects {dim.dim_value}"
                )
        checked[vi.name] = array
    return checked


def _structure(model: onnx.ModelProto | Path) -> onnx.ModelProto:
    """The model itself, or a model file's graph without its weights (for input specs and operators)."""
    return model if isinstance(model, onnx.ModelProto) else read_structure(model)


def _run(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray], library: str | None, what: str) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions, reported in one line
    if library is not None:
        options.register_custom_ops_library(library)
    try:
        with _serialized(model) as source:
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, feeds)
    except OnnxDcError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types for bad models
        raise ModelError(f"{what}: onnxruntime failed: {first_line(exc)}") from None
    return {name: np.asarray(value) for name, value in zip(names, values)}


class _serialized:
    """Bytes of a model for InferenceSession, or a temporary file with external data when over 2 GB."""

    def __init__(self, model: onnx.ModelProto | Path) -> None:
        self.model = model
        self.tmpdir: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> bytes | str:
        if isinstance(self.model, Path):
            read_structure(self.model)  # a clear error for a missing or non-ONNX file
            return str(self.model)
        if tensor_bytes(self.model) <= model_io.PROTOBUF_LIMIT_BYTES:
            return self.model.SerializeToString()
        self.tmpdir = tempfile.TemporaryDirectory(prefix="onnx_dc_validate_")
        path = Path(self.tmpdir.name) / "model.onnx"
        save_model(self.model, path, external_data=True)
        return str(path)

    def __exit__(self, *exc: object) -> None:
        if self.tmpdir is not None:
            self.tmpdir.cleanup()


def _compare(name: str, ref: np.ndarray, got: np.ndarray, thresholds: Thresholds) -> OutputComparison:
    if ref.shape != got.shape:
        return OutputComparison(name, tuple(ref.shape), math.inf, math.inf, None, None, False, f"shape {got.shape} differs from the original's {ref.shape}")
    is_float = ref.dtype.kind == "f"
    if ref.dtype.kind not in "fiub":
        equal = bool(np.array_equal(ref, got))
        return OutputComparison(name, tuple(ref.shape), 0.0 if equal else math.inf, 0.0 if equal else math.inf, None, None, equal, None if equal else "values differ")
    a = ref.astype(np.float64).ravel()
    b = got.astype(np.float64).ravel()
    diff = np.abs(a - b)
    if a.size:
        max_diff = float(np.max(diff)) if np.all(np.isfinite(diff)) else math.inf
        mean_diff = float(np.mean(diff)) if np.all(np.isfinite(diff)) else math.inf
    else:
        max_diff = mean_diff = 0.0
    cosine = None
    if is_float:
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if not (math.isfinite(na) and math.isfinite(nb)):
            cosine = math.nan
        elif na == 0.0 and nb == 0.0:
            cosine = 1.0
        elif na == 0.0 or nb == 0.0:
            cosine = 0.0
        else:
            cosine = float(np.dot(a, b) / (na * nb))
    top1 = None
    if is_float and ref.ndim >= 2 and ref.shape[-1] >= 2 and ref.size:
        top1 = float(np.mean(np.argmax(ref, axis=-1) == np.argmax(got, axis=-1)))
    passed = True
    problems = []
    if not math.isfinite(max_diff) and a.size:
        passed = False
        problems.append("non-finite values")
    limit = thresholds.max_abs_diff
    if limit is not None and not (max_diff <= limit):
        passed = False
        problems.append(f"max abs diff {max_diff:.3g} > {limit:g}")
    limit = thresholds.min_cosine
    if limit is not None and cosine is not None and not (cosine >= limit):
        passed = False
        problems.append(f"cosine {cosine:.6f} < {limit:g}")
    limit = thresholds.min_top1_agreement
    if limit is not None and top1 is not None and not (top1 >= limit):
        passed = False
        problems.append(f"top-1 agreement {100 * top1:.1f}% < {100 * limit:g}%")
    return OutputComparison(name, tuple(ref.shape), max_diff, mean_diff, cosine, top1, passed, "; ".join(problems) or None)


def _finite_or_str(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


