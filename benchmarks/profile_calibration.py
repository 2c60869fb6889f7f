"""Where the minutes of calibration and the automatic search go: a stage profile of one case.

Runs ``onnx_dc.compress(..., calib=...)`` (optionally with a budget) on a zoo model
and times its stages: every function of the table :data:`STAGES` is wrapped by a
timer (wall and process CPU time, inclusive and exclusive of the timed stages
nested in it; per layer shape where the stage works on one layer). The wrappers
only measure: the code that runs is the package's own. Optionally the whole case
also runs under cProfile or pyinstrument for the hot lines.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/profile_calibration.py lenet-auto            # LeNet-300-100, --max-drop 0.5
    PYTHONPATH=. python benchmarks/profile_calibration.py lenet-calib           # LeNet-300-100, --calib alone
    PYTHONPATH=. python benchmarks/profile_calibration.py cls-calib  --samples 128  # ppocr-mobile-v2-cls, --calib alone
    PYTHONPATH=. python benchmarks/profile_calibration.py cls-auto   --samples 128  # ... --min-cosine 0.999
    PYTHONPATH=. python benchmarks/profile_calibration.py rec-calib  --samples 64   # ppocrv4-rec, --calib alone
    PYTHONPATH=. python benchmarks/profile_calibration.py minilm-calib --samples 64 # minilm-l6, --calib alone
    PYTHONPATH=. python benchmarks/profile_calibration.py minilm-auto  --samples 64 # ... --min-cosine 0.999
    PYTHONPATH=. python benchmarks/profile_calibration.py silero-auto --samples 256 # silero-vad (If branches, LSTM)

Options: ``--per-layer N`` prints the N costliest per-layer rows
below the stage table; ``--limit-seconds S`` stops the case after S seconds of wall time and
prints the breakdown so far (the status line says so); ``--json FILE`` writes
the breakdown; ``--jobs N`` is compress's (layers fitted at once without sequential
capture; ``--jobs 1`` makes the stage CPU times add up); ``--cprofile FILE`` /
``--pyinstrument FILE.html`` profile the whole case. The load average is printed with the result: on a shared machine
the CPU times are the comparable figures, wall times depend on the other jobs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib
import json
import os
import resource
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _shape(layer: Any) -> str:
    groups = getattr(layer, "groups", 1)
    return f"{layer.op} {'x'.join(map(str, layer.weight_shape))}" + (f"/g{groups}" if groups != 1 else "")


def _run_kind(*_args: Any, **kwargs: Any) -> str:
    """Which search step a WeightSwapRunner.run serves (from the calling function's name)."""
    caller = sys._getframe(2).f_code.co_name
    kind = {"_assembled_metrics": "path check", "_reference_run": "reference"}.get(caller, "candidate")
    return f"search: onnxruntime run, {kind}"


Label = str | Callable[..., str]
STAGES: list[tuple[str, str, Label]] = [
    # (module, attribute or Class.method, label or label(*args, **kwargs))
    ("onnx_dc.calibration.subgraphs", "calibration_view", "prepare: calibration view (If inlining)"),
    ("onnx_dc.calibration.capture", "capture_statistics",
     lambda model, data, layers, **k: "capture: statistics, "
     + ("sequential (1 layer, 2 models)" if k.get("reference") is not None else f"{len(layers)} layer(s) at once")),
    ("onnx_dc.calibration.sequential_capture", "SequentialCapture.capture",
     "capture: statistics, sequential from cached values (1 layer, 2 models)"),
    ("onnx_dc.calibration.capture", "_Runner.__init__", "capture: session build (model copy, shape inference)"),
    ("onnx_dc.calibration.capture", "_Runner.run", "capture: onnxruntime run"),
    ("onnx_dc.calibration.capture", "LayerStatistics.update", lambda self, *a, **k: f"capture: Gram update [{_shape(self.layer)}]"),
    ("onnx_dc.calibration.layers", "LayerSpec.rows", lambda self, *a, **k: f"capture: rows / im2col [{self.op}]"),
    ("onnx_dc.calibration.weight_swap", "WeightSwapRunner.__init__", "search: session build"),
    ("onnx_dc.calibration.weight_swap", "WeightSwapRunner.run", _run_kind),
    ("onnx_dc.calibration.targets", "layer_target", lambda model, layer, *a, **k: f"fit: target [{_shape(layer)}]"),
    ("onnx_dc.calibration.model_fit", "LayerFitter.prepare", lambda self, *a, **k: f"search fit: OBS path [{_shape(self.layer)}]"),
    ("onnx_dc.calibration.model_fit", "LayerFitter._pruned", lambda self, *a, **k: f"search fit: pruning [{_shape(self.layer)}]"),
    ("onnx_dc.calibration.model_fit", "LayerFitter.fit", lambda self, *a, **k: f"search fit: candidate [{_shape(self.layer)}]"),
    ("onnx_dc.calibration.model_fit", "LayerFitter.tensor", lambda self, *a, **k: f"search fit: container [{_shape(self.layer)}]"),
    ("onnx_dc.calibration.proxies", "proxy_candidates", lambda model, proxy, *a, **k: f"search: proxy candidates [{proxy.op} {'x'.join(map(str, proxy.weight_shape))}]"),
    ("onnx_dc.calibration.model_fit", "compress_with_calibration", "final: compress_with_calibration"),
    ("onnx_dc.calibration.model_fit", "fit_one_layer", lambda target, *a, **k: f"final fit [{_shape(target.layer)}]"),
    ("onnx_dc.calibration.model_fit", "plain_tensor", "plain path (weights without statistics)"),
    ("onnx_dc.calibration.model_fit", "_encode_best", "container: index-bit scan"),
    ("onnx_dc.calibration.pruning_fit", "pruning_path", "numeric: OBS pruning_path"),
    ("onnx_dc.calibration.pruning_fit", "refit_weights", "numeric: refit_weights"),
    ("onnx_dc.calibration.pruning_fit", "select_mask", "numeric: select_mask"),
    ("onnx_dc.calibration.sharing_fit", "_CentroidSystems.refit", "numeric: refit_centroids"),
    ("onnx_dc.calibration.sharing_fit", "reassign_codes", "numeric: reassign_codes"),
    ("onnx_dc.calibration.error_feedback", "_FeedbackPlan._factor", "numeric: error-feedback factors"),
    ("onnx_dc.calibration.error_feedback", "feedback_codes", "numeric: error-feedback rounding"),
    ("onnx_dc.calibration.layer_problem", "LayerProblem.error", "numeric: LayerProblem.error"),
    ("onnx_dc.api.convert", "compress_model", "convert: compress_model"),
    ("onnx_dc.calibration.capture", "run_model", "final: end-to-end run of the written model"),
]


class Timers:
    """Inclusive and exclusive wall/CPU time per stage label.

    Stages nest per thread (layers fitted in threads: ``compress(jobs=N)``). CPU time is
    the process's in the main thread and the thread's own in the others, so a stage run in
    a fit thread counts its own work only, while the main thread's stages around the fits
    (``final: compress_with_calibration``) include the fit threads' CPU as their own.
    """

    def __init__(self) -> None:
        self.inclusive: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
        self.exclusive: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
        self.local = threading.local()
        self.lock = threading.Lock()
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    @contextlib.contextmanager
    def time(self, name: str) -> Iterator[None]:
        stack = self.local.__dict__.setdefault("stack", [])
        clock = time.process_time if threading.current_thread() is threading.main_thread() else time.thread_time
        stack.append([0.0, 0.0])
        wall, cpu = time.perf_counter(), clock()
        try:
            yield
        finally:
            dw, dc = time.perf_counter() - wall, clock() - cpu
            child = stack.pop()
            with self.lock:
                row = self.inclusive[name]
                row[0] += dw
                row[1] += dc
                row[2] += 1
                self.exclusive[name][0] += dw - child[0]
                self.exclusive[name][1] += dc - child[1]
            if stack:
                stack[-1][0] += dw
                stack[-1][1] += dc

    def report(self) -> dict[str, Any]:
        wall, cpu = time.perf_counter() - self.wall0, time.process_time() - self.cpu0
        rows = [
            {"stage": name, "calls": int(n), "wall_s": w, "cpu_s": c,
             "exclusive_wall_s": self.exclusive[name][0], "exclusive_cpu_s": self.exclusive[name][1],
             "cpu_percent": 100.0 * c / cpu if cpu else 0.0}
            for name, (w, c, n) in sorted(self.inclusive.items(), key=lambda kv: -kv[1][1])
        ]
        return {"wall_s": wall, "cpu_s": cpu, "load_average": os.getloadavg(),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": rows}


TIMERS = Timers()


def instrument(stages: list[tuple[str, str, Label]] = STAGES) -> None:
    """Wrap every stage's function with a timer, in its module and wherever a module of onnx_dc imported it."""
    for module_name, attribute, label in stages:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:  # an older checkout (bench_calibration_zoo.py --onnx-dc): not timed there
            continue
        owner: Any = module
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if original is None:
            raise SystemExit(f"profile_calibration: {module_name}.{attribute} no longer exists; update STAGES")
        wrapper = _timed(original, label)
        setattr(owner, name, wrapper)
        if not path:  # functions imported by name elsewhere: rebind those references too
            for other in list(sys.modules.values()):
                if getattr(other, "__name__", "").startswith("onnx_dc") and getattr(other, name, None) is original:
                    setattr(other, name, wrapper)


def _timed(function: Callable[..., Any], label: Label) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with TIMERS.time(label(*args, **kwargs) if callable(label) else label):
            return function(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------
# Cases: (model path, recipe, calibration data, evaluation data or None)


def zoo_feeds(name: str, split: str, n: int) -> dict[str, np.ndarray]:
    """``n`` samples of a real zoo model's ``split`` as arrays keyed by input (the axis-0 rule)."""
    from model_zoo import real
    from model_zoo.real.base import stack_feeds
    from onnx_dc.errors import CalibrationError

    feeds = [s.feed for s in real.get(name).make_samples(split, n)]
    try:
        return stack_feeds(feeds)
    except CalibrationError:  # scalar or unbatched inputs (Silero VAD): one complete feed per sample, axis 0 added
        return {k: np.stack([np.asarray(f[k]) for f in feeds]) for k in feeds[0]}


def case(args: argparse.Namespace) -> tuple[str, Any, Any, Any]:
    from onnx_dc.api.recipe import Recipe, SearchRecipe

    budget = Recipe(search=SearchRecipe(min_cosine=args.min_cosine))
    if args.case in ("lenet-auto", "lenet-calib"):
        from model_zoo import get_model_path
        from model_zoo.calibration_table import CALIBRATION_SEED, test_halves
        from model_zoo.fashion_mnist import calibration_set, evaluation_set

        calib = calibration_set(args.samples or 8192, seed=CALIBRATION_SEED)
        test = evaluation_set()
        half_a, _ = test_halves()
        recipe = Recipe(search=SearchRecipe(max_drop=args.max_drop)) if args.case == "lenet-auto" else Recipe()
        evaluation = {"input": test.images[half_a], "labels": test.labels[half_a]} if recipe.search else None
        return str(get_model_path("lenet_300_100")), recipe, {"input": calib.images}, evaluation
    name = ZOO_CASES[args.case.split("-")[0]]
    from model_zoo import real

    recipe = budget if args.case.endswith("-auto") else Recipe()
    evaluation = zoo_feeds(name, "eval", args.eval_samples) if args.eval_samples and recipe.search else None
    return str(real.get(name).path()), recipe, zoo_feeds(name, "calib", args.samples or 128), evaluation


ZOO_CASES = {"cls": "ppocr-mobile-v2-cls", "rec": "ppocrv4-rec", "det": "ppocrv4-det", "nudenet": "nudenet-320n",
             "minilm": "minilm-l6", "vit": "vit-s-focus", "whisper": "whisper-tiny-encoder", "silero": "silero-vad"}
DEFAULT_SAMPLES = {"lenet-auto": 8192, "lenet-calib": 8192, "cls-calib": 128, "cls-auto": 128, "rec-calib": 64, "rec-auto": 32,
                   "det-calib": 8, "det-auto": 8, "nudenet-calib": 16, "nudenet-auto": 16, "minilm-calib": 64,
                   "minilm-auto": 64, "vit-calib": 16, "vit-auto": 16, "whisper-calib": 8, "whisper-auto": 8,
                   "silero-auto": 256}


class _Stop(BaseException):
    """The wall-time limit (not an ``Exception``: the package turns those raised inside onnxruntime runs into
    its own errors)."""


def grouped(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows summed over layers: one row per stage label without its ``[layer shape]``."""
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        name = row["stage"].split(" [")[0]
        group = groups.setdefault(name, {"stage": name, "calls": 0, "cpu_s": 0.0, "exclusive_cpu_s": 0.0,
                                         "wall_s": 0.0, "cpu_percent": 0.0})
        for key in ("calls", "cpu_s", "exclusive_cpu_s", "wall_s", "cpu_percent"):
            group[key] += row[key]
    return sorted(groups.values(), key=lambda g: -g["cpu_s"])


def print_report(report: dict[str, Any], per_layer: int) -> None:
    print(f"\n{report['case']}: {report['status']}; wall {report['wall_s']:.1f} s, CPU {report['cpu_s']:.1f} s, "
          f"peak RSS {report['peak_rss_mib']:.0f} MiB, load average {', '.join(f'{x:.1f}' for x in report['load_average'])}")
    header = f"{'stage':<66} {'calls':>6} {'CPU s':>8} {'CPU %':>6} {'excl. CPU s':>11} {'wall s':>8}"
    tables = [("stages (summed over layers)", report["stages"])]
    if per_layer:
        layered = [r for r in report["rows"] if " [" in r["stage"]][:per_layer]
        tables.append((f"the {len(layered)} costliest per-layer rows", layered))
    for title, rows in tables:
        print(f"\n{title}:\n{header}")
        for row in rows:
            print(f"{row['stage'][:66]:<66} {row['calls']:>6} {row['cpu_s']:>8.2f} {row['cpu_percent']:>6.1f} "
                  f"{row['exclusive_cpu_s']:>11.2f} {row['wall_s']:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", choices=sorted(DEFAULT_SAMPLES))
    parser.add_argument("--samples", type=int, help="calibration samples (default per case)")
    parser.add_argument("--min-cosine", type=float, default=0.999, help="budget of the *-auto cases (not lenet)")
    parser.add_argument("--max-drop", type=float, default=0.5, help="budget of lenet-auto, percentage points")
    parser.add_argument("--eval-samples", type=int, metavar="N",
                        help="zoo *-auto cases: measure the budget on N samples of the model's 'eval' split "
                        "instead of calibration samples held out")
    parser.add_argument("--output", metavar="OUT.onnx", help="keep the compressed model here")
    parser.add_argument("--limit-seconds", type=float, help="stop after this wall time and report so far")
    parser.add_argument("--json", help="write the breakdown here")
    parser.add_argument("--jobs", type=int, default=None,
                        help="compress's jobs (default: every core; 1: one thread, the stage CPU times add up)")
    parser.add_argument("--per-layer", type=int, default=12, metavar="N", help="also print the N costliest per-layer rows")
    parser.add_argument("--cprofile", help="also profile with cProfile into this file")
    parser.add_argument("--pyinstrument", help="also profile with pyinstrument into this HTML file")
    args = parser.parse_args(argv)
    args.samples = args.samples or DEFAULT_SAMPLES[args.case]

    import onnx_dc

    model, recipe, calib, evaluation = case(args)
    instrument()
    if args.limit_seconds:
        signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(_Stop()))
        signal.setitimer(signal.ITIMER_REAL, args.limit_seconds)
    profiler: Any = None
    if args.pyinstrument:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.01)
        profiler.start()
    elif args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    status, result = "finished", None
    TIMERS.wall0, TIMERS.cpu0 = time.perf_counter(), time.process_time()
    try:
        with tempfile.TemporaryDirectory(prefix="onnx-dc-profile-") as tmp, TIMERS.time("total"):
            output = args.output or Path(tmp) / "out.onnx"
            result = onnx_dc.compress(model, output, recipe, calib=calib, eval_data=evaluation, progress=True,
                                      jobs=args.jobs)
    except _Stop:
        status = f"stopped after {args.limit_seconds:g} s"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if args.pyinstrument:
            profiler.stop()
            Path(args.pyinstrument).write_text(profiler.output_html())
        elif args.cprofile:
            profiler.disable()
            profiler.dump_stats(args.cprofile)
    report = TIMERS.report()
    report.update(case=args.case, status=status, samples=args.samples, stages=grouped(report["rows"]))
    if result is not None:
        report["ratio"] = result.report.ratio
        calibration = result.calibration
        if hasattr(calibration, "format_summary"):
            print(calibration.format_summary())
            report["budget_met"] = calibration.budget_met
        print(f"ratio {result.report.ratio:.2f}x")
    print_report(report, args.per_layer)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
