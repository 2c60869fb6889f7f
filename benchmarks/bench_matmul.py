"""DCMatMul (compressed weight, onnx-dc operator library) vs onnxruntime's dense MatMul.

Builds, in one process, an fc6-sized ``Y = X @ W`` model (W 4096 x 4096
float32) twice: once with the dense W, once with W pruned to 90 % sparsity by
magnitude and quantized to 5-bit codes (1-D k-means, linear init), stored as a
container and run by DCMatMul. For batch 1, 8 and 64 and 1 and 2 intra-op
threads it prints the median latency of each (blocks of runs of the two
sessions alternate, so machine noise hits both alike) and the ratio dense/compressed,
for Gaussian inputs and for ReLU-like inputs (50 % zeros). The compressed model
is the one onnx-dc's converter writes for each case: for Gaussian inputs a
plain DCMatMul (the weight held as column runs), for ReLU-like inputs a DCMatMul
with ``sparse_input=1`` (what the converter emits when X is a ReLU output: row
runs, zero activations skipped); see docs/OPERATORS.md. It also prints the
resident memory each session adds when it is created.

Targets (issue 4): batch 1 compressed >= 5x faster than dense with the same
threads; batch 8 not slower; memory held for the weight <= 1/8 of dense.

    python benchmarks/bench_matmul.py [--size 4096] [--sparsity 0.9] [--bits 5] [--min-time 0.5]
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnx_dc import ops_library_path  # noqa: E402
from onnx_dc.codec.clustering import kmeans_1d  # noqa: E402
from onnx_dc.codec.container_reader import decode_container, decode_container_codes  # noqa: E402
from onnx_dc.codec.container import encode_container
from onnx_dc.codec.pruning import prune_by_magnitude  # noqa: E402

BATCH1_TARGET = 5.0
BATCH8_TARGET = 1.0
MEMORY_TARGET = 1.0 / 8


@dataclass(frozen=True)
class Timing:
    inputs: str
    threads: int
    batch: int
    dense_ms: float
    compressed_ms: float

    @property
    def ratio(self) -> float:
        return self.dense_ms / self.compressed_ms


def compress_weight(weight: np.ndarray, *, sparsity: float, bits: int, index_bits: int = 5) -> bytes:
    """Magnitude pruning + k-means weight sharing, encoded as a container."""
    keep = prune_by_magnitude(weight, sparsity)
    clusters = kmeans_1d(weight[keep], 1 << bits, init="linear")
    codes = np.full(weight.shape, -1, dtype=np.int16)
    codes[keep] = clusters.labels
    return encode_container(codes, clusters.centroids.astype(np.float32), bits=bits, index_bits=index_bits)


GROUP_SIZE = 8  # runtime/src/sparse_matmul.h: kGroupSize
MAX_BLOCK_ROWS = 4096  # runtime/src/matmul_kernels.h: kMaxBlockRows (column runs)
MAX_BLOCK_COLUMNS = 2048  # kMaxBlockColumns (row runs)


def layout_bytes(codes: np.ndarray, *, row_runs: bool) -> int:
    """Bytes of DCMatMul's index layout for ``codes`` ([K, N], -1 where pruned), as docs/OPERATORS.md describes it.

    Per kept weight a 16-bit position; per group of GROUP_SIZE weights of one
    codebook index in a run one index byte, per remaining (single) weight one;
    per run two 32-bit offsets (plus one per block); the codebook as 256 float32.
    """
    k, n = codes.shape
    rows, columns = np.nonzero(codes >= 0)
    values = codes[rows, columns].astype(np.int64)
    if row_runs:
        blocks = -(-n // MAX_BLOCK_COLUMNS)
        block_size = -(-n // blocks)
        run = (columns // block_size) * k + rows
        runs = blocks * (k + 1)
    else:
        blocks = -(-k // MAX_BLOCK_ROWS)
        block_size = -(-k // blocks)
        run = (rows // block_size) * n + columns
        runs = blocks * (n + 1)
    per_index = np.bincount(run * 256 + values)
    index_bytes = int((per_index // GROUP_SIZE).sum() + (per_index % GROUP_SIZE).sum())
    return 2 * len(values) + index_bytes + 2 * 4 * runs + 4 * 256


def _model(node: onnx.NodeProto, initializers: list[onnx.TensorProto], k: int, n: int) -> bytes:
    graph = helper.make_graph(
        [node],
        "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx_dc", 1)])
    model.ir_version = 8
    return model.SerializeToString()


def dense_model(weight: np.ndarray) -> bytes:
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")
    return _model(node, [numpy_helper.from_array(weight, "w")], *weight.shape)


def compressed_model(container: bytes, k: int, n: int, *, sparse_input: bool = False) -> bytes:
    attributes = {"sparse_input": 1} if sparse_input else {}
    node = helper.make_node("DCMatMul", ["x", "w.dc"], ["y"], domain="ai.onnx_dc", name="fc", **attributes)
    initializer = numpy_helper.from_array(np.frombuffer(container, dtype=np.uint8).copy(), "w.dc")
    return _model(node, [initializer], k, n)


def resident_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def create_session(model: bytes, threads: int, library: str | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def session_memory_bytes(model: bytes, threads: int, library: str | None) -> int:
    """Resident memory that creating a session of ``model`` adds, measured in a fresh process.

    A fresh interpreter gives a clean baseline: in this process, memory freed
    earlier (by the models built above) would be reused and hide the cost.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model)
        command = [sys.executable, __file__, "--measure-memory", str(path), "--threads", str(threads)]
        if library:
            command += ["--library", library]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


