"""The user-facing top: the Python API, the command line, the reports.

:mod:`~onnx_dc.api.functions` holds ``compress``, ``decompress``, ``inspect``,
``validate`` and ``sensitivity``; :mod:`~onnx_dc.api.convert` is the conversion
every compression ends with; :mod:`~onnx_dc.api.calibrated` joins the calibration
layer to it; :mod:`~onnx_dc.api.report` and :mod:`~onnx_dc.api.validation` are the
per-layer table and the output comparison; :mod:`~onnx_dc.api.cli` is ``onnx-dc``.
Imports every layer below, each name on first use (the command line starts without them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnx_dc import lazy_exports

_LAZY: dict[str, str] = {
    "CompressionResult": "onnx_dc.api.convert",
    "compress": "onnx_dc.api.functions",
    "decompress": "onnx_dc.api.functions",
    "inspect": "onnx_dc.api.functions",
    "sensitivity": "onnx_dc.api.functions",
    "validate": "onnx_dc.api.functions",
}

if TYPE_CHECKING:
    from onnx_dc.api.convert import CompressionResult
    from onnx_dc.api.functions import compress, decompress, inspect, sensitivity, validate

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = ["CompressionResult", "compress", "decompress", "inspect", "sensitivity", "validate"]
