"""The user-facing top: the Python API, the command line, the reports.

:mod:`~onnx_dc.api.functions` holds ``compress``, ``decompress``, ``inspect``,
``validate`` and ``sensitivity``; :mod:`~onnx_dc.api.convert` is the conversion
every compression ends with; :mod:`~onnx_dc.api.calibrated` joins the calibration
layer to it; :mod:`~onnx_dc.api.report` and :mod:`~onnx_dc.api.validation` are the
per-layer table and the output comparison; :mod:`~onnx_dc.api.cli` is ``onnx-dc``.
Imports every layer below.
"""

from __future__ import annotations

from onnx_dc.api.convert import CompressionResult
from onnx_dc.api.functions import compress, decompress, inspect, sensitivity, validate

__all__ = ["CompressionResult", "compress", "decompress", "inspect", "sensitivity", "validate"]
