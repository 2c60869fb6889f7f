"""DCMatMul on BERT-shaped layers against onnxruntime's float MatMul and its int8 quantize_dynamic.

    python benchmarks/bench_transformer_matmul.py [--rows 64 128 512] [--shapes 384x384 384x1536 ...]
        [--variants u8 u6 u5 p50 p90] [--threads 1 2] [--rounds 15] [--min-block-ms 20]

One MatMul layer ``Y = X @ W`` (X ``[rows, K]`` Gaussian, W ``[K, N]`` Gaussian
* 0.05) per shape, built in one process as:

* ``fp32``: onnxruntime's MatMul with W as an initializer (MLAS SGEMM with a
  prepacked B, what the original model runs);
* ``int8``: the same model after ``onnxruntime.quantization.quantize_dynamic``
  (default options: int8 weights, uint8 activations quantized per run;
  onnxruntime runs it as DynamicQuantizeMatMul / MatMulInteger);
* ``dc <variant>``: W compressed with onnx-dc's codec
  (``onnx_dc.codec.tensor.compress_tensor``: magnitude pruning, k-means weight
  sharing, the container) and run by ``DCMatMul`` through the operator
  library: ``u8`` no pruning 8-bit codes, ``u6`` / ``u5`` no pruning 6 / 5-bit,
  ``p50`` / ``p90`` 50 % / 90 % pruned 5-bit; ``u8x3`` / ``u5x3`` / ``p50x3``
  the same with ``precision = "bf16x3"`` (AMX-BF16 tiles, three bfloat16
  passes, on CPUs that have them; float elsewhere).

Timing: for each (rows, shape, threads) every session is warmed up, then
``--rounds`` rounds visit the sessions in a fresh random order, each timing a
block of runs (as many as take about ``--min-block-ms``; the same count for
every session of the group), with ``bench_lenet_latency.interleaved_medians``;
the table shows the median ms per run and the ratio to fp32 (below 1 = faster).
``err`` is the largest ``|y - y_ref|`` over the largest ``|y_ref|``, with
``y_ref`` the float64 product with the weight the session holds (fp32: W;
int8: W, so its quantization error shows; dc: the decoded container, so only
the kernel's arithmetic shows).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bench_lenet_latency import interleaved_medians  # noqa: E402
from onnx_dc import ops_library_path  # noqa: E402
from onnx_dc.codec.container_reader import decode_container  # noqa: E402
from onnx_dc.codec.tensor import TensorSettings, compress_tensor  # noqa: E402

SHAPES = ("384x384", "384x1536", "1536x384", "768x768", "768x3072", "3072x768")
#: variant -> (sparsity, bits)
VARIANTS = {"u8": (None, 8), "u6": (None, 6), "u5": (None, 5), "p50": (0.5, 5), "p90": (0.9, 5),
            "u8x3": (None, 8), "u5x3": (None, 5), "p50x3": (0.5, 5)}
DEFAULT_VARIANTS = ("u8", "u6", "u5", "p50", "p90", "u8x3", "p50x3")


def _model(node: onnx.NodeProto, initializers: list, k: int, n: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx_dc", 1)])
    model.ir_version = 8
    return model


def float_model(weight: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")
    return _model(node, [numpy_helper.from_array(weight, "w")], *weight.shape)


def int8_model(weight: np.ndarray) -> bytes:
    from onnxruntime.quantization import quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        model = float_model(weight)
        del model.opset_import[:]
        model.opset_import.append(helper.make_opsetid("", 17))
        onnx.save(model, source)
        quantize_dynamic(str(source), str(target))
        return target.read_bytes()


def dc_model(container: bytes, k: int, n: int, precision: str | None = None) -> onnx.ModelProto:
    attributes = {} if precision is None else {"precision": precision}
    node = helper.make_node("DCMatMul", ["x", "w.dc"], ["y"], domain="ai.onnx_dc", name="fc", **attributes)
    initializer = numpy_helper.from_array(np.frombuffer(container, dtype=np.uint8).copy(), "w.dc")
    return _model(node, [initializer], k, n)


def session(model: onnx.ModelProto | bytes, threads: int, library: str | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if library:
        options.register_custom_ops_library(library)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def relative_error(y: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(y.astype(np.float64) - reference).max() / np.abs(reference).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 128, 512])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="KxN")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--min-block-ms", type=float, default=20.0)
    parser.add_argument("--no-int8", action="store_true", help="leave out quantize_dynamic int8")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process
    library = ops_library_path()
    rng = np.random.default_rng(args.seed)

    print(f"onnxruntime {ort.__version__}; medians of {args.rounds} interleaved rounds; "
          "ms per run and ratio to fp32 (below 1 = faster); err = max |y - y_ref| / max |y_ref|")
    columns = ["fp32"] + ([] if args.no_int8 else ["int8"]) + [f"dc {v}" for v in args.variants]
    header = f"{'rows':>4} {'K x N':>9} {'thr':>3} " + " ".join(f"{c:>16}" for c in columns)
    print(header)
    errors: dict[str, float] = {}
    for shape in args.shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        weight = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
        models: dict[str, tuple[object, np.ndarray]] = {"fp32": (float_model(weight), weight)}
        if not args.no_int8:
            models["int8"] = (int8_model(weight), weight)
        for variant in args.variants:
            sparsity, bits = VARIANTS[variant]
            compressed = compress_tensor(weight, TensorSettings(bits=bits, sparsity=sparsity, seed=args.seed))
            precision = "bf16x3" if variant.endswith("x3") else None
            models[f"dc {variant}"] = (dc_model(compressed.container, k, n, precision),
                                       decode_container(compressed.container))
        for threads in args.threads:
            sessions = {name: session(model, threads, library if name.startswith("dc") else None)
                        for name, (model, _) in models.items()}
            for rows in args.rows:
                x = rng.standard_normal((rows, k)).astype(np.float32)
                feed = {"x": x}
                for name, (_, w) in models.items():
                    y = sessions[name].run(None, feed)[0]
                    err = relative_error(y, x.astype(np.float64) @ w.astype(np.float64))
                    errors[name] = max(errors.get(name, 0.0), err)
                # Block length from the slowest session's run time.
                slowest = 0.0
                for s in sessions.values():
                    started = time.perf_counter()
                    s.run(None, feed)
                    slowest = max(slowest, time.perf_counter() - started)
                block = max(1, int(args.min_block_ms / 1e3 / max(slowest, 1e-6)))
                medians = interleaved_medians({name: (s, feed) for name, s in sessions.items()},
                                              rounds=args.rounds, runs_per_block=block, warmup=2, seed=args.seed)
                base = medians["fp32"]
                cells = [f"{medians[c] * 1e3:8.3f} {medians[c] / base:6.2f}x" for c in columns]
                print(f"{rows:>4} {shape:>9} {threads:>3} " + " ".join(f"{c:>16}" for c in cells), flush=True)
            del sessions
    print("max err: " + ", ".join(f"{name} {e:.1e}" for name, e in errors.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
