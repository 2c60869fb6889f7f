"""Does the automatic search carry over to LeNets trained with other seeds? (issue 21)

For each model (LeNet-300-100, LeNet-5) and each training seed, trains the
zoo's architecture with :mod:`model_zoo.train_lenet` (``--seed N``, the zoo's
recipe; cached under ``--cache``), then runs the calibration table's automatic
``--max-drop 0.5`` row on it (:func:`model_zoo.calibration_table.model_rows`:
the same 8 192 calibration images, the budget measured on test half A, half B
never seen by the search), and the same row on the zoo model itself (``zoo``,
seed 0, unless ``--no-zoo``). Printed per model and seed: the original top-1,
the ratio, the top-1 drop on the whole test set, on half A (the search's) and
on half B (held out), the wall and process CPU seconds of the search (with the
load average at its start and end), and the ratio relative to the zoo model's
(measured in the same run, or taken from ``--merge``). ``--margin`` runs the
calibration table's row with a one-standard-error margin on the drop
(``--drop-margin-se``) instead.

Usage (from the repository root)::

    python benchmarks/bench_search_seeds.py [--models lenet_300_100 lenet5] [--seeds 1] [--no-zoo]
                                            [--cache ~/.cache/onnx-dc/seeds] [--max-drop 0.5]
                                            [--json FILE] [--merge EARLIER.json ...] [--log FILE] [--margin]
                                            [--quick]

The acceptance of issue 21: every retrained model within the budget on the
whole test set and on half B (drop <= ``--max-drop``), at a ratio of at least
85 % of the zoo model's (:data:`MIN_RELATIVE_RATIO`); the table marks the rows
that miss it. ``--quick`` runs tiny grids on 500-image halves with 256 calibration
images and 1 training epoch (a smoke test, numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_CACHE = Path.home() / ".cache" / "onnx-dc" / "seeds"
MODELS = ("lenet_300_100", "lenet5")
MIN_RELATIVE_RATIO = 0.85
CALIB_SAMPLES = 8192
QUICK_CALIB_SAMPLES = 256
ZOO = "zoo"


@dataclass
class SeedRow:
    """One model's automatic search."""

    model: str
    seed: str  # "zoo" or the training seed
    original_top1: float
    ratio: float
    drop_full: float
    drop_a: float
    drop_b: float
    settings: str
    wall_seconds: float
    cpu_seconds: float
    load: str
    margin_se: float = 0.0  # the search met the budget by this many standard errors of the drop