def _measure_memory(model_path: str, threads: int, library: str | None) -> int:
    model = Path(model_path).read_bytes()
    # Warm up onnxruntime's process-wide state (environment, thread pools,
    # allocators, the registered library) with a 1 x 1 model of the same kind,
    # so the delta below is what this model's session holds.
    tiny_weight = np.ones((1, 1), np.float32)
    tiny = (compressed_model(compress_weight(tiny_weight, sparsity=0.0, bits=1), 1, 1) if library
            else dense_model(tiny_weight))
    warm = create_session(tiny, threads, library)
    warm.run(None, {"x": tiny_weight})
    gc.collect()
    before = resident_bytes()
    session = create_session(model, threads, library)
    gc.collect()
    after = resident_bytes()
    del session
    return after - before


def alternating_medians(
    dense: ort.InferenceSession, compressed: ort.InferenceSession, x: np.ndarray, min_time_s: float, block: int = 10
) -> tuple[float, float]:
    """Median latency (ms) of each session: alternating blocks of ``block`` timed runs, at least ``min_time_s`` each.

    Each block starts with one untimed run, so every timed run sees that
    session's steady state (its weights in cache as far as they fit) while
    machine noise still falls on both sessions alike.
    """
    feed = {"x": x}
    times: tuple[list[float], list[float]] = ([], [])
    spent = [0.0, 0.0]
    while min(len(t) for t in times) < 3 * block or min(spent) < min_time_s:
        for i, session in enumerate((dense, compressed)):
            session.run(None, feed)
            for _ in range(block):
                start = time.perf_counter()
                session.run(None, feed)
                elapsed = time.perf_counter() - start
                times[i].append(elapsed)
                spent[i] += elapsed
        if len(times[0]) >= 5000:
            break
    return float(np.median(times[0]) * 1e3), float(np.median(times[1]) * 1e3)


