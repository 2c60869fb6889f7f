"""The options of the calibrated fits and the settings of one fitted layer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnx_dc.calibration.capture import DEFAULT_MAX_MEMORY_BYTES
from onnx_dc.calibration.data import DEFAULT_BATCH_SIZE
from onnx_dc.calibration.layer_problem import CRITERIA, DEFAULT_DAMPING
from onnx_dc.calibration.pruning_fit import DEFAULT_OBS_RATE
from onnx_dc.codec.pruning import prune_by_std
from onnx_dc.codec.tensor import TensorSettings
from onnx_dc.errors import SettingsError

__all__ = [
    "AUTO_INDEX_BITS",
    "CalibrationOptions",
    "LayerSettings",
]


AUTO_INDEX_BITS: tuple[int, ...] = tuple(range(2, 13))
"""Relative-index widths tried when the index bits are chosen automatically (smallest container wins)."""


@dataclass(frozen=True)
class CalibrationOptions:
    """How calibration data are used.

    Attributes:
        criterion: pruning criterion, one of :data:`onnx_dc.calibration.layer_problem.CRITERIA` or ``auto``
            (per layer, the one with the lowest reconstruction error).
        refit_weights: least-squares refit of the surviving weights before clustering.
        refit_rounds: rounds of centroid refit + re-assignment (0: plain k-means).
        sequential: capture each layer's statistics with the compressed upstream layers in place.
        bias_correction: refit the layers' own biases (absorbing the mean output error).
        downstream_weighting: weight each output column of a layer's reconstruction error by
            how much it reaches the next compressed layer (:func:`downstream_column_weights`);
            layers without such a successor keep the plain objective.
        damping: ridge term of the fits, relative to the mean diagonal of ``G``.
        obs_rate: fraction of the kept weights removed per iterative OBS step.
        batch_size: samples per onnxruntime run.
        max_memory_bytes: statistics kept in memory at once (non-sequential capture).
    """

    criterion: str = "auto"
    refit_weights: bool = True
    refit_rounds: int = 8
    sequential: bool = True
    bias_correction: bool = True
    downstream_weighting: bool = True
    damping: float = DEFAULT_DAMPING
    obs_rate: float = DEFAULT_OBS_RATE
    batch_size: int = DEFAULT_BATCH_SIZE
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES

    def __post_init__(self) -> None:
        if self.criterion != "auto" and self.criterion not in CRITERIA:
            raise SettingsError(
                f"unknown pruning criterion {self.criterion!r}: expected auto or one of {', '.join(CRITERIA)}"
            )
        if isinstance(self.refit_rounds, bool) or not isinstance(self.refit_rounds, int) or self.refit_rounds < 0:
            raise SettingsError(f"refit_rounds must be an integer >= 0, got {self.refit_rounds!r}")
        if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping >= 0):
            raise SettingsError(f"damping must be a finite number >= 0, got {self.damping!r}")
        if not (isinstance(self.obs_rate, (int, float)) and 0 < self.obs_rate < 1):
            raise SettingsError(f"obs_rate must be in (0, 1), got {self.obs_rate!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SettingsError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")


@dataclass(frozen=True)
class LayerSettings:
    """Compression settings of one weight for the calibrated path.

    ``sparsity`` is the fraction removed (``quality`` is converted to it by
    the paper's rule on the original weights); ``index_bits=None`` picks the
    width giving the smallest container among :data:`AUTO_INDEX_BITS`.
    """

    sparsity: float = 0.0
    bits: int = 5
    index_bits: int | None = 5
    init: str = "linear"
    seed: int = 0

    @classmethod
    def from_resolved(cls, resolved, weight: np.ndarray | None = None) -> LayerSettings:
        """From :class:`onnx_dc.graph.settings.ResolvedSettings` (``quality`` needs the weight)."""
        sparsity = resolved.sparsity
        if sparsity is None and resolved.quality is not None:
            if weight is None:
                raise SettingsError("quality needs the weight to convert it to a sparsity")
            keep = prune_by_std(weight, resolved.quality)
            sparsity = 1.0 - np.count_nonzero(keep) / keep.size if keep.size else 0.0
        return cls(
            sparsity=float(sparsity or 0.0),
            bits=int(resolved.bits),
            index_bits=int(resolved.index_bits),
            init=str(resolved.init),
            seed=int(resolved.seed),
        )

    def tensor_settings(self, index_bits: int | None = None) -> TensorSettings:
        """The :class:`onnx_dc.codec.tensor.TensorSettings` recorded with the container."""
        chosen = index_bits if index_bits is not None else (self.index_bits if self.index_bits is not None else 5)
        return TensorSettings(sparsity=self.sparsity, bits=self.bits, index_bits=chosen, init=self.init, seed=self.seed)
