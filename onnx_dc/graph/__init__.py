"""The graph layer: ONNX models around the codec's containers.

:mod:`~onnx_dc.graph.model_io` loads and writes models (external data, atomic
writes); :mod:`~onnx_dc.graph.weights` finds the weights and how each is used;
:mod:`~onnx_dc.graph.settings` decides per weight what to do with it;
:mod:`~onnx_dc.graph.rewrite` replaces weights by containers and their consumers
by the ``ai.onnx_dc`` operators (:mod:`~onnx_dc.graph.operators`), with
:mod:`~onnx_dc.graph.fusion` folding activations in; :mod:`~onnx_dc.graph.restore`
turns a compressed model back into standard ONNX; :mod:`~onnx_dc.graph.library`
finds the C++ operator library. Imports only the codec layer; the names below load on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnx_dc import lazy_exports

_LAZY: dict[str, str] = {
    "ops_library_path": "onnx_dc.graph.library",
    "load_model": "onnx_dc.graph.model_io",
    "save_model": "onnx_dc.graph.model_io",
    "decompress_model": "onnx_dc.graph.restore",
    "find_containers": "onnx_dc.graph.restore",
    "apply_compression": "onnx_dc.graph.rewrite",
    "CompressionSettings": "onnx_dc.graph.settings",
    "parse_settings": "onnx_dc.graph.settings",
    "Weight": "onnx_dc.graph.weights",
    "find_weights": "onnx_dc.graph.weights",
}

if TYPE_CHECKING:
    from onnx_dc.graph.library import ops_library_path
    from onnx_dc.graph.model_io import load_model, save_model
    from onnx_dc.graph.restore import decompress_model, find_containers
    from onnx_dc.graph.rewrite import apply_compression
    from onnx_dc.graph.settings import CompressionSettings, parse_settings
    from onnx_dc.graph.weights import Weight, find_weights

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "CompressionSettings",
    "Weight",
    "apply_compression",
    "decompress_model",
    "find_containers",
    "find_weights",
    "load_model",
    "ops_library_path",
    "parse_settings",
    "save_model",
]
