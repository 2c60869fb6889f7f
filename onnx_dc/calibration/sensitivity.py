"""Per-layer sensitivity analysis: output error (and accuracy) against sparsity and against bits.

For every layer with captured statistics (:func:`onnx_dc.calibration.layers.find_layers`),
with all other layers untouched:

* **vs sparsity**: the layer is pruned (no weight sharing) at each sparsity of
  the grid, by the calibrated recipe (pruning criterion, least-squares refit of
  the survivors, bias correction; see :mod:`onnx_dc.calibration.model_fit`) or, with
  ``method="plain"``, by magnitude alone as in the paper;
* **vs bits**: the layer is weight-shared (no pruning) at each number of bits,
  with the centroid refit (calibrated) or plain k-means.

Each point records the layer's own relative reconstruction error on the
calibration data and the model-level effect measured by running the model on
the evaluation inputs: the relative output error ``sum ||y - y0||^2 / sum ||y0||^2``
over all outputs, the cosine similarity per output (flattened, as
``onnx-dc validate`` computes it; the minimum over outputs), and top-1
accuracy when labels are given. The model is run with the layers' weights fed
as inputs of one onnxruntime session, so a point costs one pass over the
evaluation data. Without evaluation data the calibration inputs are used (the
model-level numbers are then in-sample).

The result is written as JSON (:meth:`SensitivityReport.to_dict`) and, with
matplotlib installed, as a plot with one curve per layer (like the paper's
Figures 5-6 and Distiller's sensitivity charts).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx_dc.calibration.capture import capture_statistics
from onnx_dc.calibration.data import CalibrationData
from onnx_dc.calibration.layers import LayerSpec, find_layers
from onnx_dc.calibration.metrics import OutputMetrics, _json_float, compare_outputs, top1_accuracy
from onnx_dc.calibration.model_fit import LayerFitter, initializer_array
from onnx_dc.calibration.options import CalibrationOptions, LayerSettings
from onnx_dc.calibration.targets import layer_target
from onnx_dc.calibration.weight_swap import WeightSwapRunner
from onnx_dc.errors import ModelError, SettingsError
from onnx_dc.progress import progress_bar, stage_line

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_SPARSITIES",
    "LayerSensitivity",
    "PLAIN_OPTIONS",
    "SensitivityPoint",
    "SensitivityReport",
    "analyze_sensitivity",
    "plot_sensitivity",
    "write_json_atomic",
]


DEFAULT_SPARSITIES: tuple[float, ...] = (0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97)
DEFAULT_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)

PLAIN_OPTIONS = CalibrationOptions(
    criterion="magnitude", refit_weights=False, refit_rounds=0, sequential=False, bias_correction=False,
    downstream_weighting=False,
)
"""The paper's one-shot recipe expressed as options: magnitude pruning, k-means, no refit."""


# ---------------------------------------------------------------------------
# Sensitivity


@dataclass(frozen=True)
class SensitivityPoint:
    """One measurement: the layer at one sparsity (no sharing) or one bit width (no pruning)."""

    setting: str  # "sparsity" or "bits"
    value: float
    layer_relative_error: float
    output: OutputMetrics
    criterion: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            self.setting: self.value,
            "layer_relative_error": _json_float(self.layer_relative_error),
            **self.output.to_dict(),
            "criterion": self.criterion,
        }


@dataclass
class LayerSensitivity:
    """The curves of one layer."""

    name: str
    op: str
    shape: tuple[int, ...]
    sparsity: list[SensitivityPoint] = field(default_factory=list)
    bits: list[SensitivityPoint] = field(default_factory=list)

    @property
    def n_weights(self) -> int:
        """Number of weights."""
        return int(np.prod(self.shape))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "name": self.name,
            "op": self.op,
            "shape": list(self.shape),
            "weights": self.n_weights,
            "sparsity": [p.to_dict() for p in self.sparsity],
            "bits": [p.to_dict() for p in self.bits],
        }