def relu_like(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Activations after a ReLU: half of them exactly zero."""
    return np.maximum(rng.standard_normal(shape), 0.0).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="K = N of the weight (default 4096, fc6-sized)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--bits", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of runs per session and setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure-memory", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--library", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_memory:  # child process of session_memory_bytes
        print(_measure_memory(args.measure_memory, args.threads[0], args.library))
        return 0

    library = ops_library_path()
    rng = np.random.default_rng(args.seed)
    k = n = args.size
    weight = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    container = compress_weight(weight, sparsity=args.sparsity, bits=args.bits)
    quantized = decode_container(container)
    dense_bytes = dense_model(weight)
    compressed_bytes = {
        "gaussian": compressed_model(container, k, n),
        "relu 50%": compressed_model(container, k, n, sparse_input=True),
    }
    weight_mb = weight.nbytes / 1e6
    kept = int(np.count_nonzero(quantized))

    print(f"DCMatMul vs onnxruntime MatMul: W {k} x {n} float32 ({weight_mb:.1f} MB), "
          f"{args.sparsity:.0%} pruned ({kept} weights kept), {args.bits}-bit codes, "
          f"container {len(container) / 1e6:.2f} MB")
    print(f"onnxruntime {ort.__version__}, {len(args.threads)} thread settings, medians of alternating blocks of runs")

    # Correctness first: both sessions agree with the numpy reference.
    check_x = relu_like(rng, (3, k))
    reference = check_x.astype(np.float64) @ quantized.astype(np.float64)
    for variant in compressed_bytes.values():
        check = create_session(variant, 1, library)
        error = np.abs(check.run(None, {"x": check_x})[0] - reference).max() / np.abs(reference).max()
        print(f"compressed vs numpy reference: max relative error {error:.2e}")
        del check

    timings: list[Timing] = []
    memory: dict[tuple[int, str], tuple[int, int]] = {}
    print()
    print(f"{'inputs':<10} {'threads':>7} {'batch':>5} {'dense ms':>9} {'dc ms':>8} {'dense/dc':>9}  target")
    for threads in args.threads:
        dense_rss = session_memory_bytes(dense_bytes, threads, None)
        for inputs, variant in compressed_bytes.items():
            memory[threads, inputs] = (dense_rss, session_memory_bytes(variant, threads, library))
        dense = create_session(dense_bytes, threads, None)
        for inputs in ("gaussian", "relu 50%"):
            compressed = create_session(compressed_bytes[inputs], threads, library)
            for batch in args.batches:
                shape = (batch, k)
                x = rng.standard_normal(shape).astype(np.float32) if inputs == "gaussian" else relu_like(rng, shape)
                dense_ms, compressed_ms = alternating_medians(dense, compressed, x, args.min_time)
                timing = Timing(inputs, threads, batch, dense_ms, compressed_ms)
                timings.append(timing)
                target = {1: BATCH1_TARGET, 8: BATCH8_TARGET}.get(batch)
                verdict = "" if target is None else f">= {target:g}x {'met' if timing.ratio >= target else 'MISSED'}"
                print(f"{inputs:<10} {threads:>7} {batch:>5} {dense_ms:>9.4f} {compressed_ms:>8.4f} "
                      f"{timing.ratio:>8.2f}x  {verdict}", flush=True)
            del compressed
        del dense
        gc.collect()

    print()
    print("resident memory a session adds when created (fresh process, onnxruntime warmed up by a 1 x 1 model):")
    for (threads, inputs), (dense_rss, compressed_rss) in memory.items():
        ratio = compressed_rss / dense_rss if dense_rss > 0 else float("nan")
        verdict = "met" if 0 < ratio <= MEMORY_TARGET else "MISSED"
        print(f"  {threads} thread(s), {inputs + ' model:':<16} dense +{dense_rss / 1e6:.1f} MB, "
              f"compressed +{compressed_rss / 1e6:.1f} MB, compressed/dense {ratio:.3f} "
              f"(target <= {MEMORY_TARGET:.3f}: {verdict})")
    codes, _ = decode_container_codes(container)
    column_runs_mb = layout_bytes(codes, row_runs=False) / 1e6
    row_runs_mb = layout_bytes(codes, row_runs=True) / 1e6
    print(f"  of which the DCMatMul layout: {column_runs_mb:.2f} MB as column runs (gaussian model), "
          f"{row_runs_mb:.2f} MB as row runs (relu model), {column_runs_mb * 1e6 / kept:.2f} / "
          f"{row_runs_mb * 1e6 / kept:.2f} bytes per kept weight with codebook and run offsets; "
          f"the container initializer {len(container) / 1e6:.2f} MB; dense weight {weight_mb:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
