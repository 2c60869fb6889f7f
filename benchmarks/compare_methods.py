"""The compression methods the side-by-side benchmark (``benchmarks/compare.py``) puts next to each other.

Each method turns the original ONNX file into a :class:`Candidate`: the bytes a user
would store or ship, and the ONNX model onnxruntime runs from them (for the zstd row
that is the original again, after decompression). A method that cannot handle a model
returns a candidate with ``failure`` set (what went wrong, in one line) instead of
raising, so the table shows it.

Peers (what users would pick instead of onnx-dc):

* ``zstd -19``: the original file compressed with ``zstandard`` at level 19.
* ``quantize_dynamic``: onnxruntime's int8 dynamic quantization
  (``onnxruntime.quantization.quantize_dynamic``, default options: signed int8
  weights, per-tensor scales, every supported op type). It refuses models whose
  weights are ``Constant`` nodes (PaddlePaddle exports), so it is run twice on
  those: on the file as it is (the failure is reported) and after the documented
  pre-step :func:`constants_to_initializers`.
* ``MatMulNBits 4-bit`` and ``8-bit``: onnxruntime's block-wise weight-only quantizer
  (``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``,
  RTN, block 32, symmetric; onnxruntime 1.32's ``MatMulNBits`` kernel runs both
  widths on CPU). It quantizes ``MatMul`` nodes with a constant 2-D weight only;
  on models whose fully connected layers are ``Gemm`` (the LeNets) the pre-step
  :func:`gemm_to_matmul` rewrites them first. Everything else stays float32:
  embeddings (``Gather``), a tied LM head (``Gemm`` reading the embedding),
  convolutions. Models with no MatMul weight at all get an "n/a" row.

onnx-dc itself runs through :func:`onnx_dc_candidate` (the converter, with the
settings of ``benchmarks/dc_settings.py``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = [
    "Candidate",
    "constants_to_initializers",
    "gemm_to_matmul",
    "has_constant_weights",
    "matmul_nbits_candidate",
    "onnx_dc_candidate",
    "original_candidate",
    "quantize_dynamic_candidate",
    "zstd_candidate",
]

ZSTD_LEVEL = 19
NBITS_BLOCK_SIZE = 32


@dataclass
class Candidate:
    """One method's result on one model.

    Attributes:
        method: the row label, e.g. ``"quantize_dynamic int8"``.
        family: ``"original"``, ``"peer"`` or ``"onnx-dc"`` (plot colours, target checks).
        stored_bytes: size of what is stored/shipped (the file, or the zstd frame).
        model_bytes: the serialized ONNX model onnxruntime runs (None when failed).
        needs_library: run with the onnx-dc operator library registered.
        failure: one line when the method could not produce a model (then nothing is measured).
        notes: pre-steps and other facts the table should show.
        build_seconds: wall time of the compression step.
        decompressed_bytes: onnx-dc only, the model after ``onnx_dc.decompress`` (standard ONNX).
        details: method-specific facts for the JSON (e.g. onnx-dc's weight ratio).
    """

    method: str
    family: str
    stored_bytes: int = 0
    model_bytes: bytes | None = None
    needs_library: bool = False
    failure: str | None = None
    notes: list[str] = field(default_factory=list)
    build_seconds: float = 0.0
    decompressed_bytes: bytes | None = None
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the method produced a runnable model."""
        return self.failure is None and self.model_bytes is not None


# --------------------------------------------------------------------------- pre-steps


def has_constant_weights(model: onnx.ModelProto) -> bool:
    """True when a floating-point tensor of at least 2 dimensions lives in a ``Constant`` node of the main graph."""
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for attribute in node.attribute:
            if attribute.name == "value" and len(attribute.t.dims) >= 2 and attribute.t.data_type in _FLOAT_TYPES:
                return True
    return False


def constants_to_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``onnx_dc.graph.model_io.constants_to_initializers`` (a copy of ``model`` whose main-graph
    ``Constant`` tensors became initializers), with the number of nodes it converted."""
    from onnx_dc.graph.model_io import constants_to_initializers as convert

    converted = convert(model)
    return converted, _count_ops(model, {"Constant"}) - _count_ops(converted, {"Constant"})


def gemm_to_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose ``Gemm`` nodes with a constant weight became ``MatMul`` (+ ``Add`` for the bias).

    Only the plain case is rewritten: ``alpha = beta = 1``, ``transA = 0``, ``B`` an
    initializer used by that node alone (``transB = 1`` stores the transposed copy).
    ``Y = A @ B' + C`` is computed in the same order, so outputs match to float rounding.

    Returns:
        The new model and the number of Gemm nodes rewritten.
    """
    converted = copy.deepcopy(model)
    graph = converted.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes = []
    count = 0
    for node in graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            node.op_type == "Gemm"
            and len(node.input) >= 2
            and node.input[1] in initializers
            and uses.get(node.input[1], 0) == 1
            and attributes.get("alpha", 1.0) == 1.0
            and attributes.get("beta", 1.0) == 1.0
            and attributes.get("transA", 0) == 0
        )
        if not plain:
            nodes.append(node)
            continue
        weight = initializers[node.input[1]]
        values = numpy_helper.to_array(weight)
        if attributes.get("transB", 0):
            weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values.T), weight.name))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = node.output[0] + "_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], node.input[1]], [product], name=node.name + "_matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name + "_bias"))
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return converted, count


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


# --------------------------------------------------------------------------- methods


def original_candidate(original: bytes) -> Candidate:
    """The unmodified file."""
    return Candidate("original", "original", stored_bytes=len(original), model_bytes=original)