@dataclass
class SensitivityReport:
    """All layers' curves and what they were measured on."""

    layers: list[LayerSensitivity]
    method: str
    n_calibration_samples: int
    n_eval_samples: int
    eval_source: str
    baseline_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document ``onnx-dc sensitivity`` writes."""
        return {
            "method": self.method,
            "calibration_samples": self.n_calibration_samples,
            "evaluation_samples": self.n_eval_samples,
            "evaluation_source": self.eval_source,
            "baseline_accuracy": self.baseline_accuracy,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def format_table(self) -> str:
        """One line per layer and setting: relative output error (and accuracy) at each grid point."""
        lines = []
        metric = "accuracy %" if self.baseline_accuracy is not None else "output rel. error"
        if self.baseline_accuracy is not None:
            lines.append(f"baseline accuracy {100 * self.baseline_accuracy:.2f} % on {self.n_eval_samples} samples ({self.eval_source})")
        else:
            lines.append(f"model outputs compared on {self.n_eval_samples} samples ({self.eval_source})")
        for setting in ("sparsity", "bits"):
            values = sorted({p.value for layer in self.layers for p in getattr(layer, setting)})
            if not values:
                continue
            header = [f"{metric} vs {setting}"] + [f"{v:g}" for v in values]
            rows = [header]
            for layer in self.layers:
                by_value = {p.value: p for p in getattr(layer, setting)}
                row = [layer.name]
                for v in values:
                    p = by_value.get(v)
                    if p is None:
                        row.append("-")
                    elif self.baseline_accuracy is not None and p.output.accuracy is not None:
                        row.append(f"{100 * p.output.accuracy:.2f}")
                    else:
                        row.append(f"{p.output.relative_error:.2e}")
                rows.append(row)
            widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
            lines.append("")
            for i, row in enumerate(rows):
                lines.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(row)))
                if i == 0:
                    lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
        return "\n".join(lines)


ProgressCallback = Callable[[int, int, str], None]


def analyze_sensitivity(
    model: onnx.ModelProto,
    calibration: CalibrationData,
    *,
    evaluation: CalibrationData | None = None,
    labels: np.ndarray | None = None,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    bits: Sequence[int] = DEFAULT_BITS,
    method: str = "calibrated",
    options: CalibrationOptions | None = None,
    layers: Sequence[str] | None = None,
    progress: bool | ProgressCallback = False,
) -> SensitivityReport:
    """Measure every layer's sensitivity to pruning and to weight sharing (see the module docstring).

    Args:
        model: the original model.
        calibration: calibration inputs (statistics for the fits).
        evaluation: inputs the model-level effect is measured on (default: ``calibration``).
        labels: labels of ``evaluation`` (top-1 accuracy is reported when given).
        sparsities, bits: the grids.
        method: ``calibrated`` (refits, bias correction) or ``plain`` (magnitude, k-means).
        options: calibrated options (``sequential`` does not apply here).
        layers: restrict to these weight names.
        progress: ``True`` for a tqdm bar on a terminal, or a callable ``(done, total, name)``.
    """
    if method not in ("calibrated", "plain"):
        raise SettingsError(f"unknown method {method!r}: expected calibrated or plain")
    sparsities = [_check_sparsity(s) for s in sparsities]
    bits = [_check_bits(b) for b in bits]
    opts = PLAIN_OPTIONS if method == "plain" else (options or CalibrationOptions())
    all_layers = find_layers(model)
    found = find_layers(model, layers)
    if layers is not None:
        missing = sorted(set(layers) - {layer.weight for layer in found})
        if missing:
            raise SettingsError(f"no layer with calibration statistics named {', '.join(map(repr, missing))}")
    if not found:
        raise ModelError("the model has no MatMul/Gemm/Conv weight whose input can be captured")
    evaluation = evaluation or calibration
    stats = capture_statistics(model, calibration, found, batch_size=opts.batch_size, progress=progress is True)
    swap_names = [layer.weight for layer in found] + [layer.bias for layer in found if layer.bias]
    runner = WeightSwapRunner(model, swap_names, evaluation, batch_size=opts.batch_size)
    reference = runner.run()
    baseline = top1_accuracy(reference, labels) if labels is not None else None
    total = len(found) * (len(sparsities) + len(bits))
    done = 0
    bar = _bar(progress, total)
    report_layers = []
    try:
        for layer in found:
            weight = initializer_array(model, layer.weight)
            bias = initializer_array(model, layer.bias) if layer.bias else None
            target = layer_target(model, layer, stats[layer.weight], weight, bias, opts, layers=all_layers)
            fitter = LayerFitter(target, weight, opts)
            fitter.prepare([s for s in sparsities if 0 < s < 1])
            entry = LayerSensitivity(layer.weight, layer.op, tuple(weight.shape))
            for s in sparsities:
                criterion, pruned, new_bias = fitter.pruned_weights(s)
                error = target.problem.relative_error(layer.to_blocks(pruned))
                outputs = runner.run(_replacements(layer, pruned, new_bias, bias))
                entry.sparsity.append(SensitivityPoint("sparsity", s, error, compare_outputs(reference, outputs, labels), criterion))
                done += 1
                _tick(bar, progress, done, total, layer.weight)
            for b in bits:
                fit = fitter.fit(0.0, b)
                tensor, new_bias = fitter.tensor(fit, LayerSettings(sparsity=0.0, bits=b, index_bits=8))
                error = target.problem.relative_error(layer.to_blocks(tensor.quantized))
                outputs = runner.run(_replacements(layer, tensor.quantized, new_bias, bias))
                entry.bits.append(SensitivityPoint("bits", float(b), error, compare_outputs(reference, outputs, labels)))
                done += 1
                _tick(bar, progress, done, total, layer.weight)
            report_layers.append(entry)
    finally:
        if bar is not None:
            bar.close()
    return SensitivityReport(
        report_layers,
        method,
        calibration.n_samples,
        evaluation.n_samples,
        evaluation.description or "evaluation data",
        baseline,
    )


def _replacements(layer: LayerSpec, weight: np.ndarray, new_bias: np.ndarray | None, bias: np.ndarray | None) -> dict[str, np.ndarray]:
    result = {layer.weight: weight}
    if new_bias is not None and bias is not None and layer.bias is not None:
        result[layer.bias] = new_bias.reshape(bias.shape).astype(bias.dtype)
    return result


def plot_sensitivity(report: SensitivityReport, path: str | os.PathLike) -> None:
    """Write the sensitivity curves as an image (format from the file suffix), atomically.

    Two panels, vs sparsity and vs bits, one curve per layer: top-1 accuracy when
    the report has labels, else the relative output error (log scale).

    Raises:
        SettingsError: matplotlib is not installed (it is an optional dependency).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SettingsError(
            "--plot needs matplotlib, an optional dependency: pip install matplotlib (or onnx-dc[plot])"
        ) from None
    path = Path(path)
    with_accuracy = report.baseline_accuracy is not None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, setting in zip(axes, ("sparsity", "bits")):
        for layer in report.layers:
            points = getattr(layer, setting)
            if not points:
                continue
            x = [p.value for p in points]
            if with_accuracy:
                y = [100 * (p.output.accuracy or 0.0) for p in points]
            else:
                y = [max(p.output.relative_error, 1e-12) for p in points]
            ax.plot(x, y, marker="o", label=f"{layer.name} ({layer.n_weights:,})")
        if with_accuracy:
            ax.axhline(100 * report.baseline_accuracy, color="gray", linestyle="--", linewidth=1, label="original")
            ax.set_ylabel("top-1 accuracy (%)")
        else:
            ax.set_yscale("log")
            ax.set_ylabel("relative output error")
        ax.set_xlabel("sparsity (pruning only)" if setting == "sparsity" else "weight bits (sharing only)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"per-layer sensitivity ({report.method}, {report.n_eval_samples} samples)")
    fig.tight_layout()
    suffix = path.suffix.lstrip(".") or "png"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format=suffix, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def write_json_atomic(document: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a JSON document atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(document, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_sparsity(value: object) -> float:
    try:
        s = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SettingsError(f"sparsity {value!r} is not a number") from None
    if not 0.0 <= s < 1.0:
        raise SettingsError(f"sparsities must be in [0, 1) (sparsity 1 removes every weight), got {value!r}")
    return s


def _check_bits(value: object) -> int:
    if isinstance(value, bool):
        raise SettingsError(f"bits {value!r} is not an integer")
    try:
        b = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SettingsError(f"bits {value!r} is not an integer") from None
    if b != value and not (isinstance(value, str) and value.strip() == str(b)) and not (isinstance(value, float) and value == b):
        raise SettingsError(f"bits {value!r} is not an integer")
    if not 1 <= b <= 8:
        raise SettingsError(f"bits must be in [1, 8], got {value!r}")
    return b






def _bar(progress: bool | ProgressCallback, total: int):
    stage_line(progress, f"measuring {total} sensitivity points")
    return progress_bar(progress, total, unit="point", description="sensitivity")


def _tick(bar, progress, done: int, total: int, name: str) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix_str(name, refresh=True)
    if callable(progress):
        progress(done, total, name)
