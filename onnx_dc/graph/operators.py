"""The ``ai.onnx_dc`` operators as the converter writes them: domain, names, metadata keys.

The C++ library that implements them (runtime/) is found by
:func:`onnx_dc.graph.library.ops_library_path`; docs/OPERATORS.md specifies
every operator.
"""

from __future__ import annotations

import onnx

__all__ = [
    "CONTAINER_SUFFIX",
    "CONV_OP",
    "DECOMPRESS_OPS",
    "DOMAIN",
    "MATMUL_OP",
    "META_ADDED",
    "META_ATTRS",
    "META_KEPT",
    "META_KIND",
    "META_NAME",
    "META_OP",
    "META_SOURCE",
    "OPSET_VERSION",
]


DOMAIN = "ai.onnx_dc"
OPSET_VERSION = 1
MATMUL_OP = "DCMatMul"
CONV_OP = "DCConv"
# Operators that read a container as input 1 and compute with it directly.
_FUSED_OPS = frozenset({MATMUL_OP, CONV_OP})
# onnxruntime custom operators declare their output type statically, so the
# runtime has one decompress operator per element type (docs/OPERATORS.md).
DECOMPRESS_OPS: dict[int, str] = {
    onnx.TensorProto.FLOAT: "DCDecompress",
    onnx.TensorProto.FLOAT16: "DCDecompressFloat16",
    onnx.TensorProto.DOUBLE: "DCDecompressDouble",
    onnx.TensorProto.BFLOAT16: "DCDecompressBFloat16",
}
_DECOMPRESS_NAMES = frozenset(DECOMPRESS_OPS.values())
CONTAINER_SUFFIX = "__dc"

META_NAME = "onnx_dc.name"  # on a container: the original tensor's name
META_KIND = "onnx_dc.kind"  # on a container: fc / conv / other
META_OP = "onnx_dc.op"  # on a DCMatMul node: MatMul or Gemm; on a DCConv node: Conv
META_ATTRS = "onnx_dc.attrs"  # on a DCMatMul node: attributes the original Gemm set explicitly
META_ADDED = "onnx_dc.added"  # on value_info entries the converter added
META_SOURCE = "onnx_dc.source"  # on a container: initializer / constant
META_KEPT = "onnx_dc.kept"  # on a container: the number of weights it keeps (read by the report)

# Gemm's defaults, written explicitly on DCMatMul nodes.
DEFAULT_ALPHA = 1.0
DEFAULT_BETA = 1.0
