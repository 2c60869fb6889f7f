"""The budget of the automatic search, and choosing along the search path by it.

The losses measured along the path (``1 - cosine``, top-1 drop) are noisy but
increase with compression; :func:`_robust_choice` smooths them by isotonic
regression and takes the most compressed configuration whose smoothed and own
measurements meet the budget, optionally by a margin of standard errors
(:func:`drop_standard_error`). :func:`_step_forward` and :func:`_step_back`
walk the path with real compressions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from onnx_dc.calibration.metrics import OutputMetrics
from onnx_dc.errors import SettingsError

__all__ = [
    "Budget",
    "drop_standard_error",
]

STEP_BACK_LINEAR = 6  # configurations tried one by one when the final model misses the budget


@dataclass(frozen=True)
class Budget:
    """What the compressed model must preserve, on the search data.

    Attributes:
        min_cosine: lowest allowed cosine similarity of every output with the original's.
        max_drop: largest allowed drop of top-1 accuracy, in percentage points (needs labels).
        min_metric: lowest allowed score of the user's task metric (``--metric``), higher is better.
    """

    min_cosine: float | None = None
    max_drop: float | None = None
    min_metric: float | None = None

    def __post_init__(self) -> None:
        if self.min_cosine is None and self.max_drop is None and self.min_metric is None:
            raise SettingsError("a budget needs --min-cosine or --max-drop (or --metric with --min-metric)")
        if self.min_metric is not None and (
            isinstance(self.min_metric, bool) or not isinstance(self.min_metric, (int, float))
            or not math.isfinite(self.min_metric)
        ):
            raise SettingsError(f"--min-metric must be a finite number, got {self.min_metric!r}")
        if self.min_cosine is not None and not (-1.0 <= self.min_cosine <= 1.0):
            raise SettingsError(f"--min-cosine must be between -1 and 1, got {self.min_cosine}")
        if self.max_drop is not None and not (0.0 <= self.max_drop <= 100.0):
            raise SettingsError(f"--max-drop must be between 0 and 100 percentage points, got {self.max_drop}")

    def met(self, metrics: OutputMetrics, baseline_accuracy: float | None) -> bool:
        """True when ``metrics`` satisfy every part of the budget."""
        if self.min_cosine is not None and not metrics.cosine >= self.min_cosine:
            return False
        if self.max_drop is not None:
            if metrics.accuracy is None or baseline_accuracy is None:
                return False
            if 100.0 * (baseline_accuracy - metrics.accuracy) > self.max_drop + 1e-9:
                return False
        if self.min_metric is not None and not (metrics.task_metric is not None and metrics.task_metric >= self.min_metric):
            return False
        return True

    def describe(self) -> str:
        """E.g. ``cosine >= 0.999`` or ``top-1 drop <= 0.5 pp``."""
        parts = []
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        if self.max_drop is not None:
            parts.append(f"top-1 drop <= {self.max_drop:g} pp")
        if self.min_metric is not None:
            parts.append(f"task metric >= {self.min_metric:g}")
        return " and ".join(parts)


def _describe_metrics(metrics: OutputMetrics, baseline: float | None) -> str:
    text = f"cosine {metrics.cosine:.6f}, relative output error {metrics.relative_error:.3g}"
    if metrics.accuracy is not None and baseline is not None:
        text += f", top-1 {100 * metrics.accuracy:.2f} % (drop {100 * (baseline - metrics.accuracy):.2f} pp)"
    if metrics.task_metric is not None:
        text += f", task metric {metrics.task_metric:.6g}"
    return text


def drop_standard_error(metrics: OutputMetrics, baseline: float, n_samples: int) -> float:
    """Standard error, in percentage points, of a top-1 drop measured on ``n_samples`` paired samples.

    The drop ``d = (broken - fixed) / n`` counts the samples whose prediction
    became wrong minus those that became right; its variance is
    ``((broken + fixed) / n - d^2) / n``. ``(broken + fixed) / n`` is
    ``metrics.discordant`` when the metrics were computed with labels; otherwise
    it is bounded by the fraction of changed predictions, ``1 - agreement``
    (on the large side when some predictions change from one wrong class to another).
    """
    if n_samples < 1 or metrics.accuracy is None:
        return 0.0
    drop = baseline - metrics.accuracy
    if metrics.discordant is not None:
        changed = metrics.discordant
    else:
        changed = 1.0 - metrics.agreement if metrics.agreement is not None else abs(drop)
    variance = max(0.0, changed - drop * drop) / n_samples
    return 100.0 * math.sqrt(variance)


def _robust_choice(
    measured: Sequence[OutputMetrics],
    budget: Budget,
    baseline: float | None,
    *,
    n_samples: int = 0,
    drop_margin_se: float = 0.0,
) -> int:
    """The most compressed path index whose smoothed measurements, and own measurement, meet the budget.

    The budget's losses (``1 - cosine``; top-1 drop) measured along the path are
    noisy (a few hundred samples decide a drop of 0.1 pp), while their trend is
    increasing. Each loss is fitted by a non-decreasing sequence (isotonic
    regression, pool-adjacent-violators); a configuration qualifies when the
    fitted losses and its own measurement meet the budget. This keeps a single
    lucky measurement far along the path from being chosen. With
    ``drop_margin_se`` > 0 a configuration's drops (fitted and own) must stay
    below ``max_drop`` minus that many of its standard errors
    (:func:`drop_standard_error` on ``n_samples``).
    """
    losses: list[tuple[list[float], list[float]]] = []
    if budget.min_cosine is not None:
        losses.append(([1.0 - m.cosine for m in measured], [1.0 - budget.min_cosine] * len(measured)))
    if budget.max_drop is not None and baseline is not None:
        drops = [100.0 * (baseline - (m.accuracy or 0.0)) for m in measured]
        margins = [drop_margin_se * drop_standard_error(m, baseline, n_samples) for m in measured]
        limits = [budget.max_drop - margin for margin in margins]
        losses.append((drops, limits))
    if budget.min_metric is not None:  # a score, higher is better: its negative is the loss
        scores = [-(m.task_metric if m.task_metric is not None else -math.inf) for m in measured]
        losses.append((scores, [-budget.min_metric] * len(measured)))
    fitted = [(_isotonic(values), values, limits) for values, limits in losses]
    best = 0
    for i, m in enumerate(measured):
        if budget.met(m, baseline) and all(
            f[i] <= limits[i] + 1e-12 and own[i] <= limits[i] + 1e-12 for f, own, limits in fitted
        ):
            best = i
    return best


def _isotonic(values: Sequence[float]) -> list[float]:
    """Least-squares non-decreasing fit of ``values`` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    fitted: list[float] = []
    for total, count in blocks:
        fitted.extend([total / count] * int(count))
    return fitted


