"""The transformer side of the automatic search (:func:`onnx_dc.calibration.search.autotune`).

A transformer (:mod:`onnx_dc.graph.transformers`) is searched on its own grid,
from no pruning at 8 bits down, with its model runs counted rather than timed:
one measured candidate per layer, a fixed number of path checks, then a
bisection of the gap after the chosen configuration (:func:`bisect_gap`); the
path is chosen within a share of the allowed cosine loss (:func:`within_margin`),
and its embedding tables, which have no input statistics, are searched at every
bit width by one model run each (:func:`embedding_tables`,
:func:`table_candidates`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np
import onnx

from onnx_dc.calibration.budget import Budget
from onnx_dc.calibration.metrics import OutputMetrics, compare_outputs
from onnx_dc.calibration.model_fit import initializer_array, plain_tensor
from onnx_dc.calibration.options import CalibrationOptions, LayerSettings
from onnx_dc.calibration.search_path import Candidate
from onnx_dc.calibration.weight_swap import WeightSwapRunner

__all__ = [
    "TRANSFORMER_BITS",
    "TRANSFORMER_COSINE_LOSS_SHARE",
    "TRANSFORMER_GAP_CHECKS",
    "TRANSFORMER_MEASURED_PER_LAYER",
    "TRANSFORMER_PATH_CHECKS",
    "TRANSFORMER_SEARCH_SPARSITIES",
    "TRANSFORMER_TABLE_MIN_ELEMENTS",
    "TRANSFORMER_CALIB_REFIT_ROUNDS",
    "bisect_gap",
    "calib_fit_options",
    "cheap_fit_options",
    "embedding_tables",
    "table_candidates",
    "within_margin",
]

# Transformers (onnx_dc.graph.transformers): weights with outliers that take little pruning, budgets
# near lossless. The grid reaches from no pruning at 8 bits (cosine 0.9997 on all-MiniLM-L6-v2) down.
TRANSFORMER_SEARCH_SPARSITIES: tuple[float, ...] = (0.0, 0.25, 0.5)
TRANSFORMER_BITS: tuple[int, ...] = (4, 5, 6, 7, 8)
# Transformer searches count their model runs instead of timing them (reproducible, bounded):
TRANSFORMER_MEASURED_PER_LAYER = 1  # candidates per layer whose model-level effect is measured
TRANSFORMER_PATH_CHECKS = 24  # assembled configurations of the path run on the search data
TRANSFORMER_GAP_CHECKS = 4  # then bisection runs between the chosen one and the next checked one
# A transformer's search data are a few dozen sequences: the path is chosen within this share of the allowed
# cosine loss (1 - min_cosine), so that the budget holds on other inputs too (MiniLM, 19 held-out sentences:
# a configuration at cosine 0.99903 there measured 0.99899 on 50 evaluation sentences).
TRANSFORMER_COSINE_LOSS_SHARE = 0.8
# A transformer's embedding tables (Gather data, no statistics) of at least this many weights are searched too:
# unpruned at every bit width of the grid, each measured by one model run.
TRANSFORMER_TABLE_MIN_ELEMENTS = 4096


def within_margin(budget: Budget) -> Budget:
    """``budget`` with its cosine loss limit scaled by :data:`TRANSFORMER_COSINE_LOSS_SHARE` (the path's choice)."""
    if budget.min_cosine is None:
        return budget
    return replace(budget, min_cosine=1.0 - TRANSFORMER_COSINE_LOSS_SHARE * (1.0 - budget.min_cosine))


def bisect_gap(
    full_path: list[dict[str, Candidate]], path: list[dict[str, Candidate]], checked: list[OutputMetrics], best: int,
    measure: Callable[[dict[str, Candidate]], OutputMetrics], meets: Callable[[OutputMetrics], bool],
) -> int:
    """Bisect the unchecked configurations of ``full_path`` between the thinned ``path``'s ``best`` and ``best + 1``
    (at most :data:`TRANSFORMER_GAP_CHECKS` runs); the most compressed one found meeting the budget is inserted
    into ``path`` and ``checked`` (in place) after ``best``. Returns the index chosen."""
    position = {id(config): i for i, config in enumerate(full_path)}
    low, high = position[id(path[best])], position[id(path[best + 1])]
    found: tuple[dict[str, Candidate], OutputMetrics] | None = None
    for _ in range(TRANSFORMER_GAP_CHECKS):
        if high - low < 2:
            break
        middle = (low + high) // 2
        metrics = measure(full_path[middle])
        if meets(metrics):
            low, found = middle, (full_path[middle], metrics)
        else:
            high = middle
    if found is None:
        return best
    path.insert(best + 1, found[0])
    checked.insert(best + 1, found[1])
    return best + 1


def embedding_tables(model: onnx.ModelProto, fixed: Mapping[str, LayerSettings]) -> list[str]:
    """The unsearched weights that are embedding tables: main-graph initializers read as a ``Gather``'s data,
    with at least :data:`TRANSFORMER_TABLE_MIN_ELEMENTS` weights."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input}
    return [name for name in fixed if name in gathered and sizes.get(name, 0) >= TRANSFORMER_TABLE_MIN_ELEMENTS]


def table_candidates(
    model: onnx.ModelProto, name: str, settings: LayerSettings, bits: Sequence[int], seed: int,
    runner: WeightSwapRunner, reference: Mapping[str, np.ndarray],
) -> list[Candidate]:
    """An embedding table unpruned at every bit width, by the plain recipe, each run through the model."""
    weight = initializer_array(model, name)
    found = []
    for b in bits:
        tensor = plain_tensor(weight, LayerSettings(sparsity=0.0, bits=int(b), index_bits=None, init=settings.init, seed=seed))
        error = compare_outputs(reference, runner.run({name: tensor.quantized})).relative_error
        found.append(Candidate(0.0, int(b), tensor.size_bytes, error, error, tensor.quantized, None, tensor.settings.index_bits))
    return found


def cheap_fit_options(options: CalibrationOptions) -> CalibrationOptions:
    """The recipe a transformer's search fits its candidates and final model with: activation-aware pruning
    and plain k-means on the original model's statistics, with the bias correction; no least-squares refits,
    no sequential captures (which take an hour for a 22 M-parameter encoder on two cores)."""
    criterion = "activation" if options.criterion in ("auto", "obs") else options.criterion
    return replace(options, criterion=criterion, refit_weights=False, refit_rounds=0, sequential=False)


TRANSFORMER_CALIB_REFIT_ROUNDS = 2
"""Centroid refit rounds of a transformer's ``--calib`` alone: on all-MiniLM-L6-v2 at the transformer
defaults (96 calibration sentences, 200 held-out ones) embedding cosine 0.9943 and neighbour agreement
90.5 % against 0.9805 / 86.0 % with plain k-means and 0.988 / 87.0 % data-free, in 2.5 CPU minutes
(``python benchmarks/transformer_settings.py search``)."""


def calib_fit_options(options: CalibrationOptions) -> CalibrationOptions:
    """The recipe of a transformer's ``--calib`` without a budget (and default options): :func:`cheap_fit_options`
    with :data:`TRANSFORMER_CALIB_REFIT_ROUNDS` rounds of centroid refit and re-assignment."""
    return replace(cheap_fit_options(options), refit_rounds=TRANSFORMER_CALIB_REFIT_ROUNDS)
