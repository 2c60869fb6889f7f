"""Argument checks shared by the numeric stages (private).

Each returns the value as a plain Python number or raises
:class:`onnx_dc.errors.SettingsError` with one line naming the argument.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np

from onnx_dc.errors import SettingsError


def finite_real(value: object, name: str) -> float:
    """``value`` as a finite float; bools, strings and non-finite values are refused."""
    if isinstance(value, bool) or not isinstance(value, (Real, np.floating, np.integer)):
        raise SettingsError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise SettingsError(f"{name} must be finite, got {value}")
    return value


def fraction(value: object, name: str) -> float:
    """``value`` as a float in [0, 1]."""
    value = finite_real(value, name)
    if not 0.0 <= value <= 1.0:
        raise SettingsError(f"{name} must be in [0, 1], got {value}")
    return value