def _step_forward(
    measure: Callable[[int], OutputMetrics],
    start: int,
    last: int,
    budget: Budget,
    baseline: float | None,
    *,
    n_samples: int = 0,
    drop_margin_se: float = 0.0,
) -> int:
    """The configuration to keep after compressing for real the ones after ``start`` (which met the budget).

    Configurations ``start + 1 .. last`` are measured in order (``measure(i)``:
    the real model's metrics) until one misses the budget by its own
    measurement (with the ``drop_margin_se`` margin); the walk stops there, so a
    lucky measurement behind a failure is never reached. Among the measured ones
    the choice follows :func:`_robust_choice` (isotonic smoothing of the
    measurements in walk order, the same margin), so a configuration is kept
    only when the smoothed losses up to it also meet the budget. Returns
    ``start`` when nothing after it qualifies.
    """
    indices = [start]
    measured = [measure(start)]
    for i in range(start + 1, last + 1):
        metrics = measure(i)
        indices.append(i)
        measured.append(metrics)
        if not _meets_with_margin(metrics, budget, baseline, n_samples, drop_margin_se):
            break
    return indices[_robust_choice(measured, budget, baseline, n_samples=n_samples, drop_margin_se=drop_margin_se)]


def _meets_with_margin(
    metrics: OutputMetrics, budget: Budget, baseline: float | None, n_samples: int, drop_margin_se: float
) -> bool:
    """``budget.met`` and, with ``max_drop``, a drop at most ``max_drop - drop_margin_se * se``."""
    if not budget.met(metrics, baseline):
        return False
    if budget.max_drop is None or baseline is None or metrics.accuracy is None:
        return True
    drop = 100.0 * (baseline - metrics.accuracy)
    return drop <= budget.max_drop - drop_margin_se * drop_standard_error(metrics, baseline, n_samples) + 1e-12


def _step_back(passes: Callable[[int], bool], failed: int, linear_steps: int = STEP_BACK_LINEAR) -> int:
    """The configuration to fall back to when ``failed`` missed the budget once compressed for real.

    The real (sequential) compressions measure a little differently from the
    assembled ones, and noisily, so passing is not monotone along the path: the
    ``linear_steps`` configurations just before ``failed`` are tried first, one
    by one (a binary search over the whole path would jump to its middle on one
    noisy failure). Then 0, then a binary search below the tried ones. Returns 0
    when even 0 fails.
    """
    lowest = max(0, failed - linear_steps)
    for i in range(failed - 1, lowest - 1, -1):
        if passes(i):
            return i
    if lowest == 0 or not passes(0):
        return 0
    return _last_passing(passes, 0, lowest - 1)


def _last_passing(passes: Callable[[int], bool], low: int, high: int) -> int:
    """Largest ``i`` in ``[low, high]`` with ``passes(i)``, given ``passes(low)`` (binary search, monotone assumed)."""
    while low < high:
        mid = (low + high + 1) // 2
        if passes(mid):
            low = mid
        else:
            high = mid - 1
    return low
