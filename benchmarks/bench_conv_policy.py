"""Batch-1 latency of compressed conv models: DCConv against DCDecompress + Conv, next to the original.

    python benchmarks/bench_conv_policy.py [--rounds 100] [--runs-per-block 5] [--models lenet5 ppocr-mobile-v2-cls]
                                           [--layers-only]

For each model, in one process: the original, and the model compressed by
onnx-dc with the data-free defaults three ways: every 2-D convolution as
``DCConv`` (the converter's policy), only the convolutions with one group as
``DCConv`` (grouped and depthwise ones as ``DCDecompress`` + ``Conv``), and
every convolution as ``DCDecompress`` + ``Conv`` (the converter before
DCConv). For LeNet-5 the same is measured on the model cut after ``pool2``
(its convolutions alone). All sessions use one intra-op thread. Timing: every
session is warmed up, then ``--rounds`` rounds visit the sessions in a fresh
random order, each timing a block of ``--runs-per-block`` runs; the table
shows the median per run and the ratio to the original (below 1 = faster).
This is the measurement behind the converter's DCConv policy
(docs/OPERATORS.md, "DCConv performance").

A second table times single layers the shape of LeNet-5's conv1 and conv2
with random 8-bit codes at 10 %, 30 %, 50 % and 90 % pruning: ``DCConv`` against
onnxruntime's ``Conv`` with the same (decoded) weight. The kept fraction
decides the layout DCConv uses (code tiles from 25 % kept, the index layout
below; docs/OPERATORS.md, "DCConv: layouts and kernels"; the real shapes are
``benchmarks/bench_conv.py``'s).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import onnx_dc  # noqa: E402
import onnx_dc.graph.rewrite as rewrite  # noqa: E402
from bench_lenet_latency import interleaved_medians, single_thread_session  # noqa: E402

POLICIES: dict[str, Callable[[object, dict], bool]] = {
    "DCConv (all 2-D convs)": lambda shape, attributes: len(shape) == 4,
    "DCConv (group 1 only)": lambda shape, attributes: len(shape) == 4 and int(attributes.get("group", 1)) == 1,
    "DCDecompress + Conv": lambda shape, attributes: False,
}


def _cut_after(model: onnx.ModelProto, node_name: str) -> bytes:
    """The model up to and including ``node_name``, whose first output becomes the only graph output."""
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    kept = []
    for node in cut.graph.node:
        kept.append(node)
        if node.name == node_name:
            break
    del cut.graph.node[:]
    cut.graph.node.extend(kept)
    del cut.graph.output[:]
    cut.graph.output.append(onnx.helper.make_tensor_value_info(kept[-1].output[0], onnx.TensorProto.FLOAT, None))
    used = {name for node in kept for name in node.input}
    initializers = [t for t in cut.graph.initializer if t.name in used]
    del cut.graph.initializer[:]
    cut.graph.initializer.extend(initializers)
    return cut.SerializeToString()


def _model_and_feed(name: str) -> tuple[str, dict[str, np.ndarray], str | None]:
    """(path, one batch-1 feed, node after which the convolutions end or None)."""
    if name in ("lenet5", "lenet_300_100"):
        from model_zoo import get_model_path

        feed = {"input": np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)}
        return str(get_model_path(name)), feed, "pool2" if name == "lenet5" else None
    from model_zoo import real

    model = real.get(name)
    return str(model.path()), model.make_inputs("eval", 1, seed=0)[0], None


def measure(name: str, *, rounds: int, runs_per_block: int, seed: int = 0) -> list[tuple[str, float]]:
    """``(variant, median seconds per run)`` for every variant of one model; the original first."""
    path, feed, cut = _model_and_feed(name)
    original = onnx.load(path)
    models: dict[str, tuple[bytes, bool]] = {"original": (original.SerializeToString(), False)}
    saved = rewrite.conv_runs_as_dc_conv
    try:
        for label, policy in POLICIES.items():
            rewrite.conv_runs_as_dc_conv = policy
            models[label] = (onnx_dc.compress(path).model.SerializeToString(), True)
    finally:
        rewrite.conv_runs_as_dc_conv = saved
    if cut is not None:
        for label, (data, library) in list(models.items()):
            models[f"{label}, convs only"] = (_cut_after(onnx.load_from_string(data), cut), library)
    sessions = {label: single_thread_session(data, library) for label, (data, library) in models.items()}
    medians = interleaved_medians(
        {label: (session, feed) for label, session in sessions.items()},
        rounds=rounds, runs_per_block=runs_per_block, warmup=20, seed=seed,
    )
    return list(medians.items())


LAYERS = {"conv1": (1, 20, 28, 5), "conv2": (20, 50, 12, 5)}  # C, M, H = W, kernel


def measure_layers(*, rounds: int, runs_per_block: int, seed: int = 0) -> list[tuple[str, float, float]]:
    """``(layer, DCConv seconds, onnxruntime Conv seconds)`` per layer shape and pruning rate."""
    from onnx import TensorProto, helper, numpy_helper

    from onnx_dc.codec.container_reader import decode_container
    from onnx_dc.codec.container import encode_container

    rng = np.random.default_rng(seed)
    pairs = {}
    for name, (c, m, size, k) in LAYERS.items():
        x = rng.standard_normal((1, c, size, size)).astype(np.float32)
        for pruned in (0.1, 0.3, 0.5, 0.9):
            codes = rng.integers(0, 256, size=(m, c, k, k))
            codes[rng.random(codes.shape) < pruned] = -1
            codebook = np.sort(rng.standard_normal(256)).astype(np.float32)
            container = encode_container(codes, codebook, bits=8, index_bits=5)
            graphs = []
            for op, weight, domain in (
                ("DCConv", numpy_helper.from_array(np.frombuffer(container, np.uint8).copy(), "w"), "ai.onnx_dc"),
                ("Conv", numpy_helper.from_array(decode_container(container), "w"), ""),
            ):
                node = helper.make_node(op, ["x", "w"], ["y"], domain=domain)
                graph = helper.make_graph(
                    [node], name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight],
                )
                opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx_dc", 1)]
                model = helper.make_model(graph, opset_imports=opsets)
                model.ir_version = 8
                graphs.append(single_thread_session(model.SerializeToString(), library=op == "DCConv"))
            pairs[f"{name} {pruned:.0%} pruned"] = (graphs, {"x": x})
    medians = interleaved_medians(
        {(label, i): (sessions[i], feed) for label, (sessions, feed) in pairs.items() for i in (0, 1)},
        rounds=rounds, runs_per_block=runs_per_block, warmup=20, seed=seed,
    )
    return [(label, medians[(label, 0)], medians[(label, 1)]) for label in pairs]


def main(argv: list[str] | None = None) -> int:
    """Print one table per model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--runs-per-block", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["lenet5", "ppocr-mobile-v2-cls"])
    parser.add_argument("--layers-only", action="store_true", help="only the single-layer table")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.runs_per_block < 1:
        parser.error("rounds and runs per block must be positive")
    print("single layers, batch 1, 1 intra-op thread: DCConv vs onnxruntime's Conv on the same weight")
    print(f"{'layer':24s} {'DCConv us':>10s} {'Conv us':>10s} {'ratio':>7s}")
    for label, dc_seconds, ort_seconds in measure_layers(rounds=args.rounds, runs_per_block=args.runs_per_block):
        print(f"{label:24s} {dc_seconds * 1e6:10.1f} {ort_seconds * 1e6:10.1f} {dc_seconds / ort_seconds:6.2f}x")
    if args.layers_only:
        return 0
    print()
    print("batch-1 latency, 1 intra-op thread, compressed with the onnx-dc defaults; median of interleaved blocks")
    print(f"{'model':20s} {'variant':36s} {'us/run':>9s} {'vs original':>12s}")
    for name in args.models:
        rows = measure(name, rounds=args.rounds, runs_per_block=args.runs_per_block)
        for part in ("", ", convs only"):
            base = dict(rows).get("original" + part)
            if base is None:
                continue
            for label, seconds in rows:
                if label.endswith(", convs only") == bool(part):
                    print(f"{name:20s} {label:36s} {seconds * 1e6:9.1f} {seconds / base:11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
