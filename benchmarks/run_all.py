"""Run every benchmark of this directory in turn and print their tables.

    python benchmarks/run_all.py [--quick] [--only NAME ...] [--list]

Each benchmark runs as its own process (so one that fails does not stop the
others, and each starts from a clean heap for its memory figures); its table goes
to standard output as it is produced. ``--quick`` passes each benchmark's own
small-size option where it has one (a smoke run: the numbers mean nothing). The
exit code is 1 when any benchmark failed, and the failing ones are listed last.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent


@dataclass(frozen=True)
class Benchmark:
    """One benchmark script: its name, what it measures, and its arguments."""

    name: str
    what: str
    full_args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()

    @property
    def script(self) -> Path:
        return BENCHMARKS_DIR / f"{self.name}.py"


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "bench_codec",
        "container encode/decode throughput and size against the entropy bound",
        quick_args=("--sizes", "100000", "--repeats", "1"),
    ),
    Benchmark(
        "bench_kmeans",
        "1-D k-means against scikit-learn's KMeans (time, inertia)",
        quick_args=("--sizes", "20000", "--clusters", "16", "--repeats", "1", "--sklearn-budget-s", "20"),
    ),
    Benchmark(
        "bench_matmul",
        "DCMatMul against onnxruntime's dense MatMul (latency, memory)",
        quick_args=("--size", "256", "--batches", "1", "4", "--threads", "1", "--min-time", "0.05"),
    ),
    Benchmark(
        "bench_lenet_latency",
        "end-to-end batch-1 latency of the zoo LeNets through the operator library",
        quick_args=("--rounds", "5", "--runs-per-block", "2", "--sparsities", "0.9", "--models", "lenet_300_100"),
    ),
    Benchmark(
        "bench_transformer_matmul",
        "DCMatMul on transformer layer shapes against MatMul, quantize_dynamic int8 and MatMulNBits",
        quick_args=("--rows", "64", "--shapes", "384x384", "--threads", "1", "--rounds", "2", "--min-block-ms", "2"),
    ),
    Benchmark(
        "bench_gather",
        "DCGather (compressed embedding table) against onnxruntime's Gather",
        quick_args=("--vocab", "2000", "--tokens", "64", "--rounds", "2"),
    ),
    Benchmark(
        "bench_conv",
        "DCConv on the zoo's real conv shapes and whole real conv models against onnxruntime's Conv",
        quick_args=("layers", "--layers", "det.conv2 1x1 16->32", "--variants", "u8", "--threads", "1",
                    "--rounds", "1", "--min-block-ms", "2"),
    ),
    Benchmark(
        "bench_conv_policy",
        "batch-1 latency of compressed conv models: DCConv against DCDecompress + Conv",
        quick_args=("--rounds", "3", "--runs-per-block", "1", "--models", "lenet5"),
    ),
    Benchmark(
        "default_sparsity",
        "accuracy of the zoo LeNets against the data-free default sparsity",
        quick_args=("--quick",),
    ),
    Benchmark(
        "bench_layer_fits",
        "CPU time of LeNet-300-100 fc1's calibrated fits, with a digest of their results",
        quick_args=("--samples", "256", "--sparsities", "0.5", "--bits", "4"),
    ),
    Benchmark(
        "bench_calibration",
        "calibration time and peak memory against model size and sample count",
        quick_args=("--quick",),
    ),
    Benchmark(
        "bench_stress",
        "concurrency, session churn and memory growth of the operator library",
        quick_args=("--quick",),
    ),
    Benchmark(
        "bench_scale",
        "large models: compression speed, converter and session memory of synthetic MatMul stacks up to 4.4 GB",
        quick_args=("--models", "0.13GB", "--repeats", "1", "--no-jobs-1", "--no-session"),
    ),
    Benchmark(
        "transformer_coverage",
        "transformer test models: weights compressed vs left dense, by the op that reads them",
        quick_args=("--models", "bert_ort_opt1"),
    ),
    Benchmark(
        "bench_calibration_zoo",
        "--calib and --calib --min-cosine 0.999 on every real zoo model up to 25 M weights: time and where it goes",
        quick_args=("--models", "ppocr-mobile-v2-cls", "--settings", "calib", "--calib-samples", "8",
                    "--eval-samples", "8"),
    ),
    Benchmark(
        "bench_transformer_latency",
        "whole transformers at 1 x 64, 1 x 128 and 8 x 64 tokens beside int8 and MatMulNBits, 1 and 2 threads",
        quick_args=("--models", "minilm-l6", "--threads", "1", "--seconds", "2"),
    ),
    Benchmark(
        "bench_search_budgets",
        "the automatic search at --min-cosine 0.999, 0.995 and 0.99 on zoo transformers, checked on evaluation inputs",
        quick_args=("--quick", "--budgets", "0.99"),
    ),
    Benchmark(
        "bench_search_seeds",
        "the automatic --max-drop 0.5 search on LeNets trained with other seeds beside the zoo models (issue 21)",
        quick_args=("--quick", "--models", "lenet_300_100", "--no-zoo"),
    ),
    Benchmark(
        "compare",
        "onnx-dc beside zstd, quantize_dynamic and MatMulNBits on the zoo and real models",
        quick_args=("--quick",),
    ),
)


def _environment() -> dict[str, str]:
    """The environment of a benchmark process: this checkout first on the import path."""
    environment = dict(os.environ)
    paths = [str(REPO_ROOT), *filter(None, environment.get("PYTHONPATH", "").split(os.pathsep))]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; return 0 when all of them succeeded."""
    parser = argparse.ArgumentParser(prog="python benchmarks/run_all.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run, numbers meaningless)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)

    known = {benchmark.name: benchmark for benchmark in BENCHMARKS}
    if args.list:
        for benchmark in BENCHMARKS:
            print(f"{benchmark.name:18s} {benchmark.what}")
        return 0
    if args.only:
        unknown = [name for name in args.only if name not in known]
        if unknown:
            print(f"run_all: unknown benchmark {', '.join(unknown)} (known: {', '.join(known)})", file=sys.stderr)
            return 2
        selected = [known[name] for name in args.only]
    else:
        selected = list(BENCHMARKS)

    failed: list[str] = []
    for benchmark in selected:
        extra = benchmark.quick_args if args.quick else benchmark.full_args
        command = [sys.executable, str(benchmark.script), *extra]
        print(f"\n=== {benchmark.name}: {benchmark.what}", flush=True)
        print("$ " + " ".join(command[1:]), flush=True)
        started = time.perf_counter()
        code = subprocess.call(command, cwd=REPO_ROOT, env=_environment())
        seconds = time.perf_counter() - started
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"=== {benchmark.name}: {status} in {seconds:.0f} s", flush=True)
        if code != 0:
            failed.append(benchmark.name)
    if failed:
        print(f"\nrun_all: {len(failed)} benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
