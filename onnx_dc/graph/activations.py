"""Recognising the activation (and the bias ``Add``) after a ``DCMatMul`` / ``DCConv``: a pure analysis.

:func:`find_activations` returns, for each ``DCMatMul`` and ``DCConv`` node of
a compressed model, the activation that follows it, its parameters and the
nodes a fused operator would absorb; it changes nothing.
:func:`onnx_dc.graph.fusion.fuse_activations` rewrites the matches into the
operators' ``activation`` / ``activation_params`` attributes (the contract
proposed for the runtime in docs/OPERATORS.md, after onnxruntime's
``FusedConv``), and :func:`match_bias_add` finds the bias ``Add`` that
:func:`onnx_dc.graph.fusion.fuse_bias` moves into ``DCMatMul``'s bias input.

Kinds and parameters (``ACTIVATION_KINDS``): ``Relu``; ``Clip`` ``[min, max]``
(``Relu6`` is ``Clip [0, 6]``; a missing bound is +-FLT_MAX); ``HardSigmoid``
``[alpha, beta]``; ``HardSwish``; ``Sigmoid``; ``SiLU`` (``x * sigmoid(x)``);
``LeakyRelu`` ``[alpha]``; ``Tanh``; ``Gelu`` (exact, with ``erf``);
``FastGelu`` (the ``tanh`` approximation).

A single operator (``Relu``, ``Clip``, ``HardSigmoid``, ``HardSwish``,
``Sigmoid``, ``LeakyRelu``, ``Tanh``, ``Gelu``; com.microsoft ``Gelu``,
``FastGelu``, ``BiasGelu``) is read from its attributes and inputs. A
decomposed activation (``x * HardSigmoid(x)``, PaddleOCR's
``Add(3) -> Clip(0, 6) -> Div(6) -> Mul(x)``, ``x * Sigmoid(x)``, the ``erf``
form ``x * 0.5 * (1 + Erf(x / sqrt 2))``, the ``tanh`` form of GELU with
``Pow`` or ``x * x * x``, in any operand order) is found as the largest
*region* of elementwise nodes that reads only the product and scalar
constants and whose values nobody else reads, and identified by evaluating
the region in float32 on a grid of inputs from -10^4 to 10^4 and comparing it
with each kind (tolerance 2e-5 relative, far below the 5e-4 between
``Gelu`` and ``FastGelu``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_dc.graph.graph_index import GraphIndex, attributes, is_default_domain
from onnx_dc.graph.model_io import iter_graphs
from onnx_dc.graph.operators import CONV_OP, DOMAIN, MATMUL_OP

__all__ = [
    "ACTIVATION_KINDS",
    "ActivationMatch",
    "BiasMatch",
    "activation_function",
    "find_activations",
    "find_activations_in_graph",
    "match_activation",
    "match_bias_add",
]

ACTIVATION_KINDS: tuple[str, ...] = (
    "Relu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "SiLU", "LeakyRelu", "Tanh", "Gelu", "FastGelu",
)
FLT_MAX = float(np.finfo(np.float32).max)
_MS = "com.microsoft"
_MAX_REGION_NODES = 24


@dataclass(frozen=True)
class ActivationMatch:
    """The activation after ``node``: what a fused operator would compute and the nodes it would absorb.

    ``nodes`` are in graph order, ``Constant`` nodes that only they read
    included; ``constants`` are the initializers only they read; ``output`` is
    the value the fused node would produce; ``bias`` is a bias input the
    activation node carries (com.microsoft ``BiasGelu`` / ``FastGelu``), to be
    moved into ``DCMatMul``'s bias input.
    """

    node: onnx.NodeProto
    kind: str
    params: tuple[float, ...]
    nodes: tuple[onnx.NodeProto, ...]
    constants: tuple[str, ...]
    output: str
    bias: str | None = None


@dataclass(frozen=True)
class BiasMatch:
    """A constant per-column bias ``Add`` that alone reads a ``DCMatMul`` output."""

    node: onnx.NodeProto  # the DCMatMul
    add: onnx.NodeProto
    bias: str  # the constant's name
    slot: int  # which input of the Add it is


def find_activations(model: onnx.ModelProto, ops: Iterable[str] = (MATMUL_OP, CONV_OP)) -> list[ActivationMatch]:
    """For every ``ai.onnx_dc`` node of type ``ops`` (all graphs), the activation that follows it, if any."""
    return [match for graph in iter_graphs(model.graph) for match in find_activations_in_graph(graph, ops)]


def find_activations_in_graph(graph: onnx.GraphProto, ops: Iterable[str] = (MATMUL_OP, CONV_OP)) -> list[ActivationMatch]:
    """:func:`find_activations` for the nodes of one graph (not its subgraphs)."""
    wanted = set(ops)
    index = GraphIndex.build(graph)
    matches = []
    for node in graph.node:
        if node.domain == DOMAIN and node.op_type in wanted and node.output and node.output[0]:
            match = match_activation(index, node)
            if match is not None:
                matches.append(match)
    return matches


def match_bias_add(index: GraphIndex, node: onnx.NodeProto, n_columns: int | None) -> BiasMatch | None:
    """The ``Add`` of a float32 constant ``[N]`` that alone reads ``node``'s output, if any.

    ``n_columns`` is the product's last dimension (N) when known. A scalar
    ``Add`` is no bias: it is left to the activation it usually starts
    (``Add(3) -> Clip(0, 6) -> Div(6)`` is a HardSigmoid).
    """
    value = node.output[0]
    if not index.is_private(value) or len(index.readers.get(value, [])) != 1:
        return None
    add, slot = index.readers[value][0]
    if add.op_type != "Add" or not is_default_domain(add) or len(add.input) != 2 or len(add.output) != 1:
        return None
    bias = add.input[1 - slot]
    if bias == value or not index.is_float32_constant(bias):
        return None
    shape = tuple(int(d) for d in index.constants[bias].dims)
    if len(shape) != 1 or shape[0] < 2 or (n_columns is not None and shape != (n_columns,)):
        return None
    return BiasMatch(node, add, bias, 1 - slot)


def match_activation(index: GraphIndex, node: onnx.NodeProto) -> ActivationMatch | None:
    """The activation that alone reads ``node``'s first output, if one of ``ACTIVATION_KINDS`` does."""
    value = node.output[0]
    if value in index.outputs or not index.readers.get(value):
        return None
    if len(index.readers[value]) == 1 and index.is_private(value):
        single = _single_op(index, node, index.readers[value][0])
        if single is not None:
            return single
    return _region(index, node)


