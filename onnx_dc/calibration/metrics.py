"""How a candidate's outputs compare with the original's: relative error, cosine, top-1."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from onnx_dc.errors import CalibrationError, ModelError

__all__ = [
    "OutputMetrics",
    "compare_outputs",
]



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
    """

    relative_error: float
    cosine: float
    accuracy: float | None = None
    agreement: float | None = None
    discordant: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        """JSON-ready dict."""
        return {
            "relative_error": _json_float(self.relative_error),
            "cosine": _json_float(self.cosine),
            "accuracy": self.accuracy,
            "agreement": self.agreement,
        }


def compare_outputs(
    reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], labels: np.ndarray | None = None
) -> OutputMetrics:
    """:class:`OutputMetrics` of ``outputs`` against ``reference`` (same keys and shapes)."""
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
    return OutputMetrics(relative, cosine, accuracy, agreement, discordant)


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
