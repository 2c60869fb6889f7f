"""The calibration view of a model: ``If`` branches the data take inlined, subgraph constants lifted.

onnxruntime cannot return a value computed inside a subgraph, so weights held
inside ``If`` branches (or ``Loop``/``Scan`` bodies) get no statistics from the
model as it is. :func:`calibration_view` builds, for calibration only, an
equivalent flat model:

1. **Inlining.** Every ``If`` of the main graph whose condition takes the same
   value on every calibration sample (measured with onnxruntime) is replaced by
   the nodes of the branch taken, with ``Identity`` nodes from the branch's
   outputs to the ``If``'s; repeated until no such ``If`` is left, so nested
   branches are inlined too. On the calibration data the view computes exactly
   what the model computes. An ``If`` whose condition changes between samples,
   or whose branch defines a name already used outside it, is kept.
2. **Lifting.** Float ``Constant`` nodes (``value`` tensors) and initializers of
   the remaining subgraphs become main-graph initializers of the same name (a
   subgraph reads outer-scope values), so that every weight the data reach can
   be swapped in one onnxruntime session (the output-error proxy of
   :mod:`onnx_dc.calibration.proxies`). Main-graph ``Constant`` nodes become
   initializers too.

Weights of branches the data never take are not in the view: they cannot be
calibrated and keep the plain recipe; :attr:`CalibrationView.uncalibrated` says
which and why. :meth:`CalibrationView.restore` carries a
:class:`~onnx_dc.calibration.model_fit.CalibratedCompression` fitted on the view
back to the model's own structure (fitted tensors are keyed by weight name,
refitted biases are written where the model holds them), so the compressed
model keeps every branch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_dc.calibration.capture import _Runner
from onnx_dc.calibration.data import DEFAULT_BATCH_SIZE, CalibrationData
from onnx_dc.calibration.model_fit import CalibratedCompression
from onnx_dc.errors import ModelError
from onnx_dc.graph.model_io import attribute_subgraphs, constants_to_initializers, initializer_array

__all__ = ["CalibrationView", "calibration_view", "set_constant"]

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
_MAX_ROUNDS = 64  # inlining rounds (one per nesting level of If nodes)


@dataclass
class CalibrationView:
    """A flat model equivalent to ``original`` on the calibration data (module docstring).

    Attributes:
        original: the model as given (not modified); the compressed model keeps its structure.
        model: the view: taken ``If`` branches inlined, subgraph and ``Constant`` weights as initializers.
        inlined: per inlined ``If`` node (name or ``If#index``), the branch taken.
        kept_subgraphs: per ``If``/``Loop``/``Scan`` node left in the view, why it was not inlined.
        uncalibrated: per float weight of ``original`` that is not in the view, why it cannot be calibrated.
    """

    original: onnx.ModelProto
    model: onnx.ModelProto
    inlined: dict[str, str] = field(default_factory=dict)
    kept_subgraphs: dict[str, str] = field(default_factory=dict)
    uncalibrated: dict[str, str] = field(default_factory=dict)

    def restore(self, compression: CalibratedCompression) -> CalibratedCompression:
        """``compression`` (fitted on :attr:`model`) for :attr:`original`: the same fitted tensors, its
        refitted biases written into a copy of the original wherever it holds them (initializer or
        ``Constant`` node, in any subgraph), and :attr:`uncalibrated` recorded."""
        if self.model is self.original:
            return compression
        model = onnx.ModelProto()
        model.CopyFrom(self.original)
        for result in compression.results.values():
            if result.bias is not None:
                set_constant(model, result.bias, initializer_array(compression.model, result.bias))
        restored = CalibratedCompression(model, dict(compression.results), compression.n_samples)
        restored.uncalibrated = {**compression.uncalibrated, **self.uncalibrated}
        return restored


def calibration_view(
    model: onnx.ModelProto, data: CalibrationData, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> CalibrationView:
    """The :class:`CalibrationView` of ``model`` on ``data`` (see the module docstring).

    One pass over ``data`` per nesting level of ``If`` nodes, fetching only their
    conditions; a model without subgraphs and ``Constant`` nodes is its own view (no copy, no run).
    """
    if not any(
        node.op_type == "Constant" or any(attribute_subgraphs(a) for a in node.attribute) for node in model.graph.node
    ):
        return CalibrationView(model, model)
    view = constants_to_initializers(model)
    inlined: dict[str, str] = {}
    kept: dict[str, str] = {}
    dropped: dict[str, str] = {}
    decided: set[str] = set()  # first outputs of the If nodes kept (labels of unnamed nodes move with inlining)
    for _ in range(_MAX_ROUNDS):
        pending = [
            (i, node) for i, node in enumerate(view.graph.node)
            if node.op_type == "If" and node.domain in ("", "ai.onnx") and node.output and node.output[0] not in decided
        ]
        if not pending:
            break
        values = _condition_values(view, [node.input[0] for _, node in pending], data, batch_size)
        changed = False
        for i, _ in reversed(pending):  # from the end, so that earlier indices stay valid
            node = view.graph.node[i]  # read again: inlining rebuilds the node list
            label = _label(node, i)
            taken = values[node.input[0]]
            if len(taken) != 1:
                kept[label] = "takes both branches on the calibration data"
                decided.add(node.output[0])
                continue
            branch = "then_branch" if taken.pop() else "else_branch"
            reason = _inline_if(view.graph, i, branch, dropped, label)
            if reason is not None:
                kept[label] = reason
                decided.add(node.output[0])
                continue
            inlined[label] = branch
            changed = True
        if not changed:
            break
    for i, node in enumerate(view.graph.node):
        if any(attribute_subgraphs(a) for a in node.attribute) and node.op_type != "If":
            kept.setdefault(_label(node, i), f"{node.op_type} body: its weights are lifted, not inlined")
    if inlined:
        view = constants_to_initializers(view)  # the inlined branches' Constant nodes
    _lift_subgraph_constants(view.graph)
    present = _float_constants(view.graph, recurse=True)
    uncalibrated = {name: reason for name, reason in dropped.items() if name not in present}
    return CalibrationView(model, view, inlined, kept, uncalibrated)


def set_constant(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Replace the value of the constant tensor ``name`` (an initializer or a ``Constant`` node's
    ``value``, in the main graph or any subgraph) in place, keeping its dtype and shape."""
    for held, tensor in _constant_tensors(model.graph):
        if held == name:
            old = numpy_helper.to_array(tensor)
            new = numpy_helper.from_array(np.asarray(value).astype(old.dtype).reshape(old.shape), tensor.name)
            tensor.CopyFrom(new)
            return
    raise ModelError(f"{name!r} is not a constant tensor of the model")


# ---------------------------------------------------------------------------


def _copy(message):
    """A detached copy of a protobuf message (elements of repeated fields die with their container)."""
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def _condition_values(
    model: onnx.ModelProto, names: list[str], data: CalibrationData, batch_size: int
) -> dict[str, set[bool]]:
    """The distinct truth values each condition takes over all samples of ``data``."""
    wanted = list(dict.fromkeys(names))
    seen: dict[str, set[bool]] = {n: set() for n in wanted}
    runner = _Runner(model, wanted)
    for feed, _ in data.feeds(batch_size):
        values = runner.run(feed)
        for n in wanted:
            v = np.asarray(values[n]).reshape(-1)
            seen[n].update(bool(x) for x in v[:1])
    return seen


def _inline_if(graph: onnx.GraphProto, index: int, branch: str, dropped: dict[str, str], label: str) -> str | None:
    """Replace node ``index`` (an ``If``) by its ``branch``; None, or why it cannot be inlined."""
    node = graph.node[index]
    subs = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
    body = subs.get(branch)
    if body is None or len(body.output) != len(node.output):
        return "malformed If node"
    outside = _defined_names(graph)
    inside = {t.name for t in body.initializer} | {o for n in body.node for o in n.output if o}
    clash = sorted(inside & outside)
    if clash:
        return f"its {branch} defines {clash[0]!r}, a name also used outside it"
    other = "else_branch" if branch == "then_branch" else "then_branch"
    if other in subs:
        for name in sorted(_float_constants(subs[other], recurse=True)):
            dropped[name] = f"in the {other} of If {label!r}, which the calibration data never take"
    nodes = [_copy(n) for n in body.node] + [
        helper.make_node("Identity", [inner.name], [outer], name=f"{label}/{branch}/output_{k}")
        for k, (inner, outer) in enumerate(zip(body.output, node.output))
    ]
    graph.initializer.extend(body.initializer)
    rest = [_copy(n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(rest[:index] + nodes + rest[index + 1:])
    return None


def _defined_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def _iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in attribute_subgraphs(attr):
                yield from _iter_graphs(sub)


def _constant_tensors(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """``(the name the model reads it by, tensor)`` for every initializer and Constant ``value``, at any depth."""
    for g in _iter_graphs(graph):
        for tensor in g.initializer:
            yield tensor.name, tensor
        for node in g.node:
            tensor = _value_tensor(node)
            if tensor is not None:
                yield node.output[0], tensor


def _float_constants(graph: onnx.GraphProto, *, recurse: bool) -> set[str]:
    """Names of the float constant tensors of ``graph`` (and its subgraphs with ``recurse``)."""
    graphs = _iter_graphs(graph) if recurse else iter([graph])
    names: set[str] = set()
    for g in graphs:
        names.update(t.name for t in g.initializer if t.data_type in _FLOAT_TYPES)
        for node in g.node:
            tensor = _value_tensor(node)
            if tensor is not None and tensor.data_type in _FLOAT_TYPES:
                names.add(node.output[0])
    return names


def _value_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.output:
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
    return None


def _lift_subgraph_constants(graph: onnx.GraphProto) -> None:
    """Float constants of every subgraph become main-graph initializers (names unique in the model only)."""
    counts: dict[str, int] = {}
    for g in _iter_graphs(graph):
        for name in [i.name for i in g.input] + [t.name for t in g.initializer] + [o for n in g.node for o in n.output]:
            counts[name] = counts.get(name, 0) + 1
    lifted: list[onnx.TensorProto] = []
    subgraphs = [sub for node in graph.node for a in node.attribute for sub in attribute_subgraphs(a)]
    for top in subgraphs:
        for g in _iter_graphs(top):
            outputs = {o.name for o in g.output}
            keep_nodes = []
            for node in [_copy(n) for n in g.node]:
                tensor = _value_tensor(node)
                name = node.output[0] if node.output else ""
                if tensor is not None and tensor.data_type in _FLOAT_TYPES and counts.get(name) == 1 and name not in outputs:
                    copy = onnx.TensorProto()
                    copy.CopyFrom(tensor)
                    copy.name = name
                    lifted.append(copy)
                else:
                    keep_nodes.append(node)
            if len(keep_nodes) != len(g.node):
                del g.node[:]
                g.node.extend(keep_nodes)
            keep_inits = []
            for tensor in g.initializer:
                if tensor.data_type in _FLOAT_TYPES and counts.get(tensor.name) == 1 and tensor.name not in outputs:
                    lifted.append(_copy(tensor))
                else:
                    keep_inits.append(tensor)
            if len(keep_inits) != len(g.initializer):
                copies = [onnx.TensorProto() for _ in keep_inits]
                for c, t in zip(copies, keep_inits):
                    c.CopyFrom(t)
                del g.initializer[:]
                g.initializer.extend(copies)
    graph.initializer.extend(lifted)
