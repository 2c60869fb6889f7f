"""Per-layer candidates and the allocation path through them.

Each layer's candidates (one per grid setting: exact size, measured or
predicted output error) are reduced to their lower convex hull of (size,
error); :func:`_allocation_path` starts from every layer at its most accurate
candidate and repeatedly takes the step, over all layers, that saves the most
bytes per unit of added error (the Lagrangian allocation), giving
configurations of decreasing size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Candidate",
]

# Large models (more than MANY_LAYERS searched layers): the candidates are fitted with a cheap
# recipe (activation-aware pruning without the weight refit, plain k-means). Their errors are
# upper bounds of what the full recipe gives; the chosen configuration gets the full recipe once.
# (Full-recipe fits of every grid point took hours on the 64-layer YOLOv8n: the OBS paths and the
# per-column refits of layers with 1152-2304 inputs cost 10-30 s per sparsity.)
# Model-level effects: all candidates are run on the search data while that takes at most
# MEASURE_ALL_SECONDS; otherwise MEASURED_PER_LAYER_BUDGET_SECONDS bounds the runs per layer
# (1 to MAX_MEASURED_PER_LAYER, spread over the layer errors) and the others are predicted.
MEASURE_ALL_SECONDS = 120.0
MEASURED_PER_LAYER_BUDGET_SECONDS = 150.0
MAX_MEASURED_PER_LAYER = 3
# The assembled configurations of the path checked against the budget: all of them while that takes
# at most PATH_CHECK_SECONDS, otherwise this many spread evenly in log(size) (at least MIN_PATH_CHECKS).
PATH_CHECK_SECONDS = 120.0
MIN_PATH_CHECKS = 24


@dataclass
class Candidate:
    """One layer at one (sparsity, bits) setting, fitted on the original statistics."""

    sparsity: float
    bits: int
    size_bytes: int
    output_error: float  # relative output error of the model with only this layer compressed
    layer_error: float
    weight: np.ndarray
    bias: np.ndarray | None
    index_bits: int


def _hull(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates on the lower convex hull of (size, error), from the largest (most accurate) to the smallest."""
    # Pareto front: increasing error, strictly decreasing size.
    front: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.output_error, c.size_bytes)):
        if not front or c.size_bytes < front[-1].size_bytes:
            front.append(c)
    # Lower convex hull: the added error per saved byte must increase along it.
    hull: list[Candidate] = []
    for c in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            s_ab = (b.output_error - a.output_error) / max(1, a.size_bytes - b.size_bytes)
            s_ac = (c.output_error - a.output_error) / max(1, a.size_bytes - c.size_bytes)
            if s_ac <= s_ab:
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def _allocation_path(hulls: Mapping[str, list[Candidate]]) -> list[dict[str, Candidate]]:
    """Configurations from every layer at its most accurate hull point, one cheapest step at a time."""
    steps = []
    for name, hull in hulls.items():
        for i in range(1, len(hull)):
            a, b = hull[i - 1], hull[i]
            slope = (b.output_error - a.output_error) / max(1, a.size_bytes - b.size_bytes)
            steps.append((slope, name, i))
    steps.sort(key=lambda t: (t[0], t[1], t[2]))
    current = {name: hull[0] for name, hull in hulls.items()}
    path = [dict(current)]
    for _, name, i in steps:
        current[name] = hulls[name][i]
        path.append(dict(current))
    return path


def _runs_per_layer(run_seconds: float, n_layers: int, grid_points: int) -> int | None:
    """Candidates per layer run on the search data: None (all) when affordable, else 1..MAX_MEASURED_PER_LAYER."""
    if run_seconds * n_layers * grid_points <= MEASURE_ALL_SECONDS:
        return None
    affordable = int(MEASURED_PER_LAYER_BUDGET_SECONDS / max(run_seconds * n_layers, 1e-9))
    return max(1, min(MAX_MEASURED_PER_LAYER, grid_points, affordable))


def _measured_indices(layer_errors: Sequence[float], per_layer: int | None) -> list[int]:
    """Which candidates to run: all, or ``per_layer`` spread over the sorted positive layer errors."""
    if per_layer is None:
        return list(range(len(layer_errors)))
    positive = sorted((e, i) for i, e in enumerate(layer_errors) if e > 0)
    if not positive:
        return []
    chosen = {positive[min(len(positive) - 1, int((q + 0.5) * len(positive) / per_layer))][1] for q in range(per_layer)}
    return sorted(chosen)


def _predict_output_errors(found: Sequence[Candidate], measured: Sequence[int]) -> None:
    """Fill in the output errors of the candidates not run, from their layer errors.

    Small weight perturbations change the output energy in proportion to the
    layer's own output error, so the ratio output error / layer error is
    interpolated in log(layer error) between the measured candidates (constant
    beyond them; 1 when nothing was measured). A layer error of 0 predicts 0.
    """
    points = sorted(
        (math.log(found[i].layer_error), math.log(max(found[i].output_error, 1e-30) / found[i].layer_error))
        for i in measured
        if found[i].layer_error > 0
    )
    for i, c in enumerate(found):
        if i in measured:
            continue
        if c.layer_error <= 0:
            c.output_error = 0.0
        elif not points:
            c.output_error = c.layer_error
        else:
            xs, ys = zip(*points)
            c.output_error = c.layer_error * math.exp(float(np.interp(math.log(c.layer_error), xs, ys)))


def _max_path_checks(run_seconds: float) -> int:
    """How many path configurations are assembled and run on the search data."""
    return max(MIN_PATH_CHECKS, int(PATH_CHECK_SECONDS / max(run_seconds, 1e-9)))


def _thin_path(path: list[dict[str, Candidate]], max_checks: int) -> list[dict[str, Candidate]]:
    """At most ``max_checks`` configurations of ``path``, first and last kept, spread evenly in log(total size)."""
    if len(path) <= max_checks:
        return path
    sizes = np.array([float(sum(c.size_bytes for c in config.values())) for config in path])
    logs = np.log(np.maximum(sizes, 1.0))
    targets = np.linspace(logs[0], logs[-1], max_checks)
    keep = {0, len(path) - 1}
    for t in targets[1:-1]:
        keep.add(int(np.argmin(np.abs(logs - t))))
    return [path[i] for i in sorted(keep)]
