"""onnx-dc: Deep Compression (Han, Mao, Dally, ICLR 2016) for ONNX models.

Python API (each function takes a model path or an ``onnx.ModelProto``)::

    onnx_dc.compress(model, output=None, recipe=None, *, calib=None, eval_data=None, ...)
    onnx_dc.decompress(model, output=None)
    onnx_dc.inspect(model)
    onnx_dc.validate(original, compressed, inputs=None, *, max_abs_diff=None, min_cosine=..., min_top1_agreement=...)
    onnx_dc.sensitivity(model, calib, ...)
    onnx_dc.ops_library_path()   # the custom operator library for onnxruntime
    onnx_dc.session_options()    # onnxruntime SessionOptions with it registered
    onnx_dc.inference_session(path)   # a ready onnxruntime InferenceSession for a compressed model

The package is layered, each layer a subpackage importing only the ones below:
:mod:`onnx_dc.api` (this API, the command line, reports) -> :mod:`onnx_dc.calibration`
(fits to sample inputs, the automatic search) -> :mod:`onnx_dc.graph` (ONNX models
around the containers) -> :mod:`onnx_dc.codec` (numpy: pruning, weight sharing,
relative indices, Huffman coding, the container format). docs/ARCHITECTURE.md
walks through them. The names below are imported when first used, so that
``import onnx_dc`` (and the command line's start) stays cheap.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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

_LAZY: dict[str, str] = {
    "compress": "onnx_dc.api.functions",
    "decompress": "onnx_dc.api.functions",
    "inspect": "onnx_dc.api.functions",
    "validate": "onnx_dc.api.functions",
    "sensitivity": "onnx_dc.api.functions",
    "CompressionResult": "onnx_dc.api.convert",
    "ops_library_path": "onnx_dc.graph.library",
    "session_options": "onnx_dc.graph.library",
    "inference_session": "onnx_dc.graph.library",
}

if TYPE_CHECKING:
    from onnx_dc.api.convert import CompressionResult
    from onnx_dc.api.functions import (
        compress,
        decompress,
        inspect,
        sensitivity,
        validate,
    )
    from onnx_dc.graph.library import inference_session, ops_library_path, session_options


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a package whose public ``names`` (name -> module) load on first use.

    Each package of onnx-dc re-exports its API this way, so that importing a
    package (or starting the command line) imports nothing heavy.
    """
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "CalibrationError",
    "CompressionResult",
    "ContainerError",
    "InvalidTensorError",
    "LibraryNotFoundError",
    "ModelError",
    "OnnxDcError",
    "SettingsError",
    "__version__",
    "compress",
    "decompress",
    "inference_session",
    "inspect",
    "ops_library_path",
    "sensitivity",
    "session_options",
    "validate",
]
