"""Searched weights without an input Gram matrix: candidates ranked by the whole model's output error.

Layers of :func:`onnx_dc.calibration.layers.find_layers` (MatMul/Gemm/Conv
weights used once) are fitted to their captured input statistics. Other
weights that the calibration data reach still take part in the automatic
search through a proxy: recurrent weights (LSTM/GRU/RNN ``W`` and ``R``, also
when they reach the cell through Slice/Concat gate reordering), ``ConvTranspose``
kernels, embedding tables read by ``Gather``, weights shared by several nodes
and weights read inside ``Loop``/``Scan`` bodies. Each grid point is compressed
the plain way (magnitude pruning, k-means; :func:`onnx_dc.calibration.model_fit.plain_tensor`,
exactly what the final compression writes for it), its size is exact, and its
effect is the model's relative output error on the search data with only that
weight replaced - the same measurement the fitted layers' candidates get, so
both kinds share one allocation path. Where not every candidate is run, the
others are predicted from their relative weight error ``||W_q - W||^2 / ||W||^2``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_dc.calibration.layers import LayerSpec, _all_nodes, _outer_names
from onnx_dc.calibration.metrics import compare_outputs
from onnx_dc.calibration.model_fit import initializer_array, plain_tensor
from onnx_dc.calibration.options import LayerSettings
from onnx_dc.calibration.search_path import Candidate, _measured_indices, _predict_output_errors
from onnx_dc.calibration.weight_swap import WeightSwapRunner
from onnx_dc.graph.model_io import attribute_subgraphs

__all__ = ["ProxyWeight", "find_proxy_weights", "proxy_candidates"]

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
_PASS_THROUGH = {"Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Identity", "Cast", "Split"}
_RECURRENT = {"LSTM", "GRU", "RNN"}
_CONV_LIKE = {"Conv", "ConvTranspose", "ConvInteger"}


@dataclass(frozen=True)
class ProxyWeight:
    """A searched weight whose candidates are ranked by the model's output error (module docstring).

    Attributes:
        weight: the main-graph initializer's name (in the calibration view).
        op: the operator the weight feeds (``LSTM``, ``ConvTranspose``, ``Gather``...).
        weight_shape: its shape.
        reason: why it has no input statistics of its own.
        bias: always None (a proxy weight has no refitted bias); present so that the search
            treats proxies and fitted layers alike.
    """

    weight: str
    op: str
    weight_shape: tuple[int, ...]
    reason: str
    bias: None = None

    @property
    def is_convolution(self) -> bool:
        """Whether the convolution bit-width grid applies."""
        return self.op in _CONV_LIKE


def find_proxy_weights(
    model: onnx.ModelProto, layers: Sequence[LayerSpec], names: Collection[str]
) -> list[ProxyWeight]:
    """The weights among ``names`` that get the output-error proxy: main-graph float initializers of
    rank >= 2 that are not a fitted layer's weight or bias and that some node reads. In graph order
    of their first use."""
    fitted = {layer.weight for layer in layers} | {layer.bias for layer in layers if layer.bias}
    initializers = {t.name: t for t in model.graph.initializer}
    wanted = [
        n for n in names
        if n not in fitted and n in initializers and initializers[n].data_type in _FLOAT_TYPES
        and len(initializers[n].dims) >= 2
    ]
    if not wanted:
        return []
    main_consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            main_consumers.setdefault(name, []).append(node)
    in_bodies: dict[str, str] = {}
    for node in model.graph.node:
        for attr in node.attribute:
            for sub in attribute_subgraphs(attr):
                for name in _outer_names(sub):
                    in_bodies.setdefault(name, node.op_type)
    found = []
    for name in wanted:
        users = main_consumers.get(name, [])
        if not users and name not in in_bodies:
            continue
        op, reason = _describe(name, users, in_bodies.get(name), main_consumers)
        found.append(ProxyWeight(name, op, tuple(int(d) for d in initializers[name].dims), reason))
    order = {}
    for index, node in enumerate(_all_nodes(model.graph)):
        for name in node.input:
            order.setdefault(name, index)
    return sorted(found, key=lambda p: order.get(p.weight, len(order)))


def _describe(
    name: str, users: Sequence[onnx.NodeProto], body: str | None, consumers: Mapping[str, list[onnx.NodeProto]]
) -> tuple[str, str]:
    """``(operator fed, why no statistics)`` for one proxy weight."""
    if body is not None:
        return body, f"read inside a {body} body (no activation of a subgraph can be captured)"
    if users and all(u.op_type == "Gather" and u.input[0] == name for u in users):
        return "Gather", "embedding table read by Gather (rows selected, no input rows to fit)"
    reached = _reached_ops(name, consumers)
    recurrent = sorted(reached & _RECURRENT)
    if recurrent:
        return recurrent[0], f"{recurrent[0]} weight (W/R): its inputs are the cell's own states, not capturable rows"
    if "ConvTranspose" in reached:
        return "ConvTranspose", "ConvTranspose kernel (no transposed im2col statistics)"
    if len(users) > 1:
        ops = sorted({u.op_type for u in users})
        return ops[0], f"shared by {len(users)} nodes ({', '.join(ops)})"
    op = users[0].op_type if users else "?"
    return op, f"read by {op} (not a MatMul/Gemm/Conv weight with capturable input)"


def _reached_ops(name: str, consumers: Mapping[str, list[onnx.NodeProto]], depth: int = 6) -> set[str]:
    """Operators reached from ``name`` through shape/copy operators (gate reordering of recurrent weights)."""
    ops: set[str] = set()
    frontier = [name]
    for _ in range(depth):
        following = []
        for value in frontier:
            for node in consumers.get(value, []):
                ops.add(node.op_type)
                if node.op_type in _PASS_THROUGH:
                    following.extend(o for o in node.output if o)
        frontier = following
        if not frontier:
            break
    return ops


def proxy_candidates(
    model: onnx.ModelProto,
    proxy: ProxyWeight,
    sparsities: Sequence[float],
    grid_bits: Sequence[int],
    seed: int,
    runner: WeightSwapRunner,
    reference: Mapping[str, np.ndarray],
    per_layer: int | None,
) -> tuple[list[Candidate], int]:
    """Every grid point of one proxy weight compressed the plain way, with its exact size and the model's
    output error (measured for all, or for ``per_layer`` of them and predicted for the others).

    Returns the candidates and how many were measured.
    """
    weight = initializer_array(model, proxy.weight)
    original = np.asarray(weight, dtype=np.float64)
    energy = float(np.sum(original * original)) or 1.0
    found: list[Candidate] = []
    for s in sparsities:
        for b in grid_bits:
            tensor = plain_tensor(weight, LayerSettings(sparsity=float(s), bits=int(b), index_bits=None, seed=seed))
            quantized = np.asarray(tensor.quantized, dtype=np.float64).reshape(original.shape)
            weight_error = float(np.sum((quantized - original) ** 2)) / energy
            found.append(
                Candidate(
                    float(s), int(b), tensor.size_bytes, math.nan, weight_error, tensor.quantized, None,
                    tensor.settings.index_bits,
                )
            )
    measured = _measured_indices([c.layer_error for c in found], per_layer)
    for i in measured:
        found[i].output_error = compare_outputs(reference, runner.run({proxy.weight: found[i].weight})).relative_error
    _predict_output_errors(found, measured)
    return found, len(measured)