def trained_model(name: str, seed: int, cache: Path, quick: bool = False) -> Path:
    """The ``name`` LeNet trained with ``seed`` (``cache/seed<N>/<name>.onnx``), trained first when missing."""
    directory = cache / (f"quick-seed{seed}" if quick else f"seed{seed}")
    path = directory / f"{name}.onnx"
    if not path.is_file():
        command = [sys.executable, "-m", "model_zoo.train_lenet", "--model", name, "--seed", str(seed),
                   "--out", str(directory), "--threads", "1"] + (["--epochs", "1"] if quick else [])
        print("training:", " ".join(command), file=sys.stderr, flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        print(f"trained {path} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return path


def search_row(
    name: str, seed: str, path: Path | None, max_drop: float, quick: bool, log: list[str], margin: bool = False
) -> SeedRow:
    """The calibration table's automatic ``--max-drop`` row on one model (``path`` None: the zoo's); ``margin``:
    its row with the :data:`model_zoo.calibration_table.MARGIN_SE` standard-error margin instead."""
    from model_zoo.calibration_table import MARGIN_SE, model_rows

    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    samples = QUICK_CALIB_SAMPLES if quick else CALIB_SAMPLES
    drops = ([], [max_drop]) if margin else ([max_drop], [])
    (row,) = model_rows(name, calib_samples=samples, quick=quick, max_drops=drops[0], margin_drops=drops[1],
                        automatic_only=True, model_path=path, search_logs=log)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    drop_a = 2 * row.drop_full - row.drop_final  # the halves are the same size
    return SeedRow(name, seed, row.accuracy_full + row.drop_full / 100, row.ratio, row.drop_full, drop_a,
                   row.drop_final, row.settings, wall, cpu, f"{load_before:.1f}-{os.getloadavg()[0]:.1f}",
                   MARGIN_SE if margin else 0.0)


def format_table(rows: list[SeedRow], max_drop: float) -> str:
    """The rows as markdown, zoo model first per model, with each ratio relative to the zoo model's."""
    zoo_ratio = {r.model: r.ratio for r in rows if r.seed == ZOO and not r.margin_se}
    lines = [
        ("| model | seed | original top-1 | per-layer kept / bits | ratio | vs zoo | drop, test | drop A (searched) "
         "| drop B (held out) | wall | CPU | load | |"),
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (MODELS.index(r.model), r.seed != ZOO, r.seed, r.margin_se)):
        relative = r.ratio / zoo_ratio[r.model] if r.model in zoo_ratio else None
        misses = [what for what, bad in (
            ("ratio", relative is not None and relative < MIN_RELATIVE_RATIO),
            ("budget", max(r.drop_full, r.drop_b) > max_drop + 1e-9),
        ) if bad]
        lines.append(
            f"| {r.model} | {r.seed}{f' ({r.margin_se:g}-SE margin)' if r.margin_se else ''} | {100 * r.original_top1:.2f} % | {r.settings} | {r.ratio:.1f}x "
            f"| {'-' if relative is None else f'{100 * relative:.0f} %'} | {r.drop_full:.2f} pp | {r.drop_a:.2f} pp "
            f"| {r.drop_b:.2f} pp | {r.wall_seconds:.0f} s | {r.cpu_seconds:.0f} s | {r.load} "
            f"| {'misses ' + ' and '.join(misses) if misses else 'ok'} |"
        )
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", choices=MODELS, default=list(MODELS),
                        help="models to search (none: only print the --merge files' rows)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[1], help="training seeds (the zoo's is 0)")
    parser.add_argument("--no-zoo", action="store_true", help="do not search the zoo models (use --merge for them)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the trained models are kept")
    parser.add_argument("--max-drop", type=float, default=0.5, help="budget, pp of top-1 on test half A")
    parser.add_argument("--json", type=Path, help="write the rows (with --merge's) as JSON here")
    parser.add_argument("--merge", type=Path, nargs="+", default=[],
                        help="rows of earlier runs (their --json); rows computed now replace the same model and seed")
    parser.add_argument("--log", type=Path, help="write every search's log lines here")
    parser.add_argument("--margin", action="store_true",
                        help="search with the calibration table's standard-error margin on the drop (--drop-margin-se)")
    parser.add_argument("--quick", action="store_true", help="tiny grids and data, 1 training epoch (smoke test)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train (or load) the models, search each, print the table."""
    args = _parse_args(argv)
    rows = [SeedRow(**r) for path in args.merge for r in json.loads(path.read_text())]
    log: list[str] = []
    for name in args.models:
        models = ([] if args.no_zoo else [(ZOO, None)]) + [
            (str(seed), trained_model(name, seed, args.cache, args.quick)) for seed in args.seeds
        ]
        for seed, path in models:
            row = search_row(name, seed, path, args.max_drop, args.quick, log, margin=args.margin)
            print(f"{name} seed {seed}: {row.ratio:.1f}x, drop {row.drop_full:.2f} pp (A {row.drop_a:.2f}, "
                  f"B {row.drop_b:.2f}), {row.wall_seconds:.0f} s wall, {row.cpu_seconds:.0f} s CPU, load {row.load}",
                  file=sys.stderr, flush=True)
            rows = [r for r in rows if (r.model, r.seed, r.margin_se) != (name, seed, row.margin_se)] + [row]
            _write(args, rows, log)
    _write(args, rows, log)
    print(format_table(rows, args.max_drop))
    return 0


def _write(args: argparse.Namespace, rows: list[SeedRow], log: list[str]) -> None:
    """The rows so far to ``--json`` and the search logs to ``--log`` (after every search: runs are long)."""
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    if args.log:
        args.log.write_text("\n".join(log) + "\n")


if __name__ == "__main__":
    sys.exit(main())