# ----------------------------------------------------------------------------- single operators


def _single_op(index: GraphIndex, node: onnx.NodeProto, reader: tuple[onnx.NodeProto, int]) -> ActivationMatch | None:
    act, slot = reader
    if slot != 0 or len(act.output) != 1 or not act.output[0]:
        return None
    attrs = attributes(act)
    op = act.op_type
    kind: str | None = None
    params: tuple[float, ...] = ()
    bias: str | None = None
    extra: list[str] = []  # constant inputs the activation reads
    if is_default_domain(act):
        if op in ("Relu", "Sigmoid", "Tanh", "HardSwish") and len(act.input) == 1:
            kind = op
        elif op == "LeakyRelu":
            kind, params = op, (float(attrs.get("alpha", 0.01)),)
        elif op == "HardSigmoid":
            kind, params = op, (float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5)))
        elif op == "Gelu":
            approximate = attrs.get("approximate", b"none")
            approximate = approximate.decode() if isinstance(approximate, bytes) else str(approximate)
            kind = {"none": "Gelu", "tanh": "FastGelu"}.get(approximate)
        elif op == "Clip":
            bounds = _clip_bounds(index, act, attrs)
            if bounds is None:
                return None
            kind, params = "Clip", bounds
            extra = [name for name in act.input[1:] if name]
    elif act.domain == _MS:
        if op == "Gelu" and len(act.input) == 1:
            kind = "Gelu"
        elif op in ("FastGelu", "BiasGelu"):
            kind = "FastGelu" if op == "FastGelu" else "Gelu"
            if len(act.input) > 1 and act.input[1]:
                bias = act.input[1]
                if not index.is_float32_constant(bias) or len(index.constants[bias].dims) != 1:
                    return None
                if node.op_type != MATMUL_OP or (len(node.input) > 2 and node.input[2]):
                    return None  # only DCMatMul takes a bias, and only one; it moves there, it is not absorbed
    if kind is None:
        return None
    nodes, constants = _with_constants(index, [act], extra)
    return ActivationMatch(node, kind, params, tuple(nodes), tuple(constants), act.output[0], bias)


