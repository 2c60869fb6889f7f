"""What each layer's fit aims at: the target weight, its statistics, the downstream weights.

:func:`layer_target` builds a layer's :class:`LayerTarget` from its captured
statistics: the weight ``T`` the output should match (in sequential mode the
weight that best reproduces the original output from the compressed inputs),
the Gram matrix (centred when the bias is refitted with the weights) and, with
downstream weighting, a weight per output column for how much an error there
reaches the next fitted layer (:func:`downstream_column_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_dc.calibration.capture import LayerStatistics
from onnx_dc.calibration.layer_problem import DEFAULT_DAMPING, LayerProblem
from onnx_dc.calibration.layers import LayerSpec, find_layers
from onnx_dc.calibration.options import CalibrationOptions
from onnx_dc.graph.model_io import initializer_array

__all__ = [
    "LayerTarget",
    "build_target",
    "downstream_column_weights",
    "layer_target",
]



@dataclass
class LayerTarget:
    """A layer's :class:`~onnx_dc.calibration.layer_problem.LayerProblem` and how its bias follows the fitted weights."""

    layer: LayerSpec
    problem: LayerProblem
    bias_target: list[np.ndarray] | None = None  # effective (scaled) bias per block
    input_mean: list[np.ndarray] | None = None  # mean input per block

    def corrected_bias(self, blocks: Sequence[np.ndarray]) -> np.ndarray | None:
        """The stored bias (divided by the bias scale) that goes with the fitted ``blocks``; None without bias."""
        if self.bias_target is None or self.input_mean is None:
            return None
        parts = [
            b - mean @ (w - t)
            for b, mean, w, t in zip(self.bias_target, self.input_mean, blocks, self.problem.targets)
        ]
        return np.concatenate(parts) / self.layer.bias_scale


def build_target(
    layer: LayerSpec,
    stats: LayerStatistics,
    weight: np.ndarray,
    bias: np.ndarray | None,
    *,
    damping: float = DEFAULT_DAMPING,
    bias_correction: bool = True,
    column_weights: Sequence[np.ndarray] | None = None,
) -> LayerTarget:
    """The reconstruction problem of one layer from its statistics (see the module docstring).

    ``bias`` is the stored bias (``None`` when the layer has none or it must
    not change). Sequential statistics (with cross terms) give the corrected
    target; plain ones the original weight. ``column_weights`` (one array per
    block, e.g. from :func:`downstream_column_weights`) weight the output columns
    of the objective.
    """
    blocks = layer.to_blocks(weight)
    use_bias = bias is not None and bias_correction and layer.bias_scale != 0
    bias_blocks = layer.bias_to_blocks(bias) if use_bias else None
    grams, targets, bias_targets, means = [], [], [], []
    for g, w in enumerate(blocks):
        k = w.shape[0]
        gram_aug = stats.gram[g]
        n = gram_aug[k, k]
        if stats.cross is not None:
            target_aug = _sequential_target(gram_aug, stats.cross[g], w, bias_blocks[g] if use_bias else None, damping)
        else:
            target_aug = np.vstack([w, bias_blocks[g][None, :]]) if use_bias else w
        if use_bias and n > 0:
            s = gram_aug[k, :k]
            grams.append(gram_aug[:k, :k] - np.outer(s, s) / n)
            means.append(s / n)
            targets.append(target_aug[:k])
            bias_targets.append(target_aug[k])
        else:
            grams.append(gram_aug[:k, :k])
            targets.append(target_aug[:k])
            if use_bias:
                means.append(np.zeros(k))
                bias_targets.append(target_aug[k])
    problem = LayerProblem(grams, targets, damping=damping, column_weights=column_weights)
    if use_bias:
        return LayerTarget(layer, problem, bias_targets, means)
    return LayerTarget(layer, problem)


