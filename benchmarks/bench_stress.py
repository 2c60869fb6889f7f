"""Stress figures for the operator library and the decoders (issue 7: concurrency, leaks, linear decoding).

    python benchmarks/bench_stress.py                 # full sizes (a few minutes)
    python benchmarks/bench_stress.py --quick         # tiny sizes (used by tests/test_runtime_stress.py)
    python benchmarks/bench_stress.py --json out.json # also write the figures as JSON

Prints three tables, all measured in this run:

1. one session shared by N Python threads: runs, errors, runs whose output
   differs from the single-threaded output, runs per second;
2. session churn: resident memory after a warm-up and after creating, running
   and destroying many sessions (in a fresh child process), next to what one
   live session holds;
3. decode time against container size for adversarial containers (one chunk
   holding every symbol, an invalid code word at the very end, a chunk per
   symbol), numpy and C++ decoders side by side: nanoseconds per input byte
   stay flat when decoding is linear.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "fuzz"))

import onnx_dc  # noqa: E402
from onnx_dc.api.recipe import Recipe

LENET = REPO_ROOT / "model_zoo" / "models" / "lenet_300_100.onnx"


# ---------------------------------------------------------------------------- models
def _conv_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv 8@3x3 -> Relu -> Flatten -> MatMul: the conv weight goes through DCDecompress."""
    weights = [
        numpy_helper.from_array((rng.standard_normal((8, 1, 3, 3)) * 0.3).astype(np.float32), "conv.weight"),
        numpy_helper.from_array((rng.standard_normal((8 * 10 * 10, 10)) * 0.1).astype(np.float32), "fc.weight"),
    ]
    nodes = [
        h.make_node("Conv", ["x", "conv.weight"], ["c"], name="conv", kernel_shape=[3, 3]),
        h.make_node("Relu", ["c"], ["r"]),
        h.make_node("Flatten", ["r"], ["f"]),
        h.make_node("MatMul", ["f", "fc.weight"], ["y"], name="fc"),
    ]
    graph = h.make_graph(nodes, "convnet", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 12, 12])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], weights)
    return _finish(graph)


