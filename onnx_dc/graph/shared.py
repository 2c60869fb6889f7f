"""Storing a weight once when the model holds it twice: exact copies and exact transposes.

Exporters often write one parameter as two initializers. The usual case is
a language model whose LM head is tied to its token embedding: TorchScript
and dynamo both constant-fold ``h @ wte.weight.T`` into a second initializer
(``onnx::MatMul_264``, ``t``) that is ``wte.weight`` transposed, so the
file carries the embedding twice. :func:`share_duplicate_weights` finds
float32 2-D initializers of one graph that equal another bit for bit, or
equal its transpose, and makes the later one read the earlier: an exact copy
is renamed to it, a transpose becomes a ``Transpose`` node of it (output
named like the removed initializer, so the readers are unchanged). The
rewrite then runs a ``MatMul`` of such a ``Transpose`` as ``DCMatMul`` with
``trans_b = 1`` straight on the one container
(:mod:`onnx_dc.graph.rewrite`), and the weight is compressed once. The
model computes exactly what it did; ``decompress`` gives back the shared
form.

Only initializers that are not graph inputs or outputs are considered, and
only tensors of at least ``min_elements`` elements (small ones are left
dense anyway).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_dc.graph.model_io import iter_graphs, unique_name

__all__ = ["SharedWeight", "share_duplicate_weights"]


@dataclass(frozen=True)
class SharedWeight:
    """``duplicate`` was removed: it equals ``kept`` (``transposed``: ``kept`` transposed)."""

    duplicate: str
    kept: str
    transposed: bool

    def describe(self) -> str:
        """One line for the report."""
        how = "transposed (read through a Transpose node)" if self.transposed else "(an exact copy)"
        return f"{self.duplicate!r} is {self.kept!r} {how}: stored once"


def share_duplicate_weights(model: onnx.ModelProto, *, min_elements: int = 256) -> list[SharedWeight]:
    """Replace float32 2-D initializers equal to another (or to its transpose) by reads of it, in place."""
    if model.ir_version < 4:
        return []  # there initializers are graph inputs: replacing one would change the interface
    shared: list[SharedWeight] = []
    node_names = {n.name for g in iter_graphs(model.graph) for n in g.node if n.name}
    for graph in list(iter_graphs(model.graph)):
        protected = {i.name for i in graph.input} | {o.name for o in graph.output}
        seen: dict[tuple[tuple[int, ...], str], str] = {}  # (shape, digest) -> kept name
        for tensor in list(graph.initializer):
            if (
                tensor.data_type != onnx.TensorProto.FLOAT
                or len(tensor.dims) != 2
                or tensor.name in protected
                or int(np.prod(tensor.dims)) < min_elements
            ):
                continue
            values = numpy_helper.to_array(tensor)
            key = (values.shape, _digest(values))
            transposed_key = (values.shape[::-1], _digest(values.T))
            kept, transposed = seen.get(key), False
            if kept is None:
                kept, transposed = seen.get(transposed_key), True
            if kept is None or not _equal(graph, kept, values, transposed):
                seen.setdefault(key, tensor.name)
                continue
            _replace(graph, tensor, kept, transposed, node_names)
            shared.append(SharedWeight(tensor.name, kept, transposed))
    return shared


def _digest(values: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=16).hexdigest()


def _equal(graph: onnx.GraphProto, kept: str, values: np.ndarray, transposed: bool) -> bool:
    """Bit-for-bit comparison behind the hash."""
    other = numpy_helper.to_array(next(t for t in graph.initializer if t.name == kept))
    other = other.T if transposed else other
    return other.shape == values.shape and np.ascontiguousarray(other).tobytes() == np.ascontiguousarray(values).tobytes()


def _replace(graph, tensor, kept: str, transposed: bool, node_names: set[str]) -> None:
    name = tensor.name
    graph.initializer.remove(tensor)
    if transposed:
        node = helper.make_node("Transpose", [kept], [name], name=unique_name(f"{name}__transpose", node_names), perm=[1, 0])
        first = next((i for i, n in enumerate(graph.node) if name in n.input), 0)  # before its first reader
        graph.node.insert(first, node)
        return
    for g in iter_graphs(graph):  # an exact copy: every read of it reads the kept tensor
        for node in g.node:
            for i, value in enumerate(node.input):
                if value == name:
                    node.input[i] = kept
