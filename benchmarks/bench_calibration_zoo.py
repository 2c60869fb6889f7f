"""Calibration and the automatic search on every real zoo model up to 25 M parameters: wall time and where it goes.

For each real model of ``model_zoo.real`` with at most 25 M weights (larger ones are
listed as skipped), runs ``onnx_dc.compress`` on the model's ``calib`` split with

* ``calib``: ``--calib`` alone (default settings and calibration options), and
* ``auto``: ``--calib --min-cosine 0.999`` (the budget measured on the held-out
  20 % of the calibration samples, as the command line does),

then measures the written model on the model's ``eval`` split (disjoint from the
calibration inputs): the search's budget measure (per output one cosine over all
values, the lowest over the outputs; ``onnx_dc.calibration.metrics.compare_outputs``)
and the zoo's task metric (``RealModel.task_metric``, its primary key). Each row
runs in a fresh process with the stage timers of ``profile_calibration.py``
(wall and CPU time per stage), and prints: wall and CPU seconds of the compression
(the process and its finished children), the mean 1-minute load average while it
ran (the machine may be shared), the peak resident memory of the process, the ratio, the held-out budget cosine and task
metric, and the three stages with the most exclusive CPU time.

Usage (from the repository root)::

    python benchmarks/bench_calibration_zoo.py                                   # every model, both settings
    python benchmarks/bench_calibration_zoo.py --models ppocr-mobile-v2-cls --settings calib
    python benchmarks/bench_calibration_zoo.py --models ppocrv4-det --limit-seconds 900 --json det.json
    python benchmarks/bench_calibration_zoo.py --onnx-dc /path/to/other/checkout ...   # that checkout's package

``--fixed-runs`` makes the searches of models of more than 12 layers independent of
the machine's speed (they size their model runs by the measured time of one pass
otherwise, so rows at different loads can choose differently). ``--limit-seconds S`` stops a compression after S seconds of wall time (the row
says so, with the stages so far); ``--calib-samples`` / ``--eval-samples`` override
the per-model counts of :data:`SAMPLES`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MAX_PARAMETERS = 25_000_000
SETTINGS = {"calib": None, "auto": 0.999}  # setting name -> min_cosine of its search (None: --calib alone)
# (calibration, evaluation) samples per model: compare_cases.FULL_SIZES' counts (what compare.py fits
# and evaluates on), MiniLM with the 96 calibration sentences of docs/CALIBRATION.md's table.
SAMPLES = {
    "ppocr-mobile-v2-cls": (32, 64),
    "ppocrv4-rec": (32, 64),
    "ppocrv4-det": (8, 16),
    "nudenet-320n": (16, 64),
    "minilm-l6": (96, 200),
    "whisper-tiny-encoder": (8, 16),
    "vit-s-focus": (16, 64),
    "silero-vad": (128, 512),
}
DEFAULT_SAMPLES = (32, 64)


def parameter_count(path: str | Path) -> int:
    """Floating-point weights of a model file: initializers and Constant tensors, subgraphs included."""
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total, graphs = 0, [model.graph]
    while graphs:
        graph = graphs.pop()
        tensors = list(graph.initializer)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    tensors.append(attribute.t)
                graphs.extend([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs)
        floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
        total += sum(int(np.prod(t.dims)) for t in tensors if t.data_type in floats)
    return total


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class LoadSampler:
    """The mean of the 1-minute load average, sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 10.0) -> None:
        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> float:
        """Stop sampling; the mean load average of the samples."""
        self._stop.set()
        self.samples.append(os.getloadavg()[0])
        return sum(self.samples) / len(self.samples)


