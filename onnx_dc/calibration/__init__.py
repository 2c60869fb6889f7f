"""The calibration layer: layers fitted to sample inputs, sensitivity, and the automatic search.

:mod:`~onnx_dc.calibration.data` reads calibration data; :mod:`~onnx_dc.calibration.layers`
finds the layers whose inputs can be captured; :mod:`~onnx_dc.calibration.capture`
runs the model and accumulates each layer's input statistics. The per-layer fits
(numpy only): :mod:`~onnx_dc.calibration.layer_problem` (the least-squares objective),
:mod:`~onnx_dc.calibration.pruning_fit` (which weights to remove, refit of the rest),
:mod:`~onnx_dc.calibration.sharing_fit` (the codebook fitted to the outputs). Over the
model: :mod:`~onnx_dc.calibration.targets` (what each fit aims at),
:mod:`~onnx_dc.calibration.model_fit` (every layer, plain or sequential),
:mod:`~onnx_dc.calibration.subgraphs` (the calibration view: If branches the data take
inlined, subgraph weights lifted), :mod:`~onnx_dc.calibration.proxies` (weights without
statistics searched by the model's output error),
:mod:`~onnx_dc.calibration.sensitivity`, and the automatic search
(:mod:`~onnx_dc.calibration.search` with :mod:`~onnx_dc.calibration.search_path` and
:mod:`~onnx_dc.calibration.budget`), whose candidates are compared by
:mod:`~onnx_dc.calibration.metrics`. Imports the graph and codec layers.
"""

from __future__ import annotations

from onnx_dc.calibration.budget import Budget
from onnx_dc.calibration.data import DEFAULT_MAX_SAMPLES, CalibrationData, load_calibration
from onnx_dc.calibration.model_fit import CalibratedCompression, compress_with_calibration
from onnx_dc.calibration.options import CalibrationOptions, LayerSettings
from onnx_dc.calibration.search import AutotuneResult, autotune
from onnx_dc.calibration.subgraphs import CalibrationView, calibration_view

__all__ = [
    "DEFAULT_MAX_SAMPLES",
    "AutotuneResult",
    "Budget",
    "CalibratedCompression",
    "CalibrationData",
    "CalibrationOptions",
    "CalibrationView",
    "LayerSettings",
    "autotune",
    "calibration_view",
    "compress_with_calibration",
    "load_calibration",
]
