"""Calibration cost against model size, and peak memory against the number of samples.

Builds synthetic MLPs (``depth`` layers of ``width x width`` MatMul + bias Add +
Relu, float32, random weights), then times
:func:`onnx_dc.calibration.capture.capture_statistics` over all layers (one onnxruntime
pass; Gram statistics accumulated in float64) and records the process's peak
resident memory. Each measurement runs in a fresh subprocess so that peaks do
not leak between rows. Two tables:

1. model size: widths up to 2048 at the given depth (20 by default), fixed sample count;
2. samples: the largest model with 4x more samples per row - the statistics
   (``sum (K+1)^2`` float64 numbers) do not depend on the sample count, so
   the peak stays flat while the time grows linearly.

Usage::

    python benchmarks/bench_calibration.py                 # 20 x 2048 MLP, a few minutes
    python benchmarks/bench_calibration.py --quick         # tiny sizes (what the test runs)
    python benchmarks/bench_calibration.py --depth 20 --widths 512 1024 2048 --samples 256 1024 4096
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_mlp(depth: int, width: int, seed: int = 0):
    """The synthetic model: input ``x`` float32 ``[batch, width]``, ``depth`` MatMul+Add+Relu layers."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    previous = "x"
    for i in range(depth):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        b = (0.01 * rng.standard_normal(width)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [previous, f"w{i}"], [f"mm{i}"]),
            helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"]),
            helper.make_node("Relu", [f"add{i}"], [f"h{i}"]),
        ]
        previous = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def measure(depth: int, width: int, samples: int, batch_size: int) -> dict:
    """One measurement in this process: capture time, peak RSS, statistics size."""
    import resource
    import time

    import numpy as np

    sys.path.insert(0, str(ROOT))
    from onnx_dc.calibration.capture import capture_statistics
    from onnx_dc.calibration.layers import find_layers
    from onnx_dc.calibration.data import load_calibration

    model = build_mlp(depth, width)
    layers = find_layers(model)
    x = np.random.default_rng(1).standard_normal((samples, width)).astype(np.float32)
    data = load_calibration({"x": x}, model, max_samples=None)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    stats = capture_statistics(model, data, layers, batch_size=batch_size, max_memory_bytes=1 << 40)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats_bytes = sum(sum(g.nbytes for g in s.gram) for s in stats.values())
    return {
        "depth": depth,
        "width": width,
        "weights": depth * width * width,
        "samples": samples,
        "seconds": seconds,
        "peak_rss_bytes": peak,
        "rss_before_capture_bytes": before,
        "statistics_bytes": stats_bytes,
        "model_bytes": depth * (width * width + width) * 4,
        "input_bytes": x.nbytes,
    }


def run_isolated(depth: int, width: int, samples: int, batch_size: int) -> dict:
    """:func:`measure` in a fresh Python process (so the peak is this measurement's own)."""
    out = subprocess.run(
        [sys.executable, __file__, "--one", str(depth), str(width), str(samples), str(batch_size)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def format_tables(size_rows: list[dict], sample_rows: list[dict]) -> str:
    """The two tables as text."""
    lines = []
    header = f"{'depth x width':>14} {'weights':>12} {'samples':>8} {'time':>9} {'samples/s':>10} {'peak RSS':>11} {'statistics':>11} {'model':>10} {'inputs':>10}"
    for title, rows in (("calibration cost vs model size", size_rows), ("peak memory vs number of samples", sample_rows)):
        lines += ["", title, header, "-" * len(header)]
        for r in rows:
            lines.append(
                f"{r['depth']:>5} x {r['width']:<6} {r['weights']:>12,} {r['samples']:>8} {r['seconds']:>8.2f}s "
                f"{r['samples'] / r['seconds']:>10,.0f} {_mib(r['peak_rss_bytes']):>11} {_mib(r['statistics_bytes']):>11} "
                f"{_mib(r['model_bytes']):>10} {_mib(r['input_bytes']):>10}"
            )
    if len(sample_rows) >= 2:
        first, last = sample_rows[0], sample_rows[-1]
        lines.append("")
        lines.append(
            f"samples x{last['samples'] / first['samples']:.0f}: time x{last['seconds'] / first['seconds']:.1f}, "
            f"peak RSS x{last['peak_rss_bytes'] / first['peak_rss_bytes']:.2f} "
            f"(+{_mib(last['peak_rss_bytes'] - first['peak_rss_bytes'])}, of which inputs +{_mib(last['input_bytes'] - first['input_bytes'])})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--size-samples", type=int, default=1024, help="samples for the model-size table")
    parser.add_argument("--samples", type=int, nargs="+", default=[256, 1024, 4096], help="sample counts for the memory table")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: depth 3, widths 16 32, samples 16 64")
    parser.add_argument("--json", help="also write the rows as JSON")
    parser.add_argument("--one", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one)))
        return 0
    if args.quick:
        args.depth, args.widths, args.size_samples, args.samples = 3, [16, 32], 32, [16, 64]
    size_rows = [run_isolated(args.depth, w, args.size_samples, args.batch_size) for w in args.widths]
    sample_rows = [run_isolated(args.depth, max(args.widths), n, args.batch_size) for n in args.samples]
    print(format_tables(size_rows, sample_rows))
    if args.json:
        path = Path(args.json)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"sizes": size_rows, "samples": sample_rows}, indent=2) + "\n")
        os.replace(tmp, path)  # atomic: never a partial file
    return 0


if __name__ == "__main__":
    sys.exit(main())
