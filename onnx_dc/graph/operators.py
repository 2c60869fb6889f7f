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
    "GATHER_OP",
    "MATMUL_OP",
    "META_ABSORBED",
    "META_ADDED",
    "META_ATTRS",
    "META_KEPT",
    "META_KIND",
    "META_NAME",
    "META_OP",
    "META_SOURCE",
    "MODEL_META_RUNTIME",
    "MODEL_META_VERSION",
    "OPSET_VERSION",
    "ACTIVATION_ATTRIBUTE",
    "MATMUL_PRECISIONS",
    "RUNTIME_ACTIVATIONS",
    "RUNTIME_HAS_GATHER",
    "RUNTIME_HINT",
]


DOMAIN = "ai.onnx_dc"
OPSET_VERSION = 1
MATMUL_OP = "DCMatMul"
CONV_OP = "DCConv"
GATHER_OP = "DCGather"  # proposed: DCGather(container, indices), ONNX Gather axis 0 (docs/OPERATORS.md)
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
META_ABSORBED = "onnx_dc.absorbed"  # on a fused node: ".1", ".2"... the nodes it absorbed (onnx_dc.graph.fusion)
META_TRANSPOSE = "onnx_dc.transpose"  # on a DCMatMul: the Transpose node it absorbed (serialized)

# The fused activations the runtime implements, per operator (docs/OPERATORS.md,
# "Fused activations"): the converter writes ``activation`` (the runtime's name
# of the kind, ACTIVATION_ATTRIBUTE) and ``activation_params`` only for the
# kinds listed here. Relu after DCMatMul is fused as ``relu = 1``.
_ALL_ACTIVATIONS = frozenset(
    {"Relu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "SiLU", "LeakyRelu", "Tanh", "Gelu", "FastGelu"}
)
RUNTIME_ACTIVATIONS: dict[str, frozenset[str]] = {
    MATMUL_OP: _ALL_ACTIVATIONS - {"Relu"},
    CONV_OP: _ALL_ACTIVATIONS,
}
ACTIVATION_ATTRIBUTE: dict[str, str] = {
    "Relu": "relu", "Clip": "clip", "HardSigmoid": "hard_sigmoid", "HardSwish": "hard_swish", "Sigmoid": "sigmoid",
    "SiLU": "silu", "LeakyRelu": "leaky_relu", "Tanh": "tanh", "Gelu": "gelu", "FastGelu": "gelu_tanh",
}
"""The ``activation`` attribute value of each kind :mod:`onnx_dc.graph.activations` recognises."""
RUNTIME_HAS_GATHER = True  # Gather(W, indices) on a compressed W runs as DCGather

# Model-level metadata_props written by the converter (the recipe is onnx_dc.api.recipe.METADATA_KEY).
MODEL_META_VERSION = "onnx_dc.version"  # the onnx-dc version that compressed the model
MODEL_META_RUNTIME = "onnx_dc.runtime"  # how to run it: removed by decompression, which no longer needs it
RUNTIME_HINT = (
    "needs the onnx-dc operator library for its ai.onnx_dc operators: pip install onnx-dc, then "
    "onnx_dc.inference_session(path), or SessionOptions.register_custom_ops_library(onnx_dc.ops_library_path()); "
    "onnx-dc decompress writes a standard ONNX model instead"
)

# DCMatMul's ``precision`` attribute: "float" (float32 arithmetic throughout) or "bf16x3" (three bfloat16
# passes on AMX tiles where the CPU has them, within about 1e-5 of the largest output; float32 elsewhere).
MATMUL_PRECISIONS: tuple[str, ...] = ("float", "bf16x3")

# Gemm's defaults, written explicitly on DCMatMul nodes.
DEFAULT_ALPHA = 1.0
DEFAULT_BETA = 1.0
