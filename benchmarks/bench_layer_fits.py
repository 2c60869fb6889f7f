"""CPU time of the per-layer calibrated fits of LeNet-300-100's fc1 (784 x 300), and a digest of their results.

Captures the statistics of LeNet-300-100 on Fashion-MNIST calibration images,
builds fc1's :class:`~onnx_dc.calibration.targets.LayerTarget` as the automatic
search does, and runs :meth:`~onnx_dc.calibration.model_fit.LayerFitter.fit` at
every (sparsity, bits) pair of a grid, sparsity by sparsity and every bit width
of one sparsity in a row (the search's order). Prints the process CPU seconds
of the fits and of their hot functions, the OBS pruning path apart, and one
SHA-256 digest over every fit's codes and centroids: two runs whose digests
agree produced bit-identical fits.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_layer_fits.py [--samples 2048] [--sparsities 0.5 0.8 0.9] [--bits 2 3 4 5 6]
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (module, attribute) of the functions whose CPU time is reported (inclusive).
TIMED: list[tuple[str, str]] = [
    ("onnx_dc.calibration.sharing_fit", "refit_centroids"),
    ("onnx_dc.calibration.sharing_fit", "reassign_codes"),
    ("onnx_dc.calibration.error_feedback", "feedback_codes"),
    ("onnx_dc.calibration.error_feedback", "feedback_plans"),
    ("onnx_dc.calibration.layer_problem", "LayerProblem.error"),
]


def _instrument(totals: dict[str, float]) -> None:
    """Wrap every function of :data:`TIMED` that exists so that its process CPU time adds up in ``totals``."""
    import importlib

    for module_name, attribute in TIMED:
        module = importlib.import_module(module_name)
        owner: Any = module
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        function = getattr(owner, name, None)
        if function is None:
            continue

        def wrapper(*args: Any, _function: Callable[..., Any] = function, _label: str = attribute, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return _function(*args, **kwargs)
            finally:
                totals[_label] += time.process_time() - start

        setattr(owner, name, functools.wraps(function)(wrapper))


def fc1_fitter(samples: int) -> Any:
    """The :class:`LayerFitter` of LeNet-300-100's first layer on ``samples`` calibration images."""
    import onnx

    from model_zoo import get_model_path
    from model_zoo.calibration_table import CALIBRATION_SEED
    from model_zoo.fashion_mnist import calibration_set
    from onnx_dc.calibration.capture import capture_statistics
    from onnx_dc.calibration.data import load_calibration
    from onnx_dc.calibration.layers import find_layers
    from onnx_dc.calibration.model_fit import LayerFitter, initializer_array
    from onnx_dc.calibration.options import CalibrationOptions
    from onnx_dc.calibration.targets import layer_target

    model = onnx.load(str(get_model_path("lenet_300_100")))
    images = calibration_set(samples, seed=CALIBRATION_SEED).images
    data = load_calibration({"input": images}, model, max_samples=None)
    layers = find_layers(model)
    layer = layers[0]
    stats = capture_statistics(model, data, [layer])[layer.weight]
    weight = initializer_array(model, layer.weight)
    bias = initializer_array(model, layer.bias) if layer.bias else None
    options = CalibrationOptions()
    target = layer_target(model, layer, stats, weight, bias, options, layers=layers)
    return LayerFitter(target, weight, options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2048, help="calibration images (default 2048)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    args = parser.parse_args(argv)

    fitter = fc1_fitter(args.samples)
    totals: dict[str, float] = collections.defaultdict(float)
    _instrument(totals)
    start = time.process_time()
    fitter.prepare(args.sparsities)
    path_seconds = time.process_time() - start
    digest = hashlib.sha256()
    fit_seconds = 0.0
    print(f"{'sparsity':>8} {'bits':>4} {'E':>14} {'CPU s':>7}")
    for sparsity in args.sparsities:
        for bits in args.bits:
            start = time.process_time()
            fit = fitter.fit(sparsity, bits)
            seconds = time.process_time() - start
            fit_seconds += seconds
            for codes in fit.quantized.codes:
                digest.update(np.ascontiguousarray(codes).tobytes())
            digest.update(np.ascontiguousarray(fit.quantized.centroids).tobytes())
            print(f"{sparsity:>8.2f} {bits:>4d} {fit.error:>14.8e} {seconds:>7.2f}")
    print(f"\nOBS pruning path: {path_seconds:.2f} CPU s; fits: {fit_seconds:.2f} CPU s")
    for label, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {label:<24} {seconds:8.2f} CPU s")
    print(f"digest of codes and centroids: {digest.hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
