"""DCGather and DCDecompress per run against onnxruntime's Gather / an initializer, and the memory they hold.

    python benchmarks/bench_gather.py [--vocab 30522] [--hidden 384] [--tokens 64 512] [--rounds 15]

A word-embedding table ``[vocab, hidden]`` (Gaussian * 0.05), compressed with
onnx-dc's codec (6-bit codes, no pruning; and 90 % pruned), in one process:

* ``Gather``: onnxruntime's Gather with the float32 table as an initializer
  (the original model);
* ``DCGather``: the container through DCGather (rows expanded per run from
  uint8 codes, or from sparse rows when 90 % pruned);
* ``DCDecompress + Gather``: what the converter emitted before DCGather (the
  whole table expanded every run, then Gather).

Medians of interleaved rounds (``bench_lenet_latency.interleaved_medians``),
one intra-op thread, for each token count; then the bytes each form holds
(docs/OPERATORS.md, "In-memory layout (DCGather, DCDecompress)").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bench_lenet_latency import interleaved_medians  # noqa: E402
from onnx_dc import ops_library_path  # noqa: E402
from onnx_dc.codec.container_reader import decode_container  # noqa: E402
from onnx_dc.codec.tensor import TensorSettings, compress_tensor  # noqa: E402


def _model(nodes, initializers):
    graph = helper.make_graph(nodes, "embed", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "t"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx_dc", 1)])
    model.ir_version = 8
    return model.SerializeToString()


def container_initializer(container: bytes):
    return numpy_helper.from_array(np.frombuffer(container, np.uint8).copy(), "table.dc")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    library = ops_library_path()
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((args.vocab, args.hidden)) * 0.05).astype(np.float32)
    models = {"Gather": _model([helper.make_node("Gather", ["table", "ids"], ["y"])],
                               [numpy_helper.from_array(table, "table")])}
    decoded = {}
    for label, sparsity in (("6-bit", None), ("90% pruned 6-bit", 0.9)):
        container = compress_tensor(table, TensorSettings(bits=6, sparsity=sparsity)).container
        decoded[label] = decode_container(container)
        models[f"DCGather {label}"] = _model(
            [helper.make_node("DCGather", ["table.dc", "ids"], ["y"], domain="ai.onnx_dc")],
            [container_initializer(container)])
        models[f"DCDecompress+Gather {label}"] = _model(
            [helper.make_node("DCDecompress", ["table.dc"], ["t"], domain="ai.onnx_dc"),
             helper.make_node("Gather", ["t", "ids"], ["y"])], [container_initializer(container)])
    sessions = {}
    for name, model in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        if name.startswith("DC"):
            options.register_custom_ops_library(library)
        sessions[name] = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    print(f"table {args.vocab} x {args.hidden} float32 ({table.nbytes / 1e6:.1f} MB); medians of {args.rounds} "
          "interleaved rounds, 1 thread; us per run (ratio to Gather)")
    for tokens in args.tokens:
        ids = rng.integers(-args.vocab, args.vocab, size=(1, tokens))
        feed = {"ids": ids}
        for name, s in sessions.items():
            expected = np.take(decoded[name.split(" ", 1)[1]] if name != "Gather" else table, ids, axis=0)
            assert np.array_equal(s.run(None, feed)[0], expected), name
        medians = interleaved_medians({n: (s, feed) for n, s in sessions.items()}, rounds=args.rounds,
                                      runs_per_block=5, warmup=2)
        base = medians["Gather"]
        for name, seconds in medians.items():
            print(f"  {tokens:4d} tokens  {name:34s} {seconds * 1e6:10.1f} us {seconds / base:8.2f}x")
    print(f"held: Gather's float32 table {table.nbytes / 1e6:.1f} MB; DCGather / DCDecompress 6-bit: "
          f"codes {table.size / 1e6:.1f} MB; 90 % pruned: sparse rows "
          f"{(3 * np.count_nonzero(decoded['90% pruned 6-bit']) + 8 * (args.vocab + 1)) / 1e6:.1f} MB "
          "(plus the container initializer, and DCDecompress's output every run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
