"""The layers whose inputs can be captured, and their input rows (im2col for convolutions).

:func:`find_layers` lists the weights whose input activation can be captured:
``MatMul`` (B), ``Gemm`` (B) and ``Conv`` (W) in the main graph, each weight
used by exactly one such node. Each layer is seen as ``Y = X W`` with ``X``
``[rows, K]`` and ``W`` ``[K, N]``: for ``MatMul`` rows are all leading
positions of A, for ``Gemm`` the rows of A (``A^T`` when ``transA``, times
``alpha``), for ``Conv`` the im2col patches (one row per output position and
image, one column per (input channel, kernel offset), honouring strides, pads,
``auto_pad``, dilations and groups; a grouped convolution is one block per
group, a depthwise convolution has ``K = kernel size``). Weights used elsewhere
(``ConvTranspose``, ``Gather`` embeddings, recurrent weights, subgraphs, shared
weights) have no statistics (:mod:`onnx_dc.calibration.proxies` searches them by
the model's output error; :mod:`onnx_dc.calibration.subgraphs` turns weights of
``If`` branches the data take into main-graph layers).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnx_dc.errors import CalibrationError
from onnx_dc.graph.model_io import attribute_subgraphs

__all__ = [
    "LayerSpec",
    "find_layers",
    "im2col",
]


_IM2COL_CHUNK_ELEMENTS = 1 << 22  # patches materialised at once (32 MiB of float64)


# ---------------------------------------------------------------------------
# Layers


@dataclass(frozen=True)
class LayerSpec:
    """A compressible weight whose input activation can be captured.

    The weight is viewed as ``groups`` blocks ``[K, N_g]`` (:meth:`to_blocks`).

    Attributes:
        weight: the weight's initializer name.
        op: ``MatMul``, ``Gemm`` or ``Conv``.
        node_name: the consuming node's name (or ``op#index``).
        activation: the name of the input activation (A or X).
        weight_shape: the stored weight's shape.
        groups: Conv groups (1 otherwise).
        trans_a, trans_b, alpha: Gemm attributes (defaults otherwise).
        conv: Conv attributes: kernel_shape, strides, pads (begin..., end...), dilations, auto_pad.
        bias: name of the bias initializer that adds to this layer's output per column
            (Gemm C, Conv B, or the constant of an ``Add`` right after a MatMul), or None.
        bias_scale: the factor the bias is multiplied by (Gemm ``beta``, else 1).
    """

    weight: str
    op: str
    node_name: str
    activation: str
    weight_shape: tuple[int, ...]
    groups: int = 1
    trans_a: bool = False
    trans_b: bool = False
    alpha: float = 1.0
    conv: Mapping[str, object] = field(default_factory=dict)
    bias: str | None = None
    bias_scale: float = 1.0

    @property
    def n_inputs(self) -> int:
        """``K``: inputs per block."""
        if self.op == "Conv":
            return int(np.prod(self.weight_shape[1:]))
        if self.op == "Gemm" and self.trans_b:
            return self.weight_shape[1]
        return self.weight_shape[0]

    @property
    def n_outputs(self) -> int:
        """Output columns over all blocks (output channels for Conv)."""
        if self.op == "Conv":
            return self.weight_shape[0]
        if self.op == "Gemm" and self.trans_b:
            return self.weight_shape[0]
        return self.weight_shape[1]

    @property
    def statistics_bytes(self) -> int:
        """Bytes of float64 Gram statistics (one ``K x K`` per group, plus cross terms in sequential mode)."""
        return 8 * self.groups * (self.n_inputs + 1) ** 2

    def to_blocks(self, weight: np.ndarray) -> list[np.ndarray]:
        """The stored weight as ``groups`` float64 blocks ``[K, N_g]`` (``Y_g = X_g W_g``)."""
        w = np.asarray(weight, dtype=np.float64)
        if self.op == "Conv":
            per_group = w.shape[0] // self.groups
            return [
                w[g * per_group : (g + 1) * per_group].reshape(per_group, -1).T.copy() for g in range(self.groups)
            ]
        if self.op == "Gemm" and self.trans_b:
            return [w.T.copy()]
        return [w.copy()]

    def from_blocks(self, blocks: Sequence[np.ndarray]) -> np.ndarray:
        """Inverse of :meth:`to_blocks` (float64, the stored weight's shape)."""
        if self.op == "Conv":
            per_group = self.weight_shape[0] // self.groups
            parts = [np.asarray(b).T.reshape((per_group, *self.weight_shape[1:])) for b in blocks]
            return np.concatenate(parts, axis=0)
        if self.op == "Gemm" and self.trans_b:
            return np.asarray(blocks[0]).T.copy()
        return np.asarray(blocks[0]).copy()

    def bias_to_blocks(self, bias: np.ndarray) -> list[np.ndarray]:
        """The effective per-column bias (``bias_scale * bias``) split per block."""
        b = self.bias_scale * np.asarray(bias, dtype=np.float64).reshape(-1)
        if b.size == 1 and self.n_outputs != 1:
            b = np.full(self.n_outputs, b[0])
        per_group = self.n_outputs // self.groups
        return [b[g * per_group : (g + 1) * per_group] for g in range(self.groups)]

    def rows(self, activation: np.ndarray) -> list[np.ndarray]:
        """The layer input as row matrices ``[rows, K]``, one per block (im2col for Conv)."""
        a = np.asarray(activation)
        if self.op == "Conv":
            return im2col(a, **self.conv, group=self.groups)  # type: ignore[arg-type]
        if self.op == "Gemm":
            a = a.reshape(a.shape[0], -1) if a.ndim != 2 else a
            if self.trans_a:
                a = a.T
            a = a.astype(np.float64)
            if self.alpha != 1.0:
                a = a * self.alpha
            return [a]
        k = self.n_inputs
        return [a.reshape(-1, k).astype(np.float64)]


def find_layers(model: onnx.ModelProto, names: Iterable[str] | None = None) -> list[LayerSpec]:
    """Every weight of the main graph whose input activation can be captured, in graph order.

    A weight qualifies when it is a float initializer used by exactly one node of
    the whole model, as ``MatMul`` B (2-D), ``Gemm`` B, or ``Conv`` W, with the
    activation input not itself a constant. ``names`` restricts the search.
    """
    graph = model.graph
    wanted = None if names is None else set(names)
    initializers = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in _all_nodes(graph):
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
        for attr in node.attribute:
            for sub in attribute_subgraphs(attr):
                for name in _outer_names(sub):
                    uses[name] = uses.get(name, 0) + 1
    for output in graph.output:
        uses[output.name] = uses.get(output.name, 0) + 1
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layers = []
    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        op = node.op_type
        if op not in ("MatMul", "Gemm", "Conv"):
            continue
        weight_name = node.input[1]
        tensor = initializers.get(weight_name)
        if tensor is None or tensor.data_type not in _FLOAT_TYPES or uses.get(weight_name, 0) != 1:
            continue
        if wanted is not None and weight_name not in wanted:
            continue
        if node.input[0] in initializers:
            continue
        shape = tuple(int(d) for d in tensor.dims)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        label = node.name or f"{op}#{index}"
        if op == "MatMul":
            if len(shape) != 2:
                continue
            bias, scale = _matmul_bias(node, consumers, initializers, uses, shape[1])
            layers.append(LayerSpec(weight_name, op, label, node.input[0], shape, bias=bias, bias_scale=scale))
        elif op == "Gemm":
            if len(shape) != 2:
                continue
            trans_b = bool(attrs.get("transB", 0))
            n_out = shape[0] if trans_b else shape[1]
            bias, beta = None, float(attrs.get("beta", 1.0))
            if len(node.input) > 2 and node.input[2]:
                c = initializers.get(node.input[2])
                if c is not None and uses.get(c.name, 0) == 1 and c.data_type in _FLOAT_TYPES and _is_row_bias(c, n_out):
                    bias = c.name
            layers.append(
                LayerSpec(
                    weight_name, op, label, node.input[0], shape,
                    trans_a=bool(attrs.get("transA", 0)), trans_b=trans_b, alpha=float(attrs.get("alpha", 1.0)),
                    bias=bias, bias_scale=beta,
                )
            )
        else:
            if len(shape) < 3:
                continue
            groups = int(attrs.get("group", 1))
            if groups < 1 or shape[0] % groups:
                continue
            n_spatial = len(shape) - 2
            kernel = tuple(int(k) for k in attrs.get("kernel_shape", shape[2:]))
            if kernel != shape[2:]:
                continue
            conv = {
                "kernel_shape": kernel,
                "strides": tuple(int(s) for s in attrs.get("strides", [1] * n_spatial)),
                "pads": tuple(int(p) for p in attrs.get("pads", [0] * (2 * n_spatial))),
                "dilations": tuple(int(d) for d in attrs.get("dilations", [1] * n_spatial)),
                "auto_pad": _text(attrs.get("auto_pad", "NOTSET")),
            }
            bias = None
            if len(node.input) > 2 and node.input[2]:
                b = initializers.get(node.input[2])
                if b is not None and uses.get(b.name, 0) == 1 and b.data_type in _FLOAT_TYPES and tuple(b.dims) == (shape[0],):
                    bias = b.name
            layers.append(LayerSpec(weight_name, op, label, node.input[0], shape, groups=groups, conv=conv, bias=bias))
    return layers


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _is_row_bias(tensor: onnx.TensorProto, n_out: int) -> bool:
    dims = tuple(int(d) for d in tensor.dims)
    return dims in ((n_out,), (1, n_out))


def _matmul_bias(node, consumers, initializers, uses, n_out) -> tuple[str | None, float]:
    """The constant of an ``Add`` that directly follows a MatMul (its only consumer), if per column."""
    out = node.output[0]
    after = consumers.get(out, [])
    if len(after) != 1 or uses.get(out, 0) != 1:
        return None, 1.0
    add = after[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
        return None, 1.0
    other = add.input[1] if add.input[0] == out else add.input[0]
    tensor = initializers.get(other)
    if tensor is None or uses.get(other, 0) != 1 or tensor.data_type not in _FLOAT_TYPES:
        return None, 1.0
    return (other, 1.0) if _is_row_bias(tensor, n_out) else (None, 1.0)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in attribute_subgraphs(attr):
                yield from _all_nodes(sub)


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes (used but not defined inside)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        defined.update(node.output)
        for attr in node.attribute:
            for sub in attribute_subgraphs(attr):
                used |= _outer_names(sub)
    used.update(o.name for o in graph.output)
    return used - defined


# ---------------------------------------------------------------------------
# im2col


def im2col(
    x: np.ndarray,
    *,
    kernel_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    auto_pad: str = "NOTSET",
    group: int = 1,
) -> list[np.ndarray]:
    """Patches of an N-d convolution input, one float64 row matrix per group.

    ``x`` is ``[N, C, *spatial]``. Row ``(n, output position)`` of group ``g``
    holds the inputs that output position reads, ordered ``(channel of the
    group, kernel offsets...)``, i.e. the layout of ``W[m].reshape(-1)`` for an
    ONNX weight ``W`` ``[M, C/group, *kernel]``; so ``rows @ W_g.reshape(M/group, -1).T``
    is the convolution output of group ``g`` (rows ordered by image, then output
    position in row-major order). Padding is zero; ``auto_pad`` follows the ONNX
    Conv definition.
    """
    x = np.asarray(x)
    geometry = _conv_geometry(x.shape, kernel_shape, strides, pads, dilations, auto_pad, group)
    n_spatial = x.ndim - 2
    padded = np.pad(x, [(0, 0), (0, 0)] + [(p0, p1) for p0, p1 in zip(geometry.pads[:n_spatial], geometry.pads[n_spatial:])])
    windows = np.lib.stride_tricks.sliding_window_view(padded, geometry.span, axis=tuple(range(2, 2 + n_spatial)))
    # windows: [N, C, *positions, *span]; keep every stride-th position and every dilation-th offset.
    index = (slice(None), slice(None))
    index += tuple(slice(None, (o - 1) * s + 1, s) for o, s in zip(geometry.out_shape, geometry.strides))
    index += tuple(slice(None, None, d) for d in geometry.dilations)
    patches = windows[index]  # [N, C, *out, *kernel]
    order = (0, *range(2, 2 + n_spatial), 1, *range(2 + n_spatial, 2 + 2 * n_spatial))
    patches = patches.transpose(order)  # [N, *out, C, *kernel]
    n_rows = x.shape[0] * int(np.prod(geometry.out_shape))
    per_group = x.shape[1] // group
    result = []
    for g in range(group):
        select = (slice(None),) * (1 + n_spatial) + (slice(g * per_group, (g + 1) * per_group),)
        result.append(np.ascontiguousarray(patches[select], dtype=np.float64).reshape(n_rows, -1))
    return result


@dataclass(frozen=True)
class _ConvGeometry:
    pads: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    span: tuple[int, ...]
    out_shape: tuple[int, ...]


def _conv_geometry(shape, kernel_shape, strides, pads, dilations, auto_pad, group) -> _ConvGeometry:
    if len(shape) < 3:
        raise CalibrationError(f"convolution input must be [N, C, spatial...], got shape {tuple(shape)}")
    n_spatial = len(shape) - 2
    kernel = tuple(int(k) for k in kernel_shape)
    strides = tuple(int(s) for s in (strides or [1] * n_spatial))
    dilations = tuple(int(d) for d in (dilations or [1] * n_spatial))
    pads = [int(p) for p in (pads or [0] * (2 * n_spatial))]
    if len(kernel) != n_spatial or len(strides) != n_spatial or len(dilations) != n_spatial or len(pads) != 2 * n_spatial:
        raise CalibrationError(f"convolution attributes do not match a {n_spatial}-d input of shape {tuple(shape)}")
    if shape[1] % group:
        raise CalibrationError(f"convolution input has {shape[1]} channels, not divisible by group={group}")
    spatial = shape[2:]
    span = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilations))
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        for i in range(n_spatial):
            out = -(-spatial[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + span[i] - spatial[i])
            small, large = total // 2, total - total // 2
            pads[i], pads[i + n_spatial] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    elif auto_pad == "VALID":
        pads = [0] * (2 * n_spatial)
    out_shape = tuple(
        (spatial[i] + pads[i] + pads[i + n_spatial] - span[i]) // strides[i] + 1 for i in range(n_spatial)
    )
    if any(o < 1 for o in out_shape):
        raise CalibrationError(f"convolution kernel {kernel} does not fit the input of shape {tuple(shape)}")
    return _ConvGeometry(tuple(pads), strides, dilations, span, out_shape)
