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

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnx_dc.graph.model_io import iter_graphs, unique_name
from onnx_dc.graph.tensor_store import external_location, tensor_values

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


def share_duplicate_weights(
    model: onnx.ModelProto, *, min_elements: int = 256, source_dir: str | os.PathLike | None = None
) -> list[SharedWeight]:
    """Replace float32 2-D initializers equal to another (or to its transpose) by reads of it, in place.

    Candidates are found by an order-independent checksum of the values' bit patterns (the same
    for a tensor and its transpose, computed a block at a time without copies) and confirmed bit
    for bit. ``source_dir``: where the model's external data references point (each tensor is
    then read as a memory map).
    """
    if model.ir_version < 4:
        return []  # there initializers are graph inputs: replacing one would change the interface
    shared: list[SharedWeight] = []
    node_names = {n.name for g in iter_graphs(model.graph) for n in g.node if n.name}
    for graph in list(iter_graphs(model.graph)):
        protected = {i.name for i in graph.input} | {o.name for o in graph.output}
        eligible = [
            t for t in graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and t.name not in protected
            and int(np.prod(t.dims)) >= min_elements
        ]
        checksums = _checksums(eligible, source_dir)
        seen: dict[tuple, list[str]] = {}  # (dims in order, checksum) -> names kept
        for tensor in eligible:
            key = (tuple(sorted(int(d) for d in tensor.dims)), checksums.get(tensor.name))
            candidates = seen.get(key, [])
            values = tensor_values(tensor, source_dir) if candidates else None
            match = next(((kept, transposed) for transposed in (False, True) for kept in candidates
                          if _equal(graph, kept, values, transposed, source_dir)), None)
            if match is None:
                seen.setdefault(key, []).append(tensor.name)
                continue
            _replace(graph, tensor, match[0], match[1], node_names)
            shared.append(SharedWeight(tensor.name, match[0], match[1]))
    return shared


def _checksums(tensors: list[onnx.TensorProto], source_dir: str | os.PathLike | None) -> dict[str, tuple[int, int]]:
    """:func:`_tensor_checksum` of each tensor that shares its sorted dims with another (the only ones that can
    be copies), on a thread per core (numpy and file reads release the GIL)."""
    shapes = Counter(tuple(sorted(int(d) for d in t.dims)) for t in tensors)
    wanted = [t for t in tensors if shapes[tuple(sorted(int(d) for d in t.dims))] > 1]
    if len(wanted) < 2:
        return {t.name: _tensor_checksum(t, source_dir) for t in wanted}
    with ThreadPoolExecutor(max_workers=min(len(wanted), os.cpu_count() or 1)) as pool:
        return dict(zip((t.name for t in wanted), pool.map(lambda t: _tensor_checksum(t, source_dir), wanted)))


def _tensor_checksum(tensor: onnx.TensorProto, source_dir: str | os.PathLike | None) -> tuple[int, int]:
    """:func:`_checksum` of a float32 tensor; external data is read a block at a time (never mapped whole)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL or source_dir is None:
        return _checksum(tensor_values(tensor, source_dir).reshape(-1))
    location = external_location(tensor, source_dir)
    plain = mixed = 0
    with open(location.path, "rb") as file:
        file.seek(location.offset)
        left = location.length // 4
        while left:
            block = np.fromfile(file, dtype="<u4", count=min(left, _BLOCK))
            if block.size == 0:
                break
            left -= block.size
            block_plain, block_mixed = _checksum(block)
            plain, mixed = (plain + block_plain) % 2**64, (mixed + block_mixed) % 2**64
    return plain, mixed


def _checksum(values: np.ndarray) -> tuple[int, int]:
    """Two sums (mod 2**64) over the elements' bit patterns: independent of their order."""
    flat = values.reshape(-1)
    plain = mixed = 0
    for start in range(0, flat.size, _BLOCK):
        bits = flat[start : start + _BLOCK].view(np.uint32).astype(np.uint64)
        plain += int(bits.sum(dtype=np.uint64))
        bits *= np.uint64(0x9E3779B97F4A7C15)
        bits >>= np.uint64(17)
        mixed += int(bits.sum(dtype=np.uint64))
    return plain % 2**64, mixed % 2**64


_BLOCK = 1 << 20


def _equal(graph: onnx.GraphProto, kept: str, values: np.ndarray, transposed: bool,
           source_dir: str | os.PathLike | None) -> bool:
    """Bit-for-bit comparison behind the checksum."""
    other = tensor_values(next(t for t in graph.initializer if t.name == kept), source_dir)
    other = other.T if transposed else other
    return other.shape == values.shape and np.array_equal(other.view(np.uint32), values.view(np.uint32))


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
