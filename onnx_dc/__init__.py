"""onnx-dc: Deep Compression (Han, Mao, Dally, ICLR 2016) for ONNX models."""

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

__all__ = [
    "CalibrationError",
    "ContainerError",
    "InvalidTensorError",
    "LibraryNotFoundError",
    "ModelError",
    "OnnxDcError",
    "SettingsError",
    "__version__",
]