def held_out_fidelity(name: str, path: str, model: Any, eval_samples: int) -> dict[str, float]:
    """Budget cosine and the zoo's primary task metric of ``model`` (decompressed) on ``name``'s 'eval' split."""
    import numpy as np
    import onnxruntime as ort

    import onnx_dc
    from model_zoo import real
    from onnx_dc.calibration.metrics import compare_outputs

    zoo_model = real.get(name)
    inputs = zoo_model.make_inputs("eval", eval_samples)
    reference = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    candidate = ort.InferenceSession(onnx_dc.decompress(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in reference.get_outputs()]
    pairs = [(reference.run(None, feed), candidate.run(None, feed)) for feed in inputs]
    stacked = [{n: np.concatenate([p[k][i] for p in pairs]) for i, n in enumerate(names)} for k in (0, 1)]
    cosine = compare_outputs(stacked[0], stacked[1]).cosine
    metric = zoo_model.task_metric(reference, candidate, inputs)
    return {"budget_cosine": cosine, "metric_name": zoo_model.primary, "metric": metric[zoo_model.primary]}


def top_stages(report: dict[str, Any], count: int = 3) -> list[dict[str, Any]]:
    """The ``count`` stages (summed over layers) with the most exclusive CPU time."""
    from profile_calibration import grouped

    rows = [r for r in grouped(report["rows"]) if r["stage"] != "total"]
    rows.sort(key=lambda r: -r["exclusive_cpu_s"])
    return [{"stage": r["stage"], "calls": r["calls"], "exclusive_cpu_s": round(r["exclusive_cpu_s"], 1)}
            for r in rows[:count]]


class _Stop(BaseException):
    """The wall-time limit (not an ``Exception``: the package turns those raised inside onnxruntime runs into
    its own errors)."""


def fix_model_runs(path_checks: int = 100) -> None:
    """Make the search of a model of many layers independent of the machine's speed: every candidate measured and
    ``path_checks`` path configurations checked (instead of numbers sized by the measured time of one pass)."""
    from onnx_dc.calibration import search

    search._runs_per_layer = lambda *args: None
    search._max_path_checks = lambda *args: path_checks


def run_row(name: str, setting: str, calib_samples: int, eval_samples: int, limit: float | None) -> dict[str, Any]:
    """Compress ``name`` with ``setting`` in this process, timed by stage; then its held-out fidelity."""
    import profile_calibration

    import onnx_dc
    from model_zoo import real
    from onnx_dc.api.recipe import Recipe, SearchRecipe

    path = str(real.get(name).path())
    calib = profile_calibration.zoo_feeds(name, "calib", calib_samples)
    min_cosine = SETTINGS[setting]
    recipe = Recipe(search=SearchRecipe(min_cosine=min_cosine)) if min_cosine is not None else Recipe()
    profile_calibration.instrument()
    timers = profile_calibration.TIMERS = profile_calibration.Timers()
    if limit:
        signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(_Stop()))
        signal.setitimer(signal.ITIMER_REAL, limit)
    load = LoadSampler()
    status, result = "finished", None
    wall, cpu = time.perf_counter(), _cpu_seconds()
    try:
        with tempfile.TemporaryDirectory(prefix="onnx-dc-zoo-") as tmp, timers.time("total"):
            result = onnx_dc.compress(path, Path(tmp) / "out.onnx", recipe, calib=calib)
    except _Stop:
        status = f"stopped after {limit:g} s"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    row = {"model": name, "setting": setting, "status": status, "calib_samples": calib_samples,
           "eval_samples": eval_samples, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
           "load": round(load.stop(), 1), "top_stages": top_stages(timers.report()),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if result is not None:
        row["ratio"] = round(result.report.ratio, 3)
        if min_cosine is not None:
            row["budget_met"] = bool(result.calibration.budget_met)
        row.update(held_out_fidelity(name, path, result.model, eval_samples))
    return row


def zoo_models(requested: list[str] | None) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(name, parameters) of the requested (default: every) real zoo model, split into kept and over the limit."""
    from model_zoo import real

    kept, skipped = [], []
    for name in requested or real.list_models():
        count = parameter_count(real.get(name).path())
        (kept if count <= MAX_PARAMETERS else skipped).append((name, count))
    return kept, skipped


def _stages_text(row: dict[str, Any]) -> str:
    return ", ".join(f"{s['stage']} {s['exclusive_cpu_s']:g}" for s in row["top_stages"])


def print_table(rows: list[dict[str, Any]]) -> None:
    """The table: one line per (model, setting)."""
    print(f"\n{'model':<22} {'params':>11} {'setting':<8} {'samples':>8} {'wall s':>7} {'CPU s':>7} {'load':>5} {'MiB':>6} "
          f"{'ratio':>7} {'cosine':>9} {'metric':>24}  top stages (exclusive CPU s)")
    for row in rows:
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "-"
        cosine = f"{row['budget_cosine']:.6f}" if "budget_cosine" in row else "-"
        metric = f"{row['metric_name']} {row['metric']:.4f}" if "metric" in row else row["status"]
        print(f"{row['model']:<22} {row['params']:>11,} {row['setting']:<8} "
              f"{row['calib_samples']:>3}/{row['eval_samples']:<4} {row['wall_s']:>7.1f} {row['cpu_s']:>7.1f} "
              f"{row['load']:>5.1f} {row.get('peak_rss_mib', 0):>6} {ratio:>7} {cosine:>9} {metric:>24}  {_stages_text(row)}", flush=True)


def _child(args: argparse.Namespace, name: str, setting: str) -> dict[str, Any]:
    calib_samples, eval_samples = SAMPLES.get(name, DEFAULT_SAMPLES)
    calib_samples, eval_samples = args.calib_samples or calib_samples, args.eval_samples or eval_samples
    command = [sys.executable, __file__, "--row", name, setting, "--calib-samples", str(calib_samples),
               "--eval-samples", str(eval_samples)]
    command += ["--limit-seconds", str(args.limit_seconds)] if args.limit_seconds else []
    command += ["--onnx-dc", args.onnx_dc] if args.onnx_dc else []
    command += ["--fixed-runs"] if args.fixed_runs else []
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        return {"model": name, "setting": setting, "status": f"failed (exit {done.returncode})", "calib_samples": calib_samples,
                "eval_samples": eval_samples, "wall_s": 0.0, "cpu_s": 0.0, "load": 0.0, "top_stages": []}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", help="zoo model names (default: every real model up to 25 M weights)")
    parser.add_argument("--settings", nargs="*", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--limit-seconds", type=float, help="stop each compression after this wall time")
    parser.add_argument("--calib-samples", type=int, help="calibration samples (default: per model)")
    parser.add_argument("--eval-samples", type=int, help="held-out evaluation samples (default: per model)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--onnx-dc", metavar="DIR", help="import onnx_dc from this checkout (default: this one)")
    parser.add_argument("--fixed-runs", action="store_true",
                        help="every search candidate measured and 100 path checks, whatever the machine's speed")
    parser.add_argument("--row", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path[:0] = [str(Path(__file__).parent)] + ([args.onnx_dc] if args.onnx_dc else []) + [str(ROOT)]
    importlib.import_module("onnx_dc")  # now: profile_calibration puts this checkout first on sys.path
    if args.row:
        if args.fixed_runs:
            fix_model_runs()
        row = run_row(*args.row, args.calib_samples, args.eval_samples, args.limit_seconds)
        print(json.dumps(row))
        return 0
    kept, skipped = zoo_models(args.models)
    for name, count in skipped:
        print(f"skipped {name}: {count:,} parameters, over {MAX_PARAMETERS:,}")
    rows = []
    for name, count in kept:
        for setting in args.settings:
            rows.append({**_child(args, name, setting), "params": count})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"commit": _commit(), "rows": rows}, indent=1))
    return 0


def _commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False, stdout=subprocess.PIPE, text=True)
    return done.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
