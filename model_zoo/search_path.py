"""Top-1 drops along the automatic search's path: where the budget really ends.

An automatic row of the calibration table returns one configuration: the most
compressed one of the search path whose drop, measured on test half A (5 000
images), meets the budget. That measurement has a standard error of about
0.2 pp, so which configuration lands at the edge of a 0.5 pp budget is partly
chance. This script shows the curve the choice was made on: it runs the same
search as the table's ``--max-drop 0.5`` row with the one-standard-error margin,
then compresses every configuration of the search path whose ratio lies in a
window for real (the full calibrated recipe, sequential, as the search's final
model) and measures each on the whole test set and on both halves, with the
standard error of every paired drop. Nothing here chooses a configuration: it
is a diagnostic of the search, and it looks at half B, which the search never does.

Usage (from the repository root)::

    python -m model_zoo.search_path [--model lenet_300_100] [--min-ratio 24] [--max-ratio 45]
                                    [--around N] [--out docs/search_path.md] [--quick]

``--around N`` compresses only the configurations within ``N`` path steps of the chosen one;
the walk along the path stops after two configurations beyond ``--max-ratio`` (sizes
decrease along the path).

Data splits are those of :mod:`model_zoo.calibration_table` (calibration: the
first 8 192 rows of the seeded training permutation; search: test half A).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from model_zoo import get_model_path
from model_zoo.calibration_table import CALIBRATION_SEED, MARGIN_SE, PAPER_SETTINGS, _write_atomic, test_halves
from model_zoo.fashion_mnist import calibration_set, evaluation_set

MAX_DROP = 0.5


@dataclass
class PathPoint:
    """One configuration of the search path, compressed for real and measured."""

    index: int
    settings: str
    ratio: float
    drop_full: float
    se_full: float
    drop_a: float
    se_a: float
    drop_b: float
    se_b: float
    chosen: bool


def paired_drop(correct_before: np.ndarray, correct_after: np.ndarray) -> tuple[float, float]:
    """Top-1 drop in percentage points and its standard error
    (:func:`onnx_dc.calibration.budget.drop_standard_error`), from per-sample correctness (paired)."""
    from onnx_dc.calibration.budget import drop_standard_error
    from onnx_dc.calibration.metrics import OutputMetrics

    before, after = float(np.mean(correct_before)), float(np.mean(correct_after))
    metrics = OutputMetrics(0.0, 1.0, accuracy=after, discordant=float(np.mean(correct_before != correct_after)))
    return 100.0 * (before - after), drop_standard_error(metrics, before, correct_before.size)


def path_points(
    name: str, *, calib_samples: int = 8192, min_ratio: float = 0.0, max_ratio: float = float("inf"),
    around: int | None = None, quick: bool = False,
) -> list[PathPoint]:
    """Search ``name`` as the table's margin row does, then compress and measure the path's configurations
    whose ratio is in ``[min_ratio, max_ratio]`` (and, with ``around``, within that many steps of the chosen one)."""
    from onnx_dc.api.convert import compress_model
    from onnx_dc.api.calibrated import compress_calibrated
    from onnx_dc.calibration.options import CalibrationOptions
    from onnx_dc.calibration.model_fit import compress_with_calibration
    from onnx_dc.calibration.data import load_calibration
    from onnx_dc.calibration.capture import run_model
    from onnx_dc.graph.restore import decompress_model
    from onnx_dc.api.recipe import CalibrationRecipe, Recipe, SearchRecipe

    model = onnx.load(str(get_model_path(name)))
    calib = calibration_set(calib_samples, seed=CALIBRATION_SEED)  # TRAINING split only
    test = evaluation_set()
    half_a, half_b = test_halves()
    if quick:
        half_a, half_b = half_a[:500], half_b[:500]
    everything = np.concatenate([half_a, half_b])
    calib_data = load_calibration({"input": calib.images}, model, max_samples=None)
    test_data = load_calibration({"input": test.images[everything]}, model, max_samples=None)
    labels = test.labels[everything]
    a_rows, b_rows = np.arange(half_a.size), np.arange(half_a.size, everything.size)
    correct0 = run_model(model, test_data)["logits"].argmax(axis=1) == labels

    grids = {"sparsities": (0.0, 0.5, 0.8), "bits": (3, 5)} if quick else {}
    # --quick: activation-aware pruning instead of the (slower) OBS path and 2 rounds of centroid refit;
    # the default recipe otherwise.
    options = CalibrationOptions(criterion="activation", refit_rounds=2) if quick else CalibrationOptions()
    started = time.perf_counter()
    recipe = Recipe(
        calibration=CalibrationRecipe(samples=None, options=options),
        search=SearchRecipe(max_drop=MAX_DROP, drop_margin_se=MARGIN_SE, **grids),
    )
    searched = compress_calibrated(
        model, recipe, calib_data, eval_data={"input": test.images[half_a], "labels": test.labels[half_a]}
    ).calibration
    print(f"{name}: search done in {time.perf_counter() - started:.0f} s, {len(searched.path)} configurations checked, "
          f"configuration {searched.chosen_index} chosen", file=sys.stderr, flush=True)

    def convert(compression):
        return compress_model(compression.model, Recipe(), tensor_compressor=compression.tensor_compressor())

    points = []
    past_window = 0
    for index, config in enumerate(searched.path):
        if around is not None and abs(index - searched.chosen_index) > around:
            continue
        built = convert(compress_with_calibration(model, calib_data, config, options))
        ratio = built.report.ratio
        # Sizes decrease along the path: two configurations past the window end the walk.
        past_window = past_window + 1 if ratio > max_ratio else 0
        if past_window >= 2:
            break
        if not min_ratio <= ratio <= max_ratio:
            continue
        runnable = onnx.ModelProto()
        runnable.CopyFrom(built.model)
        decompress_model(runnable)
        correct = run_model(runnable, test_data)["logits"].argmax(axis=1) == labels
        full, a, b = (paired_drop(correct0[rows], correct[rows]) for rows in (slice(None), a_rows, b_rows))
        described = ", ".join(
            f"{weight.split('.')[0]} {100 * (1 - s.sparsity):.0f}%/{s.bits}b" for weight, s in config.items()
        )
        points.append(PathPoint(index, described, ratio, *full, *a, *b, index == searched.chosen_index))
        print(f"{name}: configuration {index}: {ratio:.1f}x, drop {full[0]:.2f} pp (A {a[0]:.2f}, B {b[0]:.2f})",
              file=sys.stderr, flush=True)
    return points


def format_markdown(name: str, points: list[PathPoint], n_test: int) -> str:
    """The table of one model's path points."""
    lines = [
        f"**{name}**: configurations of the automatic search path (`--max-drop {MAX_DROP:g}` on half A, "
        f"{MARGIN_SE:g}-SE margin), each compressed for real; top-1 drop in pp +- one standard error on "
        f"the test set ({n_test} images) and its halves",
        "",
        "| # | per-layer kept / bits | ratio | drop, test | drop, half A (searched) | drop, half B (never searched) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for p in points:
        mark = " (chosen)" if p.chosen else ""
        lines.append(
            f"| {p.index}{mark} | {p.settings} | {p.ratio:.1f}x | {p.drop_full:.2f} +- {p.se_full:.2f} | "
            f"{p.drop_a:.2f} +- {p.se_a:.2f} | {p.drop_b:.2f} +- {p.se_b:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_zoo.search_path", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="lenet_300_100", choices=list(PAPER_SETTINGS))
    parser.add_argument("--min-ratio", type=float, default=0.0)
    parser.add_argument("--max-ratio", type=float, default=float("inf"))
    parser.add_argument("--around", type=int, help="only configurations within this many steps of the chosen one")
    parser.add_argument("--calib-samples", type=int, default=8192)
    parser.add_argument("--out", help="write the markdown table here (atomically)")
    parser.add_argument("--quick", action="store_true", help="tiny grids and data (a smoke test, numbers meaningless)")
    args = parser.parse_args(argv)
    if args.min_ratio > args.max_ratio:
        parser.error("--min-ratio is above --max-ratio")
    if args.around is not None and args.around < 0:
        parser.error("--around must be >= 0")
    points = path_points(args.model, calib_samples=args.calib_samples, min_ratio=args.min_ratio,
                         max_ratio=args.max_ratio, around=args.around, quick=args.quick)
    text = format_markdown(args.model, points, 1000 if args.quick else 10000)
    print(text)
    if args.out:
        _write_atomic(Path(args.out), text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
