"""onnx-dc: Deep Compression (Han, Mao, Dally, ICLR 2016) for ONNX models.

Python API (each function takes a model path or an ``onnx.ModelProto``)::

    onnx_dc.compress(model, output=None, *, sparsity=..., bits=..., index_bits=..., init=..., exclude=..., min_elements=...)
    onnx_dc.decompress(model, output=None)
    onnx_dc.inspect(model)
    onnx_dc.validate(original, compressed, inputs=None, *, max_abs_diff=None, min_cosine=None)
    onnx_dc.ops_library_path()   # the custom operator library for onnxruntime
"""

from __future__ import annotations

from onnx_dc.errors import (
    CalibrationError,
    ContainerError,
    InvalidTensorError,
    LibraryNotFoundError,
    ModelError,
    OnnxDcError,
    SettingsError,
)

__version__ = "0.1.0"

from onnx_dc._library import ops_library_path  # noqa: E402
from onnx_dc.api import compress, decompress, inspect, validate  # noqa: E402


__all__ = [
    "CalibrationError",
    "ContainerError",
    "InvalidTensorError",
    "LibraryNotFoundError",
    "ModelError",
    "OnnxDcError",
    "SettingsError",
    "__version__",
    "compress",
    "decompress",
    "inspect",
    "ops_library_path",
    "validate",
]