def _clip_bounds(index: GraphIndex, act: onnx.NodeProto, attrs: dict) -> tuple[float, float] | None:
    """Clip's (min, max): attributes before opset 11, optional scalar constant inputs after."""
    if "min" in attrs or "max" in attrs:
        return float(attrs.get("min", -FLT_MAX)), float(attrs.get("max", FLT_MAX))
    bounds = [-FLT_MAX, FLT_MAX]
    for i, name in enumerate(act.input[1:3]):
        if not name:
            continue
        value = index.constant(name)
        if value is None or value.size != 1 or not index.is_float32_constant(name):
            return None
        bounds[i] = float(value.reshape(-1)[0])
    return bounds[0], bounds[1]


def _with_constants(index: GraphIndex, nodes: list[onnx.NodeProto], names: Iterable[str]) -> tuple[list, list[str]]:
    """Add the ``Constant`` nodes among ``names`` that only ``nodes`` read; list such initializers."""
    members = {id(n) for n in nodes}
    constant_nodes, initializers = [], []
    for name in dict.fromkeys(names):
        readers = index.readers.get(name, [])
        private = (
            index.uses[name] == len(readers)
            and all(id(r) in members for r, _ in readers)
            and name not in index.outputs
            and name not in index.inputs
        )
        if not private:
            continue
        if name in index.constant_nodes:
            constant_nodes.append(index.constant_nodes[name])
        elif name in index.constants:
            initializers.append(name)
    position = {id(n): i for i, n in enumerate(index.graph.node)}
    ordered = sorted(nodes + constant_nodes, key=lambda n: position[id(n)])
    return ordered, initializers


# ----------------------------------------------------------------------------- decomposed activations


_Unary = Callable[[np.ndarray], np.ndarray]


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _evaluate(op: str, attrs: dict, args: list[np.ndarray]) -> np.ndarray | None:
    """One elementwise ONNX operator on float32 arrays (None: not supported)."""
    x = args[0]
    if op == "Add":
        return args[0] + args[1]
    if op == "Sub":
        return args[0] - args[1]
    if op == "Mul":
        return args[0] * args[1]
    if op == "Div":
        return args[0] / args[1]
    if op == "Pow":
        return np.power(args[0], args[1])
    if op == "Min":
        return np.minimum.reduce(args)
    if op == "Max":
        return np.maximum.reduce(args)
    if op == "Clip":
        low = args[1] if len(args) > 1 and args[1] is not None else attrs.get("min", -FLT_MAX)
        high = args[2] if len(args) > 2 and args[2] is not None else attrs.get("max", FLT_MAX)
        return np.minimum(np.maximum(x, np.float32(low)), np.float32(high))
    unary: dict[str, _Unary] = {
        "Identity": lambda v: v, "Neg": np.negative, "Abs": np.abs, "Sqrt": np.sqrt, "Exp": np.exp,
        "Reciprocal": np.reciprocal, "Erf": _erf, "Tanh": np.tanh, "Sigmoid": _sigmoid,
        "Relu": lambda v: np.maximum(v, np.float32(0)),
        "HardSwish": lambda v: v * np.clip(v / np.float32(6) + np.float32(0.5), 0, 1),
    }
    if op in unary:
        return unary[op](x)
    if op == "LeakyRelu":
        return np.where(x >= 0, x, x * np.float32(attrs.get("alpha", 0.01)))
    if op == "HardSigmoid":
        return np.clip(x * np.float32(attrs.get("alpha", 0.2)) + np.float32(attrs.get("beta", 0.5)), 0, 1)
    return None


_ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Min", "Max", "Clip", "Identity", "Neg", "Abs", "Sqrt", "Exp",
    "Reciprocal", "Erf", "Tanh", "Sigmoid", "Relu", "HardSwish", "LeakyRelu", "HardSigmoid",
})


def activation_function(kind: str, params: tuple[float, ...] = ()) -> _Unary:
    """The activation as a float64 numpy function (the reference the matcher compares with)."""
    def gelu(x):
        return 0.5 * x * (1 + np.vectorize(math.erf, otypes=[np.float64])(x / math.sqrt(2)))

    table: dict[str, _Unary] = {
        "Relu": lambda x: np.maximum(x, 0),
        "Sigmoid": _sigmoid,
        "Tanh": np.tanh,
        "SiLU": lambda x: x * _sigmoid(x),
        "HardSwish": lambda x: x * np.clip(x / 6 + 0.5, 0, 1),
        "Gelu": gelu,
        "FastGelu": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    }
    if kind in table:
        return table[kind]
    if kind == "Clip":
        return lambda x: np.clip(x, params[0], params[1])
    if kind == "LeakyRelu":
        return lambda x: np.where(x >= 0, x, params[0] * x)
    if kind == "HardSigmoid":
        return lambda x: np.clip(params[0] * x + params[1], 0, 1)
    raise ValueError(f"unknown activation {kind!r}")


_GRID = np.concatenate([
    np.linspace(-10, 10, 2001), np.array([-1e4, -1e3, -100, -50, -20, 20, 50, 100, 1e3, 1e4]),
]).astype(np.float32)


def _identify(f: _Unary) -> tuple[str, tuple[float, ...]] | None:
    """Which kind (and parameters) the float32 function ``f`` is, on ``_GRID``; None when none fits."""
    with np.errstate(all="ignore"):
        y = f(_GRID.copy())
        if y is None or y.shape != _GRID.shape or not np.all(np.isfinite(y)):
            return None
        x = _GRID.astype(np.float64)
        y = y.astype(np.float64)

        def fits(kind, params=()):
            want = activation_function(kind, params)(x)
            return bool(np.all(np.abs(y - want) <= 2e-5 * np.maximum(1.0, np.abs(want))))

        for kind in ("Relu", "Sigmoid", "Tanh", "SiLU", "HardSwish", "Gelu", "FastGelu"):
            if fits(kind):
                return kind, ()
        alpha = -float(f(np.array([-1.0], np.float32))[0])
        if abs(alpha) < 1 and fits("LeakyRelu", (alpha,)):
            return "LeakyRelu", (alpha,)
        slope = float(f(np.array([0.05], np.float32))[0] - f(np.array([-0.05], np.float32))[0]) / 0.1
        offset = float(f(np.array([0.0], np.float32))[0])
        if 0 < offset < 1 and fits("HardSigmoid", (slope, offset)):
            return "HardSigmoid", (_round(slope), _round(offset))
        big = np.array([-3e38, 3e38], np.float32)
        low, high = (float(v) for v in f(big))
        low = -FLT_MAX if low <= -3e38 else low
        high = FLT_MAX if high >= 3e38 else high
        if low < high and fits("Clip", (low, high)):
            return ("Relu", ()) if (low, high) == (0.0, FLT_MAX) else ("Clip", (low, high))
    return None


def _round(value: float) -> float:
    """A fitted parameter snapped to a nearby simple fraction (1/6 from a slope of 0.16666664)."""
    for denominator in (1, 2, 3, 4, 5, 6, 8, 10, 100):
        candidate = round(value * denominator) / denominator
        if abs(candidate - value) <= 1e-5 * max(1.0, abs(value)):
            return candidate
    return value