def zstd_candidate(original: bytes, level: int = ZSTD_LEVEL) -> Candidate:
    """The original file compressed with zstd; the model run is the decompressed frame (checked equal)."""
    import zstandard

    started = time.perf_counter()
    frame = zstandard.ZstdCompressor(level=level).compress(original)
    seconds = time.perf_counter() - started
    restored = zstandard.ZstdDecompressor().decompress(frame)
    if restored != original:
        return Candidate(f"zstd -{level}", "peer", failure="zstd round trip changed the bytes")
    del restored  # equal to the original: run those bytes (one copy less of a large model)
    return Candidate(
        f"zstd -{level}",
        "peer",
        stored_bytes=len(frame),
        model_bytes=original,
        build_seconds=seconds,
        notes=["file compressed with zstandard; decompressed before loading (same model)"],
    )


def quantize_dynamic_candidate(model: onnx.ModelProto, workdir: Path, *, pre_step: bool) -> Candidate:
    """onnxruntime's ``quantize_dynamic`` (int8 weights), on the model as is or after :func:`constants_to_initializers`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    label = "quantize_dynamic int8" + (" (Constant->initializer)" if pre_step else "")
    notes = []
    if pre_step:
        model, count = constants_to_initializers(model)
        notes.append(f"pre-step: {count} Constant nodes turned into initializers (onnx-dc reads them in place)")
    source = workdir / "qdyn_input.onnx"
    target = workdir / "qdyn_output.onnx"
    onnx.save(model, str(source))
    started = time.perf_counter()
    try:
        with _quiet():
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    except Exception as exc:  # report any quantizer failure in the table, as a user would see it
        return Candidate(label, "peer", failure=f"{type(exc).__name__}: {_first_line(exc)}", notes=notes)
    seconds = time.perf_counter() - started
    data = target.read_bytes()
    quantized_ops = _count_ops(onnx.load_from_string(data), {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"})
    notes.append(f"quantized op nodes: {quantized_ops}")
    return Candidate(label, "peer", stored_bytes=len(data), model_bytes=data, build_seconds=seconds, notes=notes)


def matmul_nbits_candidate(model: onnx.ModelProto, bits: int = 4) -> Candidate:
    """onnxruntime's ``MatMulNBits`` weight-only quantizer with ``bits`` (4 or 8) bits (RTN, block 32, symmetric).

    Constant-node weights are turned into initializers and plain Gemm nodes into
    MatMul + Add first (both documented pre-steps): the quantizer only looks at
    MatMul nodes whose weight is an initializer.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    label = f"MatMulNBits {bits}-bit"
    notes = []
    if has_constant_weights(model):
        model, count = constants_to_initializers(model)
        notes.append(f"pre-step: {count} Constant nodes -> initializers")
    model, gemms = gemm_to_matmul(model)
    if gemms:
        notes.append(f"pre-step: {gemms} Gemm -> MatMul + Add")
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    matmul_weights = [
        node.input[1]
        for node in model.graph.node
        if node.op_type == "MatMul" and node.input[1] in initializers and len(initializers[node.input[1]].dims) == 2
    ]
    if not matmul_weights:
        return Candidate(label, "peer", failure="n/a: no MatMul with a constant weight (only Conv layers)", notes=notes)
    started = time.perf_counter()
    try:
        with _quiet():
            quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=NBITS_BLOCK_SIZE, is_symmetric=True)
            quantizer.process()
    except Exception as exc:
        return Candidate(label, "peer", failure=f"{type(exc).__name__}: {_first_line(exc)}", notes=notes)
    seconds = time.perf_counter() - started
    data = quantizer.model.model.SerializeToString()
    count = _count_ops(quantizer.model.model, {"MatMulNBits"})
    notes.append(f"{count} of {len(matmul_weights)} MatMul weights quantized; every other weight stays float32")
    return Candidate(label, "peer", stored_bytes=len(data), model_bytes=data, build_seconds=seconds, notes=notes)


def onnx_dc_candidate(
    label: str,
    model: onnx.ModelProto,
    compress: Callable[[onnx.ModelProto], object],
    *,
    notes: list[str] | None = None,
) -> Candidate:
    """Run an onnx-dc compression (``compress(model) -> CompressionResult``) and decompress its output.

    ``stored_bytes`` is the serialized compressed model (what ``onnx-dc compress``
    writes); ``decompressed_bytes`` the standard-ONNX model ``onnx_dc.decompress``
    makes from it, run without the operator library.
    """
    import onnx_dc
    from onnx_dc.errors import OnnxDcError

    started = time.perf_counter()
    try:
        result = compress(model)
    except OnnxDcError as exc:
        return Candidate(label, "onnx-dc", failure=f"{type(exc).__name__}: {exc}", notes=list(notes or []))
    seconds = time.perf_counter() - started
    data = result.model.SerializeToString()
    plain = onnx_dc.decompress(result.model).SerializeToString()
    report = result.report.to_dict()
    details = {
        "weights_ratio": report.get("ratio"),
        "weights_original_bytes": report.get("original_bytes"),
        "weights_compressed_bytes": report.get("compressed_bytes"),
        "compressed_tensors": len(report.get("tensors", [])),
    }
    return Candidate(
        label,
        "onnx-dc",
        stored_bytes=len(data),
        model_bytes=data,
        needs_library=True,
        build_seconds=seconds,
        decompressed_bytes=plain,
        notes=list(notes or []),
        details=details,
    )


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence onnxruntime.quantization's logging (pre-processing advice, per-node info) for the duration."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _count_ops(model: onnx.ModelProto, op_types: set[str]) -> int:
    return sum(1 for node in model.graph.node if node.op_type in op_types)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