def _embedding_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Gather embedding (DCDecompress) -> ReduceMean -> MatMul (DCMatMul)."""
    weights = [
        numpy_helper.from_array((rng.standard_normal((100, 48)) * 0.3).astype(np.float32), "embed.weight"),
        numpy_helper.from_array((rng.standard_normal((48, 8)) * 0.3).astype(np.float32), "head"),
    ]
    nodes = [
        h.make_node("Gather", ["embed.weight", "ids"], ["e"], name="embed"),
        h.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
        h.make_node("MatMul", ["m", "head"], ["y"], name="head"),
    ]
    graph = h.make_graph(nodes, "embedding", [h.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], weights)
    return _finish(graph)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _corrupt(model: onnx.ModelProto, container: str, mutate) -> onnx.ModelProto:  # noqa: ANN001
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.name == container:
            data = mutate(bytearray(numpy_helper.to_array(tensor).tobytes()))
            tensor.CopyFrom(numpy_helper.from_array(np.frombuffer(bytes(data), np.uint8).copy(), container))
            return out
    raise KeyError(container)


def write_models(directory: Path) -> dict[str, Path]:
    """Compressed models for the stress runs, plus two LeNets with a corrupted container."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    sources = {"lenet_300_100": LENET}
    for name, model in (("convnet", _conv_model(rng)), ("embedding", _embedding_model(rng))):
        sources[name] = directory / f"{name}.onnx"
        onnx.save(model, str(sources[name]))
    paths = {}
    for name, source in sources.items():
        paths[name] = directory / f"{name}.dc.onnx"
        onnx_dc.compress(source, paths[name], Recipe(min_elements=64))
    lenet = onnx.load(str(paths["lenet_300_100"]))
    container = next(n.input[1] for n in lenet.graph.node if n.op_type == "DCMatMul")

    def flip(data: bytearray) -> bytearray:
        data[len(data) // 2] ^= 0x10
        return data

    for name, mutate in (("corrupted_crc", flip), ("corrupted_truncated", lambda d: d[:20])):
        paths[name] = directory / f"{name}.onnx"
        onnx.save(_corrupt(lenet, container, mutate), str(paths[name]))
    return paths


def make_session(path: Path, intra_op_threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.log_severity_level = 4
    options.register_custom_ops_library(onnx_dc.ops_library_path())
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def model_inputs(session: ort.InferenceSession, rng: np.random.Generator, batch: int = 2) -> dict[str, np.ndarray]:
    """Inputs matching the session's input specs (dynamic dimensions = ``batch``)."""
    feeds = {}
    for spec in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else batch for d in spec.shape]
        if spec.type == "tensor(int64)":
            feeds[spec.name] = rng.integers(0, 100, size=shape).astype(np.int64)
        else:
            x = rng.standard_normal(shape).astype(np.float32)
            x[rng.random(shape) < 0.3] = 0.0
            feeds[spec.name] = x
    return feeds


# ---------------------------------------------------------------------------- shared session
@dataclass
class SharedSessionResult:
    """Outcome of :func:`shared_session_runs`."""

    model: str
    threads: int
    runs: int = 0
    mismatches: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def shared_session_runs(model: Path, *, threads: int, total_runs: int, intra_op_threads: int = 2,
                        batch: int = 3, name: str | None = None) -> SharedSessionResult:
    """``threads`` Python threads call ``run`` on one session, ``total_runs`` calls in all.

    Each thread has its own inputs; every output is compared bit for bit with
    the output of a single-threaded run on the same inputs.
    """
    session = make_session(model, intra_op_threads)
    rng = np.random.default_rng(1)
    feeds = [model_inputs(session, rng, batch) for _ in range(threads)]
    expected = [session.run(None, f) for f in feeds]
    result = SharedSessionResult(model=name or model.name, threads=threads)
    lock = threading.Lock()
    per_thread = [total_runs // threads + (i < total_runs % threads) for i in range(threads)]

    def worker(index: int) -> None:
        runs = mismatches = 0
        errors = []
        for _ in range(per_thread[index]):
            try:
                outputs = session.run(None, feeds[index])
            except Exception as error:  # noqa: BLE001 - any onnxruntime failure is counted
                errors.append(f"{type(error).__name__}: {error}")
                continue
            finally:
                runs += 1
            if any(not np.array_equal(a, b) for a, b in zip(outputs, expected[index], strict=True)):
                mismatches += 1
        with lock:
            result.runs += runs
            result.mismatches += mismatches
            result.errors += errors[:5]

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    result.seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------- session churn
def _resident_bytes() -> int:
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _session_churn(models: list[Path], sessions: int, warmup: int, held: int) -> dict:
    """Create, run once and destroy sessions (cycling over ``models``); RSS before and after."""
    rng = np.random.default_rng(2)
    feeds = {m: model_inputs(make_session(m), rng) for m in models}

    def one(i: int) -> None:
        model = models[i % len(models)]
        session = make_session(model, 1 + i % 2)
        session.run(None, feeds[model])
        del session

    for i in range(warmup):
        one(i)
    gc.collect()
    before = _resident_bytes()
    start = time.perf_counter()
    checkpoints = []
    for i in range(sessions):
        one(i)
        if (i + 1) % max(1, sessions // 4) == 0:
            gc.collect()
            checkpoints.append([i + 1, _resident_bytes() - before])
    seconds = time.perf_counter() - start
    gc.collect()
    after = _resident_bytes()
    alive = [make_session(models[i % len(models)]) for i in range(held)]
    holding = _resident_bytes()
    del alive
    return {
        "sessions": sessions,
        "warmup": warmup,
        "models": [m.stem for m in models],
        "rss_after_warmup_bytes": before,
        "rss_after_bytes": after,
        "growth_bytes": after - before,
        "checkpoints": checkpoints,
        "held_bytes_per_session": (holding - after) / max(1, held),
        "seconds": seconds,
    }


def session_churn_in_child(models: list[Path], *, sessions: int, warmup: int = 100, held: int = 100) -> dict:
    """:func:`_session_churn` in a fresh Python process (its memory is the measurement)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--churn-child", json.dumps(
        {"models": [str(m) for m in models], "sessions": sessions, "warmup": warmup, "held": held})]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"session churn child failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- decode linearity
def decode_linearity(sizes: list[int], repeats: int = 3) -> list[dict]:
    """Best-of-``repeats`` decode time of adversarial containers of growing size, both decoders."""
    import fuzz_support
    from fuzz_support import CraftedStream, craft_container

    def one_chunk(n: int, rng: np.random.Generator) -> bytes:
        return craft_container(dims=(n,), entries=n, chunk_symbols=n, streams=[
            CraftedStream(mode=1, code_lengths=(1, 1), bits=rng.integers(0, 2, n), chunk_bits=[n])])

    def bad_last(n: int, rng: np.random.Generator) -> bytes:
        bits = np.zeros(n, dtype=np.uint8)
        bits[-1] = 1
        return craft_container(dims=(n,), entries=n, chunk_symbols=n, streams=[
            CraftedStream(mode=1, code_lengths=(1,), bits=bits, chunk_bits=[n])])

    def chunk_per_symbol(n: int, rng: np.random.Generator) -> bytes:
        return craft_container(dims=(2 * n + 1,), entries=n, chunk_symbols=1, layout=1, index_bits=1, streams=[
            CraftedStream(mode=0, raw_width=1, symbols=rng.integers(0, 2, n)),
            CraftedStream(mode=0, raw_width=1, symbols=rng.integers(0, 2, n))])

    def normal(n: int, rng: np.random.Generator) -> bytes:
        from onnx_dc.codec.container import encode_container

        codes = rng.integers(0, 32, n)
        codes[rng.random(n) < 0.9] = -1
        return encode_container(codes, np.linspace(-1, 1, 32).astype(np.float32), bits=5, index_bits=5)

    cpp = fuzz_support.CppDecoder()
    rows = []
    families = {"zoo-like (C=1024)": normal, "one chunk": one_chunk, "bad code word at end": bad_last,
                "chunk per symbol": chunk_per_symbol}
    for family, make in families.items():
        for decoder in ("numpy", "C++"):
            first = None
            for n in sizes:
                data = make(n, np.random.default_rng(n))
                best = float("inf")
                for _ in range(repeats):
                    start = time.perf_counter()
                    if decoder == "numpy":
                        fuzz_support.numpy_outcome(data)
                    else:
                        cpp.outcome(data, threads=1, expand=False)
                    best = min(best, time.perf_counter() - start)
                ns_per_byte = best * 1e9 / len(data)
                first = first or ns_per_byte
                rows.append({"decoder": decoder, "family": family, "symbols": n, "bytes": len(data),
                             "seconds": best, "ns_per_byte": ns_per_byte, "vs_smallest": ns_per_byte / first})
    return rows


# ---------------------------------------------------------------------------- main
def _print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in [head] + [r[i] for r in rows]) for i, head in enumerate(header)]
    print("  ".join(str(x).rjust(w) for x, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--runs", type=int, default=None, help="runs per shared session (default 100000)")
    parser.add_argument("--sessions", type=int, default=None, help="sessions to churn (default 5000)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--churn-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.churn_child:
        spec = json.loads(args.churn_child)
        report = _session_churn([Path(m) for m in spec["models"]], spec["sessions"], spec["warmup"], spec["held"])
        print(json.dumps(report))
        return 0
    runs = args.runs or (400 if args.quick else 100_000)
    sessions = args.sessions or (40 if args.quick else 5000)
    sizes = [1 << 8, 1 << 10] if args.quick else [1 << 10, 1 << 13, 1 << 16, 1 << 18]

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        models = write_models(Path(tmp))
        shared = [shared_session_runs(models[name], threads=args.threads, total_runs=runs, name=name)
                  for name in ("lenet_300_100", "convnet", "embedding")]
        churn = session_churn_in_child([models["lenet_300_100"], models["convnet"], models["embedding"]],
                                       sessions=sessions, warmup=min(100, sessions), held=min(100, sessions))
    linearity = decode_linearity(sizes, repeats=1 if args.quick else 3)

    _print_table(
        f"1. One session shared by {args.threads} threads (intra-op threads 2, batch 3)",
        ["model", "threads", "runs", "errors", "mismatches", "identical", "seconds", "runs/s"],
        [[r.model, r.threads, r.runs, len(r.errors), r.mismatches, "yes" if not r.errors and not r.mismatches
          else "NO", f"{r.seconds:.2f}", f"{r.runs / r.seconds:.0f}"] for r in shared],
    )
    mib = 1 << 20
    _print_table(
        f"2. Session churn ({', '.join(churn['models'])}, cycled; fresh process, {churn['warmup']} warm-up sessions)",
        ["sessions", "RSS after warm-up", "RSS growth", "growth/session", "one live session holds", "seconds"],
        [[f"{n}", f"{churn['rss_after_warmup_bytes'] / mib:.1f} MiB", f"{g / mib:+.2f} MiB",
          f"{g / n / 1024:+.2f} KiB", f"{churn['held_bytes_per_session'] / 1024:.0f} KiB",
          f"{churn['seconds']:.1f}" if n == churn["sessions"] else ""]
         for n, g in churn["checkpoints"]],
    )
    _print_table(
        "3. Decode time vs container size (best of runs; ns/byte flat = linear)",
        ["decoder", "container", "symbols", "bytes", "ms", "ns/byte", "vs smallest"],
        [[r["decoder"], r["family"], r["symbols"], r["bytes"], f"{r['seconds'] * 1e3:.2f}",
          f"{r['ns_per_byte']:.0f}", f"{r['vs_smallest']:.2f}"] for r in linearity],
    )
    if args.json:
        args.json.write_text(json.dumps({
            "shared_session": [{"model": r.model, "threads": r.threads, "runs": r.runs, "errors": len(r.errors),
                                "mismatches": r.mismatches, "seconds": r.seconds} for r in shared],
            "session_churn": churn,
            "decode_linearity": linearity,
        }, indent=2))
    failed = any(r.errors or r.mismatches for r in shared)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