def _region(index: GraphIndex, node: onnx.NodeProto) -> ActivationMatch | None:
    """The largest private elementwise region after ``node`` that computes one of the kinds."""
    value = node.output[0]
    closure = _closure(index, value)
    if not closure:
        return None
    produced = {out: n for n in closure for out in n.output}
    best: ActivationMatch | None = None
    for exit_node in closure:
        members = _ancestors(exit_node, produced, value)
        if best is not None and len(members) <= len(best.nodes):
            continue
        if not _is_closed(index, members, value, exit_node.output[0]):
            continue
        identified = _identify(lambda x, m=members: _run(index, m, value, x))
        if identified is None:
            continue
        scalars = [name for n in members for name in n.input if name and name != value and name not in produced]
        nodes, constants = _with_constants(index, members, scalars)
        best = ActivationMatch(node, identified[0], identified[1], tuple(nodes), tuple(constants), exit_node.output[0])
    return best


def _is_scalar_constant(index: GraphIndex, name: str) -> bool:
    value = index.constants.get(name)
    return (
        value is not None
        and name not in index.inputs
        and value.data_type == onnx.TensorProto.FLOAT
        and len(value.dims) <= 1
        and int(np.prod(value.dims)) == 1
    )


def _closure(index: GraphIndex, value: str) -> list[onnx.NodeProto]:
    """Elementwise nodes computed from ``value`` and scalar constants only, in graph order."""
    inside = {value}
    members: list[onnx.NodeProto] = []
    member_ids: set[int] = set()
    frontier = [value]
    while frontier and len(members) < _MAX_REGION_NODES:
        name = frontier.pop()
        for reader, _ in index.readers.get(name, []):
            if id(reader) in member_ids or not is_default_domain(reader) or reader.op_type not in _ELEMENTWISE:
                continue
            if len(reader.output) != 1 or not reader.output[0]:
                continue
            if all(not n or n in inside or _is_scalar_constant(index, n) for n in reader.input):
                members.append(reader)
                member_ids.add(id(reader))
                inside.add(reader.output[0])
                frontier.append(reader.output[0])
                frontier.append(value)  # nodes reading value and this output can be complete now
    position = {id(n): i for i, n in enumerate(index.graph.node)}
    return sorted(members, key=lambda n: position[id(n)])


def _ancestors(exit_node: onnx.NodeProto, produced: dict[str, onnx.NodeProto], value: str) -> list[onnx.NodeProto]:
    """The region nodes ``exit_node`` depends on (itself included), in graph order of ``produced``."""
    needed: dict[int, onnx.NodeProto] = {}
    stack = [exit_node]
    while stack:
        n = stack.pop()
        if id(n) in needed:
            continue
        needed[id(n)] = n
        stack.extend(produced[name] for name in n.input if name in produced)
    order = list(produced.values())
    return [n for n in order if id(n) in needed]


def _is_closed(index: GraphIndex, members: list[onnx.NodeProto], value: str, exit_value: str) -> bool:
    """Whether only ``members`` read ``value`` and the members' values other than ``exit_value``."""
    ids = {id(n) for n in members}
    for name in [value] + [n.output[0] for n in members if n.output[0] != exit_value]:
        readers = index.readers.get(name, [])
        if name in index.outputs or index.uses[name] != len(readers) or any(id(r) not in ids for r, _ in readers):
            return False
    return True


def _run(index: GraphIndex, members: list[onnx.NodeProto], value: str, x: np.ndarray) -> np.ndarray | None:
    values: dict[str, np.ndarray] = {value: x}
    for n in members:
        args = []
        for name in n.input:
            if not name:
                args.append(None)
            elif name in values:
                args.append(values[name])
            else:
                args.append(index.constant(name).astype(np.float32).reshape(()))
        result = _evaluate(n.op_type, attributes(n), args)
        if result is None:
            return None
        values[n.output[0]] = np.asarray(result, np.float32)
    return values[members[-1].output[0]]
