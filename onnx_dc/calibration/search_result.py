"""What the automatic search returns: the per-layer choices, the final model and how the budget was met."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from onnx_dc.calibration.budget import Budget
from onnx_dc.calibration.metrics import OutputMetrics
from onnx_dc.calibration.model_fit import CalibratedCompression
from onnx_dc.calibration.options import LayerSettings


@dataclass(frozen=True)
class LayerChoice:
    """What the search chose for one layer and what it gave in the final model."""

    name: str
    op: str
    shape: tuple[int, ...]
    sparsity: float
    bits: int
    index_bits: int
    size_bytes: int
    original_bytes: int
    criterion: str | None
    relative_error: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "name": self.name,
            "op": self.op,
            "shape": list(self.shape),
            "sparsity": self.sparsity,
            "bits": self.bits,
            "index_bits": self.index_bits,
            "bytes": self.size_bytes,
            "original_bytes": self.original_bytes,
            "criterion": self.criterion,
            "layer_relative_error": self.relative_error,
        }


@dataclass
class AutotuneResult:
    """Outcome of :func:`autotune`.

    Attributes:
        settings: the chosen :class:`~onnx_dc.calibration.options.LayerSettings` per searched layer.
        choices: per searched layer, what was chosen and what it gave.
        compression: the final :class:`~onnx_dc.calibration.model_fit.CalibratedCompression`.
        built: what the ``build`` callback returned for it (the converted model and its report).
        metrics: the final model's :class:`~onnx_dc.calibration.metrics.OutputMetrics` on the search data.
        baseline_accuracy: the original model's accuracy on the search data (with labels).
        budget_met: whether the final model meets the budget.
        predicted: metrics of the assembled (non-sequential) configuration the search chose.
        search_description, n_search_samples, n_fit_samples: what the budget was measured on.
        verified_with: how the final model was run.
        path_length: configurations on the whole search path (before thinning).
        path: the configurations whose budget was checked, in path order (most accurate first), as
            per-layer settings of the searched layers; the trade-off curve the choice was made on.
        chosen_index: the index in ``path`` of the configuration returned.
        steps: log lines of the search.
    """

    settings: dict[str, LayerSettings]
    choices: list[LayerChoice]
    compression: CalibratedCompression
    built: Any
    metrics: OutputMetrics
    budget: Budget
    baseline_accuracy: float | None
    budget_met: bool
    predicted: OutputMetrics | None
    search_description: str
    n_search_samples: int
    n_fit_samples: int
    verified_with: str
    path_length: int = 0
    path: list[dict[str, LayerSettings]] = field(default_factory=list)
    chosen_index: int | None = None
    steps: list[str] = field(default_factory=list)

    def achieved(self) -> str:
        """The achieved budget as text, e.g. ``cosine 0.99942 (>= 0.999)``."""
        parts = []
        if self.budget.min_cosine is not None:
            parts.append(f"cosine {self.metrics.cosine:.6f} (budget >= {self.budget.min_cosine:g})")
        if self.budget.max_drop is not None and self.metrics.accuracy is not None and self.baseline_accuracy is not None:
            drop = 100.0 * (self.baseline_accuracy - self.metrics.accuracy)
            parts.append(
                f"top-1 {100 * self.metrics.accuracy:.2f} % vs {100 * self.baseline_accuracy:.2f} % "
                f"original, drop {drop:.2f} pp (budget <= {self.budget.max_drop:g} pp)"
            )
        if self.budget.min_metric is not None and self.metrics.task_metric is not None:
            parts.append(f"task metric {self.metrics.task_metric:.6g} (budget >= {self.budget.min_metric:g})")
        return "; ".join(parts)

    def format_summary(self) -> str:
        """The per-layer choices and the achieved budget, for the command line."""
        header = ["layer", "op", "shape", "sparsity", "bits", "idx bits", "bytes", "ratio", "criterion", "layer err"]
        rows = [header]
        for c in self.choices:
            rows.append(
                [
                    c.name,
                    c.op,
                    "x".join(map(str, c.shape)),
                    f"{c.sparsity:.2f}",
                    str(c.bits),
                    str(c.index_bits),
                    f"{c.size_bytes:,}",
                    f"{c.original_bytes / c.size_bytes:.1f}x" if c.size_bytes else "-",
                    c.criterion or "plain",
                    f"{c.relative_error:.2e}" if c.relative_error is not None else "-",
                ]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [f"automatic settings ({self.budget.describe()} on {self.n_search_samples} samples of {self.search_description}; "
                 f"fitted on {self.n_fit_samples} calibration samples):"]
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(widths[j]) if j in (0, 1, 2, 8) else cell.rjust(widths[j]) for j, cell in enumerate(row)))
            if i == 0:
                lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
        verdict = "met" if self.budget_met else "NOT met"
        lines.append(f"budget {verdict}: {self.achieved()} [final model run end to end: {self.verified_with}]")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "budget": {
                "min_cosine": self.budget.min_cosine, "max_drop": self.budget.max_drop, "min_metric": self.budget.min_metric,
            },
            "budget_met": self.budget_met,
            "search_data": self.search_description,
            "search_samples": self.n_search_samples,
            "fit_samples": self.n_fit_samples,
            "baseline_accuracy": self.baseline_accuracy,
            "final": self.metrics.to_dict(),
            "predicted": None if self.predicted is None else self.predicted.to_dict(),
            "verified_with": self.verified_with,
            "layers": [c.to_dict() for c in self.choices],
            "path_length": self.path_length,
        }
