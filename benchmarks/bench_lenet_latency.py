"""End-to-end batch-1 latency of the zoo LeNets through the operator library, against the originals.

    python benchmarks/bench_lenet_latency.py [--rounds 300] [--runs-per-block 20] [--sparsities 0.3 0.7 0.9]
                                             [--inputs random image]

For each zoo LeNet, in one process: the original model, and the model
compressed by onnx-dc with the data-free defaults and with the fully connected
layers pruned to each ``--sparsities`` value (5-bit weights; convolutions 50 %
pruned, 8-bit). All sessions use one intra-op thread. Timing: every session is
warmed up, then ``--rounds`` rounds visit the sessions in a fresh random order,
each timing a block of ``--runs-per-block`` runs on one 28x28 input; the table
shows the median per run and the ratio to the original (below 1 = faster).
``--inputs``: ``random`` is uniform noise in [0, 1) (no zero pixel: nothing for
the kernels to skip), ``image`` the first Fashion-MNIST test image (66 %
of its pixels are 0, which DCMatMul skips in the first layer, as EIE skips zero
activations); one table per input kind.
The kept fraction decides the layout DCMatMul uses: the index layout (codebook
indices and positions of the kept weights) for heavily pruned weights, code
panels (a uint8 codebook index per weight) from 25 % kept up
(docs/OPERATORS.md, "In-memory layout"); this benchmark measured that
threshold (then against a dense float32 layout, which the code panels replaced).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import onnx_dc  # noqa: E402
from model_zoo import get_model_path  # noqa: E402
from model_zoo.fashion_mnist import evaluation_set  # noqa: E402


def single_thread_session(model: str | bytes, library: bool):
    """An onnxruntime session with one intra-op thread, with onnx-dc's operator library when ``library``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if library:
        options.register_custom_ops_library(onnx_dc.ops_library_path())
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def interleaved_medians(
    runs: dict, *, rounds: int, runs_per_block: int, warmup: int, seed: int = 0
) -> dict:
    """Median seconds per run of each ``(session, feed)`` in ``runs``, timed side by side.

    Every session is warmed up with ``warmup`` runs; then ``rounds`` rounds visit
    the sessions in a fresh random order (machine noise hits all alike), each
    timing a block of ``runs_per_block`` runs. Keys are kept.
    """
    for session, feed in runs.values():
        for _ in range(warmup):
            session.run(None, feed)
    samples: dict = {key: [] for key in runs}
    order = list(runs)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            session, feed = runs[key]
            started = time.perf_counter()
            for _ in range(runs_per_block):
                session.run(None, feed)
            samples[key].append((time.perf_counter() - started) / runs_per_block)
    return {key: statistics.median(values) for key, values in samples.items()}


def measure(
    model_name: str, sparsities: list[float], *, rounds: int, runs_per_block: int, inputs: str = "random", seed: int = 0
) -> list[tuple[str, float, float]]:
    """``(variant, kept fraction of the compressed weights, median seconds per run)`` for each variant."""
    source = str(get_model_path(model_name))
    variants: dict[str, tuple[object, float]] = {"original": (single_thread_session(source, False), 1.0)}
    settings = [("onnx-dc defaults", {})] + [
        (f"fc {s:.0%} pruned, 5-bit", {"sparsity": f"fc={s},conv=0.5", "bits": "fc=5,conv=8"}) for s in sparsities
    ]
    for label, kwargs in settings:
        result = onnx_dc.compress(source, **kwargs)
        tensors = result.report.tensors
        kept = sum(t.n_kept for t in tensors) / max(1, sum(t.n_weights for t in tensors))
        variants[label] = (single_thread_session(result.model.SerializeToString(), True), kept)
    if inputs == "image":
        image = evaluation_set(1).images
    else:
        image = np.random.default_rng(seed).random((1, 1, 28, 28), dtype=np.float32)
    feed = {"input": image}
    medians = interleaved_medians(
        {key: (session, feed) for key, (session, _) in variants.items()},
        rounds=rounds, runs_per_block=runs_per_block, warmup=50, seed=seed,
    )
    return [(key, variants[key][1], medians[key]) for key in variants]


def main(argv: list[str] | None = None) -> int:
    """Print one table per zoo LeNet."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--runs-per-block", type=int, default=20)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.7, 0.9])
    parser.add_argument("--models", nargs="+", default=["lenet_300_100", "lenet5"])
    parser.add_argument("--inputs", nargs="+", choices=["random", "image"], default=["random", "image"])
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.runs_per_block < 1 or not all(0.0 <= s <= 1.0 for s in args.sparsities):
        parser.error("rounds and runs per block must be positive, sparsities in [0, 1]")
    print("batch-1 latency, 1 intra-op thread, onnx-dc through its operator library; median of interleaved blocks")
    print(f"{'model':15s} {'input':7s} {'variant':22s} {'kept':>6s} {'us/run':>9s} {'vs original':>12s}")
    for inputs in args.inputs:
        for name in args.models:
            rows = measure(name, args.sparsities, rounds=args.rounds, runs_per_block=args.runs_per_block, inputs=inputs)
            base = rows[0][2]
            for label, kept, seconds in rows:
                print(f"{name:15s} {inputs:7s} {label:22s} {kept:6.1%} {seconds * 1e6:9.1f} {seconds / base:11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
