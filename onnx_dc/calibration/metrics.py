"""How a candidate's outputs compare with the original's: relative error, cosine, top-1, a user's task metric.

A *task metric* is a user function ``metric(original_outputs, compressed_outputs) -> float``
taking the model's outputs (lists of arrays in the model's output order, every
sample of the search data stacked along axis 0) and returning a score, higher
is better (``--metric module:function --min-metric X``). :func:`load_task_metric`
turns a ``"module:function"`` spec or a callable into a :class:`TaskMetric`.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnx_dc.errors import CalibrationError, ModelError, SettingsError

__all__ = [
    "OutputMetrics",
    "TaskMetric",
    "compare_outputs",
    "load_task_metric",
    "task_metric_spec",
]

MetricFunction = Callable[[list[np.ndarray], list[np.ndarray]], float]
"""``metric(original_outputs, compressed_outputs) -> score`` (higher is better)."""


@dataclass(frozen=True)
class TaskMetric:
    """A user's task metric and the ``module:function`` spec that names it."""

    spec: str
    function: MetricFunction

    def __call__(self, original: Sequence[np.ndarray], compressed: Sequence[np.ndarray]) -> float:
        """The score of ``compressed`` against ``original``; a non-number result is a one-line error."""
        try:
            score = self.function(list(original), list(compressed))
        except Exception as exc:  # the user's code: say whose it is, in one line
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise CalibrationError(f"--metric {self.spec} raised {type(exc).__name__}: {first}") from exc
        if isinstance(score, (bool, np.bool_)) or not isinstance(score, (int, float, np.integer, np.floating)):
            if isinstance(score, np.ndarray) and score.size == 1 and score.dtype.kind in "iuf":
                score = score.item()
            else:
                raise CalibrationError(f"--metric {self.spec} returned {type(score).__name__}, expected a float score")
        score = float(score)
        if not math.isfinite(score):
            raise CalibrationError(f"--metric {self.spec} returned {score}, expected a finite score")
        return score


def task_metric_spec(function: Callable[..., object]) -> str:
    """The ``module:function`` spec recorded for a callable (its module and qualified name)."""
    module = getattr(function, "__module__", None) or "?"
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", None) or type(function).__name__
    return f"{module}:{name}"


def load_task_metric(metric: str | Callable[..., object]) -> TaskMetric:
    """A :class:`TaskMetric` from a callable or a ``"module:function"`` spec (``function`` may be dotted;
    the module is imported from ``sys.path``, the current directory included).

    Raises:
        SettingsError: a malformed spec, a module that cannot be imported, a missing or
            non-callable attribute (one line each).
    """
    if isinstance(metric, TaskMetric):
        return metric
    if callable(metric) and not isinstance(metric, str):
        return TaskMetric(task_metric_spec(metric), metric)
    if not isinstance(metric, str):
        raise SettingsError(f"--metric must be 'module:function' or a callable, got {type(metric).__name__}")
    module_name, sep, attribute = metric.partition(":")
    if not sep or not module_name or not attribute or ":" in attribute:
        raise SettingsError(f"--metric must be 'module:function', got {metric!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # as ``python -m`` does: a metric module beside the user's data is found
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise SettingsError(f"--metric {metric}: cannot import module {module_name!r} ({exc})") from exc
    except Exception as exc:  # an error inside the user's module
        raise SettingsError(f"--metric {metric}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise SettingsError(f"--metric {metric}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise SettingsError(f"--metric {metric}: {attribute!r} is a {type(target).__name__}, not a function")
    return TaskMetric(metric, target)  # type: ignore[arg-type]



# ---------------------------------------------------------------------------
# Output comparison


@dataclass(frozen=True)
class OutputMetrics:
    """How a model's outputs compare with the original's on the same inputs.

    Attributes:
        relative_error: ``sum ||y - y0||^2 / sum ||y0||^2`` over all float outputs.
        cosine: the lowest cosine similarity over float outputs (each output flattened).
        accuracy: top-1 accuracy of the first output against labels, or None.
        agreement: fraction of samples whose arg-max (last axis of the first output) is unchanged.
        discordant: with labels, fraction of samples right in one model and wrong in the other
            (``(broken + fixed) / n``: what the sampling error of a paired top-1 drop depends on;
            predictions that change between two wrong classes do not count), or None.
        task_metric: the user's task metric (:class:`TaskMetric`) of the outputs, or None.
    """

    relative_error: float
    cosine: float
    accuracy: float | None = None
    agreement: float | None = None
    discordant: float | None = None
    task_metric: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        """JSON-ready dict (``task_metric`` only when there is one)."""
        result = {
            "relative_error": _json_float(self.relative_error),
            "cosine": _json_float(self.cosine),
            "accuracy": self.accuracy,
            "agreement": self.agreement,
        }
        if self.task_metric is not None:
            result["task_metric"] = self.task_metric
        return result


def compare_outputs(
    reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], labels: np.ndarray | None = None,
    metric: TaskMetric | None = None,
) -> OutputMetrics:
    """:class:`OutputMetrics` of ``outputs`` against ``reference`` (same keys and shapes); ``metric``: also
    the task metric of the outputs in ``reference``'s order."""
    num = den = 0.0
    cosine = 1.0
    first = None
    for name, ref in reference.items():
        got = outputs[name]
        if ref.dtype.kind != "f":
            continue
        a = ref.astype(np.float64).ravel()
        b = np.asarray(got, dtype=np.float64).ravel()
        if a.shape != b.shape:
            raise ModelError(f"output {name!r} has shape {np.shape(got)}, expected {ref.shape}")
        num += float(np.sum((a - b) ** 2))
        den += float(np.sum(a * a))
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if na == 0.0 and nb == 0.0:
            c = 1.0
        elif na == 0.0 or nb == 0.0 or not (math.isfinite(na) and math.isfinite(nb)):
            c = 0.0
        else:
            c = float(np.dot(a, b) / (na * nb))
        cosine = min(cosine, c)
        if first is None and ref.ndim >= 2 and ref.shape[-1] >= 2:
            first = (ref, np.asarray(got))
    relative = num / den if den > 0 else (0.0 if num == 0 else math.inf)
    accuracy = agreement = discordant = None
    if first is not None:
        ref, got = first
        ref_top = ref.reshape(-1, ref.shape[-1]).argmax(axis=1)
        got_top = got.reshape(-1, got.shape[-1]).argmax(axis=1)
        agreement = float(np.mean(ref_top == got_top))
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            if labels.size != got_top.size:
                raise CalibrationError(
                    f"{labels.size} labels for {got_top.size} predictions of output {next(iter(reference))!r}"
                )
            accuracy = float(np.mean(got_top == labels))
            discordant = float(np.mean((got_top == labels) != (ref_top == labels)))
    score = metric(list(reference.values()), [np.asarray(outputs[name]) for name in reference]) if metric else None
    return OutputMetrics(relative, cosine, accuracy, agreement, discordant, score)


def top1_accuracy(outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy of the first output with at least two classes on its last axis."""
    for value in outputs.values():
        if value.ndim >= 2 and value.shape[-1] >= 2:
            top = value.reshape(-1, value.shape[-1]).argmax(axis=1)
            labels = np.asarray(labels).reshape(-1)
            if labels.size != top.size:
                raise CalibrationError(f"{labels.size} labels for {top.size} predictions")
            return float(np.mean(top == labels))
    raise CalibrationError("the model has no output with class scores on its last axis, so accuracy is undefined")


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)