def _sequential_target(
    gram_aug: np.ndarray, cross_aug: np.ndarray, w: np.ndarray, b: np.ndarray | None, damping: float
) -> np.ndarray:
    """``argmin ||A~ T - A W||^2 + lambda ||T - W||^2`` with ``A = [X, 1]`` (bias row free when given)."""
    k = w.shape[0]
    if b is None:
        gram, cross, theta0 = gram_aug[:k, :k], cross_aug[:k, :k], w
    else:
        gram, cross, theta0 = gram_aug, cross_aug, np.vstack([w, b[None, :]])
    diag = np.diag(gram_aug)[:k]
    mean_diag = float(np.mean(diag)) if k else 0.0
    lam = damping * mean_diag if mean_diag > 0 else 1.0
    ridge = np.full(gram.shape[0], lam)
    if b is not None:
        ridge[k] = 0.0  # the bias is not pulled towards its old value
    system = gram + np.diag(ridge)
    rhs = cross @ theta0 + ridge[:, None] * theta0
    try:
        return np.linalg.solve(system, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(system, rhs, rcond=None)[0]


def layer_target(
    model: onnx.ModelProto,
    layer: LayerSpec,
    stats: LayerStatistics,
    weight: np.ndarray,
    bias: np.ndarray | None,
    options: CalibrationOptions,
    *,
    layers: Sequence[LayerSpec] | None = None,
) -> LayerTarget:
    """:func:`build_target` with the damping and bias correction of ``options`` and, when
    ``options.downstream_weighting`` is on, the column weights of :func:`downstream_column_weights`
    (``layers``: the model's layers, found again when not given)."""
    column_weights = (
        downstream_column_weights(model, layer, stats, weight, bias, layers=layers)
        if options.downstream_weighting else None
    )
    return build_target(
        layer, stats, weight, bias, damping=options.damping, bias_correction=options.bias_correction,
        column_weights=column_weights,
    )


# ---------------------------------------------------------------------------
# Downstream weighting

_DOWNSTREAM_FLOOR = 0.01  # smallest column weight, relative to the mean (units silent on the calibration data)


def downstream_column_weights(
    model: onnx.ModelProto,
    layer: LayerSpec,
    stats: LayerStatistics,
    weight: np.ndarray,
    bias: np.ndarray | None,
    *,
    layers: Sequence[LayerSpec] | None = None,
) -> list[np.ndarray] | None:
    """How much an error in each output column of ``layer`` reaches the next compressed layer's output.

    When the layer's output (after its own bias) feeds exactly one other layer
    with statistics, directly or through ``Relu`` / ``Identity`` nodes, and
    nothing else, an error ``e_n`` in output ``n`` changes that layer's output by
    ``e_n g_n V[n, :]`` (``V`` the next layer's original weight as ``[K, M]``,
    ``g_n`` the Relu gate). Its expected energy is ``P(y_n > 0) ||V[n, :]||^2 E[e_n^2]``,
    with ``P(y_n > 0)`` from the normal law with the mean and variance of the
    pre-activation ``y_n`` computed from ``stats`` (1 without Relu). For a
    convolution feeding a convolution (both ungrouped) ``||V[n, :]||^2`` sums over
    the next kernel's offsets of input channel ``n``. The weights are scaled to
    mean 1 (floored at 1 % of it) and returned one array per block, or None
    (plain objective) for any other graph: several consumers, a graph output,
    other operators in between, grouped convolutions, or mismatched shapes.
    """
    layers = find_layers(model) if layers is None else list(layers)
    found = _next_layer(model, layer, layers)
    if found is None:
        return None
    following, gated = found
    if layer.groups != 1 or following.groups != 1:
        return None
    if layer.op == "Conv":
        if following.op != "Conv" or following.weight_shape[1] != layer.weight_shape[0]:
            return None
        kernel = np.asarray(initializer_array(model, following.weight), dtype=np.float64)
        energy = np.sum(kernel * kernel, axis=tuple(i for i in range(kernel.ndim) if i != 1))
    else:
        if following.op == "Conv" or following.n_inputs != layer.n_outputs:
            return None
        (rows,) = following.to_blocks(initializer_array(model, following.weight))
        energy = np.sum(rows * rows, axis=1)
    if gated:
        energy = energy * _relu_pass_probability(layer, stats, weight, bias)
    mean = float(np.mean(energy)) if energy.size else 0.0
    if not (np.all(np.isfinite(energy)) and mean > 0):
        return None
    energy = np.maximum(energy / mean, _DOWNSTREAM_FLOOR)
    return [energy / float(np.mean(energy))]


def _next_layer(model: onnx.ModelProto, layer: LayerSpec, layers: Sequence[LayerSpec]) -> tuple[LayerSpec, bool] | None:
    """The single layer ``layer``'s output reaches through Relu/Identity, and whether a Relu is on the way."""
    graph = model.graph
    nodes = list(graph.node)
    labels = [node.name or f"{node.op_type}#{i}" for i, node in enumerate(nodes)]
    if layer.node_name not in labels:
        return None
    node = nodes[labels.index(layer.node_name)]
    if not node.output:
        return None
    consumers: dict[str, list[int]] = {}
    for i, other in enumerate(nodes):
        for name in set(other.input):
            consumers.setdefault(name, []).append(i)
    outputs = {o.name for o in graph.output}
    by_node = {spec.node_name: spec for spec in layers}
    value = node.output[0]
    if layer.op == "MatMul" and layer.bias is not None:
        # The bias is the constant of the Add right after the MatMul.
        users = consumers.get(value, [])
        if len(users) != 1 or value in outputs:
            return None
        add = nodes[users[0]]
        if add.op_type != "Add" or layer.bias not in add.input:
            return None
        value = add.output[0]
    gated = False
    for _ in range(len(nodes)):
        users = consumers.get(value, [])
        if value in outputs or len(users) != 1:
            return None
        user = nodes[users[0]]
        if user.domain not in ("", "ai.onnx"):
            return None
        spec = by_node.get(labels[users[0]])
        if spec is not None:
            return (spec, gated) if spec.activation == value and list(user.input).count(value) == 1 else None
        if user.op_type not in ("Relu", "Identity") or len(user.output) != 1:
            return None
        gated = gated or user.op_type == "Relu"
        value = user.output[0]
    return None


def _relu_pass_probability(layer: LayerSpec, stats: LayerStatistics, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``P(y_n > 0)`` per output column under a normal law with the pre-activation's mean and variance."""
    (w,) = layer.to_blocks(weight)
    gram_aug = stats.gram[0]
    k = w.shape[0]
    count = float(gram_aug[k, k])
    if count <= 0:
        return np.ones(w.shape[1])
    mean_x = gram_aug[k, :k] / count
    linear_mean = mean_x @ w
    second = np.sum(w * (gram_aug[:k, :k] @ w), axis=0) / count
    variance = np.maximum(second - linear_mean**2, 0.0)
    offset = np.zeros(w.shape[1])
    if bias is not None:
        (offset,) = layer.bias_to_blocks(np.asarray(bias, dtype=np.float64))
    mean = linear_mean + offset
    std = np.sqrt(variance)
    z = np.where(std > 0, mean / np.where(std > 0, std, 1.0), np.where(mean > 0, np.inf, -np.inf))
    return np.array([0.5 * math.erfc(-float(v) / math.sqrt(2.0)) for v in z])
