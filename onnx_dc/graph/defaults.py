"""The built-in compression settings per kind of weight (no imports: the command line's help reads them).

Bits follow the paper (conv 8-bit weights and 8-bit relative indices, fully
connected 5-bit and 5-bit). The sparsities are the largest that one-shot
magnitude pruning (no retraining, no calibration) tolerates within 0.5 points
of top-1 on both zoo LeNets' validation images: ``python -m
benchmarks.default_sparsity``; the sweep and the end-to-end effect are in
docs/USAGE.md. "other" tensors (embeddings, recurrent weights) are only
quantized by default: nothing measured says how much pruning they take.
"""

from __future__ import annotations

from typing import Any

DEFAULTS: dict[str, dict[str, Any]] = {
    "fc": {"sparsity": 0.3, "quality": None, "bits": 5, "index_bits": 5, "init": "linear"},
    "conv": {"sparsity": 0.1, "quality": None, "bits": 8, "index_bits": 8, "init": "linear"},
    "other": {"sparsity": None, "quality": None, "bits": 8, "index_bits": 8, "init": "linear"},
}

DEFAULT_MIN_ELEMENTS = 256
"""Tensors with fewer elements are left dense unless a rule names them."""


def describe_default(setting: str) -> str:
    """The built-in default of one setting by kind, for help texts: ``fc=0.3, conv=0.1, other=none``."""
    return ", ".join(f"{kind}={'none' if values[setting] is None else values[setting]}" for kind, values in DEFAULTS.items())
