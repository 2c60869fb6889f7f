"""Synthetic MatMul stacks for the large-model benchmark (bench_scale.py) and tests.

``x [N, k0] -> MatMul W0 [k0, k1] -> MatMul W1 [k1, k2] -> ...``: every weight
float32, ``0.02 * standard normal`` (the scale of a transformer's initial
weights), each layer from its own seeded generator, so a model is the same on
every machine. :func:`write_matmul_stack` writes one without holding more than
one weight in memory: with ``external=True`` the weights go to ``NAME.data``
(4 KiB-aligned, as onnx-dc writes external data); otherwise the ``.onnx`` file
is assembled from its protobuf fields with the weights inline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_dc.graph.tensor_store import length_delimited

__all__ = ["SCALE_MODELS", "StackSpec", "small_spec", "write_matmul_stack"]

_ALIGN = 4096


@dataclass(frozen=True)
class StackSpec:
    """A MatMul stack: layer widths ``widths[0] -> widths[1] -> ...`` and where its weights are."""

    name: str
    widths: tuple[int, ...]
    external: bool
    seed: int = 0

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Weight shapes ``[k_i, k_{i+1}]``."""
        return list(zip(self.widths[:-1], self.widths[1:]))

    @property
    def n_weights(self) -> int:
        """Weights of the model."""
        return sum(k * n for k, n in self.shapes)

    @property
    def nbytes(self) -> int:
        """Bytes of the float32 weights."""
        return 4 * self.n_weights


SCALE_MODELS = (
    StackSpec("stack-0.13GB", (2048,) * 9, external=False),  # the 8 x 2048 x 2048
    StackSpec("stack-1GB", (4096,) * 17, external=False),  # 16 x 4096 x 4096, inline (under 2 GB)
    # A 1.1 B-parameter decoder's weight volume: 16 x 8192 x 8192 and an 8192 x 3072 head, external data.
    StackSpec("stack-4.4GB", (8192,) * 17 + (3072,), external=True),
)


def _weight(spec: StackSpec, index: int) -> np.ndarray:
    k, n = spec.shapes[index]
    rng = np.random.default_rng([spec.seed, index])
    weight = rng.standard_normal((k, n), dtype=np.float32)
    weight *= np.float32(0.02)
    return weight


def _graph_parts(spec: StackSpec) -> tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    nodes, previous = [], "x"
    for i in range(len(spec.shapes)):
        nodes.append(helper.make_node("MatMul", [previous, f"layers.{i}.weight"], [f"h{i}"], name=f"layers.{i}"))
        previous = f"h{i}"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", spec.widths[0]])]
    outputs = [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["batch", spec.widths[-1]])]
    return nodes, inputs, outputs


def write_matmul_stack(spec: StackSpec, path: str | os.PathLike) -> Path:
    """Write ``spec``'s model to ``path`` (and ``path.data`` when external), one weight in memory at a time."""
    path = Path(path)
    nodes, inputs, outputs = _graph_parts(spec)
    tmp = path.with_name(path.name + ".partial")
    data_path = path.with_name(path.name + ".data")
    initializers = []
    if spec.external:
        with open(data_path.with_name(data_path.name + ".partial"), "wb") as f:
            offset = 0
            for i, (k, n) in enumerate(spec.shapes):
                pad = (-offset) % _ALIGN
                f.write(b"\0" * pad)
                offset += pad
                weight = _weight(spec, i)
                weight.tofile(f)
                init = TensorProto(name=f"layers.{i}.weight", data_type=TensorProto.FLOAT, dims=[k, n])
                init.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(weight.nbytes))):
                    entry = init.external_data.add()
                    entry.key, entry.value = key, value
                offset += weight.nbytes
                initializers.append(init)
                del weight
        graph = helper.make_graph(nodes, spec.name, inputs, outputs, initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        tmp.write_bytes(model.SerializeToString())
        os.replace(data_path.with_name(data_path.name + ".partial"), data_path)
        os.replace(tmp, path)
        return path
    # Inline: the model without initializers, then each initializer appended as a graph field.
    graph = helper.make_graph(nodes, spec.name, inputs, outputs)
    graph_bytes = [graph.SerializeToString()]
    for i, (k, n) in enumerate(spec.shapes):
        weight = _weight(spec, i)
        init = TensorProto(name=f"layers.{i}.weight", data_type=TensorProto.FLOAT, dims=[k, n], raw_data=weight.tobytes())
        del weight
        graph_bytes.append(length_delimited(5, init.SerializeToString()))
        del init
    model = helper.make_model(helper.make_graph([], "x", [], []), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.ClearField("graph")
    body = b"".join(graph_bytes)
    del graph_bytes
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString())
        f.write(length_delimited(7, body))
    os.replace(tmp, path)
    return path


def small_spec(name: str, widths: Sequence[int], *, external: bool, seed: int = 0) -> StackSpec:
    """A stack of any widths (for tests)."""
    return StackSpec(name, tuple(widths), external, seed)
