"""The built-in compression settings per kind of weight (no imports: the command line's help reads them).

Bits follow the paper (conv 8-bit weights and 8-bit relative indices, fully
connected 5-bit and 5-bit). The sparsities are the largest that one-shot
magnitude pruning (no retraining, no calibration) tolerates within 0.5 points
of top-1 on both zoo LeNets' validation images: ``python -m
benchmarks.default_sparsity``; the sweep and the end-to-end effect are in
docs/USAGE.md. "other" tensors (embeddings, recurrent weights) are only
quantized by default: nothing measured says how much pruning they take.

Transformers (recognised by :mod:`onnx_dc.graph.transformers`: LayerNormalization
and the like, attention operators, or attention written out) take the ``fc`` and
``other`` rows of :data:`TRANSFORMER_DEFAULTS` instead: their MatMul weights have
outlier values that even 20-30 % magnitude pruning damages (all-MiniLM-L6-v2:
embedding cosine 0.93 with the CNN defaults, below onnxruntime int8's 0.965),
while unpruned weight sharing is cheap in fidelity, and their embedding tables
(half of a small encoder's weights) keep their neighbours at 5 bits. The
transformer rows are the smallest data-free setting measured to be at least as
faithful as int8 ``quantize_dynamic`` on that model, with a margin:
``python benchmarks/transformer_settings.py defaults``; numbers in
docs/CALIBRATION.md ("Transformers").
"""

from __future__ import annotations

from typing import Any

DEFAULTS: dict[str, dict[str, Any]] = {
    "fc": {"sparsity": 0.3, "quality": None, "bits": 5, "index_bits": 5, "init": "linear"},
    "conv": {"sparsity": 0.1, "quality": None, "bits": 8, "index_bits": 8, "init": "linear"},
    "other": {"sparsity": None, "quality": None, "bits": 8, "index_bits": 8, "init": "linear"},
}

TRANSFORMER_DEFAULTS: dict[str, dict[str, Any]] = {
    "fc": {"sparsity": None, "quality": None, "bits": 5, "index_bits": 5, "init": "linear"},
    "other": {"sparsity": None, "quality": None, "bits": 5, "index_bits": 8, "init": "linear"},
}
"""The defaults of a transformer's ``fc`` and ``other`` weights (see the module docstring); conv keeps its row."""

DEFAULT_MIN_ELEMENTS = 256
"""Tensors with fewer elements are left dense unless a rule names them."""


def describe_default(setting: str) -> str:
    """The built-in default of one setting by kind, for help texts: ``fc=0.3, conv=0.1, other=none``."""
    kinds = ", ".join(f"{kind}={'none' if values[setting] is None else values[setting]}" for kind, values in DEFAULTS.items())
    transformer = ", ".join(
        f"{kind}={'none' if values[setting] is None else values[setting]}" for kind, values in TRANSFORMER_DEFAULTS.items()
    )
    return f"{kinds}; in a transformer {transformer}"
