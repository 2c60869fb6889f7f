"""DCConv on the zoo's real convolution shapes against onnxruntime's Conv, and whole conv models.

    python benchmarks/bench_conv.py layers [--layers NAME ...] [--variants u8 u6 u4 p50 p90]
        [--threads 1 2] [--rounds 15] [--min-block-ms 20] [--baseline-library OLD.so]
    python benchmarks/bench_conv.py models [--models ppocr-mobile-v2-cls ...] [--threads 1 2]
        [--settings defaults s0b8 calibrated automatic] [--cache DIR]
        [--rounds 15] [--min-block-ms 50] [--baseline-library OLD.so] [--profile DIR]

``layers``: one convolution per shape taken from the zoo's real models
(ppocr-mobile-v2-cls, ppocrv4-det, ppocrv4-rec, nudenet-320n at their
evaluation input size, batch 1; ``LAYERS`` below names each after its model
and node), built in one process as

* ``ort``: onnxruntime's Conv with the weight as an initializer (what the
  original model runs: MLAS, NCHWc at the default optimisation level);
* ``dc <variant>``: the weight (Gaussian, He-scaled) compressed with onnx-dc's
  codec (``onnx_dc.codec.tensor.compress_tensor``: magnitude pruning, k-means
  weight sharing) and run by ``DCConv``: ``u8`` / ``u6`` / ``u4`` no pruning
  8 / 6 / 4-bit codes, ``p50`` / ``p90`` 50 % / 90 % pruned 6-bit
  (``--variants all``: every pruning rate 0 / 50 / 90 % with every width 4 / 6 / 8);
* ``old <variant>`` (with ``--baseline-library``): the same DCConv model
  through another build of the library (for before / after tables).

``memory``: per real conv model, the resident memory a session adds when it
is created (in a fresh process, onnxruntime warmed up by a one-convolution
model), original against compressed, next to the dense weights' bytes, the
containers' bytes (initializers, which onnxruntime keeps) and the bytes the
DCConv layouts hold (code tiles / depthwise: 1 byte per weight, plus 1 bit per
weight for pruned weights of a full 256-value codebook; index layout: 4 bytes
per kept weight).

``levels``: per real conv model compressed with the defaults, sessions at
every graph optimisation level (ORT_DISABLE_ALL, _BASIC, _EXTENDED, _ALL):
the largest output difference to ORT_DISABLE_ALL, the operators of the
optimised graph that onnxruntime added or removed around the custom operators
(``optimized_model_filepath``), and the median latency per level.

``models``: each real conv model, original against the model compressed by
``onnx_dc.compress`` as the converter is today (BatchNormalization and
per-channel Mul / Add folded into the convolution weights, every following
activation fused into DCConv / DCMatMul), every session with default options
(``ORT_ENABLE_ALL``), one row per ``--settings``: ``defaults`` (data-free:
convolutions 10 % pruned, 8-bit), ``s0b8`` (``Recipe(sparsity=0, bits=8)``),
``calibrated`` (the recipe of ``benchmarks/dc_settings.py``'s calibrated row,
fitted on the model's ``calib`` inputs as ``compare.py`` does: a few minutes for
det and nudenet) and ``automatic`` (its automatic row: the search, slow; not
run unless asked). ``--cache DIR`` keeps the compressed models and reuses
them; ``--profile DIR`` also writes an onnxruntime profile of each model and
prints its time per operator type and its slowest nodes against the
original's.

Timing: every session is warmed up, then ``--rounds`` rounds visit the
sessions of one group in a fresh random order, each timing a block of runs (as
many as take about ``--min-block-ms``, the same count for every session of the
group; ``bench_lenet_latency.interleaved_medians``). Tables show the median per
run and the ratio to onnxruntime / the original (below 1 = faster); ``err`` is
the largest ``|y - y_ref|`` over the largest ``|y_ref|`` against onnxruntime's
Conv on the decoded weight.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bench_lenet_latency import interleaved_medians  # noqa: E402,F401  (the same interleaving, kept importable)
from onnx_dc import ops_library_path  # noqa: E402
from onnx_dc.codec.container_reader import decode_container  # noqa: E402
from onnx_dc.codec.tensor import TensorSettings, compress_tensor  # noqa: E402

#: name -> (C, M, H, W, kernel (kh, kw), attributes); shapes of real nodes (batch 1).
LAYERS: dict[str, tuple[int, int, int, int, tuple[int, int], dict]] = {
    # ppocrv4-det (3 x 736 x 992 input)
    "det.conv0 3x3 s2 3->16": (3, 16, 736, 992, (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "det.conv1 dw3x3 16": (16, 16, 368, 496, (3, 3), {"group": 16, "pads": [1, 1, 1, 1]}),
    "det.conv2 1x1 16->32": (16, 32, 368, 496, (1, 1), {}),
    "det.conv3 dw3x3 s2 32": (32, 32, 368, 496, (3, 3), {"group": 32, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "det.conv14 1x1 192->192": (192, 192, 46, 62, (1, 1), {}),
    "det.conv15 dw5x5 192": (192, 192, 46, 62, (5, 5), {"group": 192, "pads": [2, 2, 2, 2]}),
    "det.conv28 1x1 384->384": (384, 384, 23, 31, (1, 1), {}),
    "det.conv26 1x1 384->96 (SE)": (384, 96, 1, 1, (1, 1), {}),
    "det.conv55 3x3 96->24": (96, 24, 92, 124, (3, 3), {"pads": [1, 1, 1, 1]}),
    "det.conv58 3x3 96->24": (96, 24, 184, 248, (3, 3), {"pads": [1, 1, 1, 1]}),
    # ppocrv4-rec (3 x 48 x 480)
    "rec.conv0 3x3 s2 3->16": (3, 16, 48, 480, (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "rec.conv10 1x1 128->128": (128, 128, 12, 240, (1, 1), {}),
    "rec.conv11 dw3x3 s1x2 128": (128, 128, 12, 240, (3, 3), {"group": 128, "strides": [1, 2], "pads": [1, 1, 1, 1]}),
    "rec.conv14 1x1 240->240": (240, 240, 12, 120, (1, 1), {}),
    "rec.conv15 dw5x5 240": (240, 240, 12, 120, (5, 5), {"group": 240, "pads": [2, 2, 2, 2]}),
    "rec.conv28 1x1 480->480": (480, 480, 6, 120, (1, 1), {}),
    "rec.conv36 1x3 960->60": (960, 60, 1, 60, (1, 3), {"pads": [0, 1, 0, 1]}),
    # ppocr-mobile-v2-cls (3 x 48 x 192)
    "cls.conv0 3x3 s2 3->8": (3, 8, 48, 192, (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "cls.conv17 1x1 16->88": (16, 88, 3, 96, (1, 1), {}),
    "cls.conv18 dw5x5 88": (88, 88, 3, 96, (5, 5), {"group": 88, "pads": [2, 2, 2, 2]}),
    "cls.conv46 1x1 200->32": (200, 32, 2, 96, (1, 1), {}),
    "cls.conv7 dw3x3 s2x1 24": (24, 24, 12, 96, (3, 3), {"group": 24, "strides": [2, 1], "pads": [1, 1, 1, 1]}),
    # nudenet-320n (3 x 320 x 320)
    "nude.model1 3x3 s2 16->32": (16, 32, 160, 160, (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "nude.model2 3x3 16->16": (16, 16, 80, 80, (3, 3), {"pads": [1, 1, 1, 1]}),
    "nude.model22 3x3 64->64": (64, 64, 40, 40, (3, 3), {"pads": [1, 1, 1, 1]}),
    "nude.model15 1x1 192->64": (192, 64, 40, 40, (1, 1), {}),
    "nude.model8 3x3 128->128": (128, 128, 10, 10, (3, 3), {"pads": [1, 1, 1, 1]}),
    "nude.model22 3x3 256->64": (256, 64, 10, 10, (3, 3), {"pads": [1, 1, 1, 1]}),
    "nude.model0 3x3 s2 3->16": (3, 16, 320, 320, (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "nude.model3 3x3 s2 32->64": (32, 64, 80, 80, (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "nude.model5 3x3 s2 64->128": (64, 128, 40, 40, (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "nude.model7 3x3 s2 128->256": (128, 256, 20, 20, (3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "nude.model6 3x3 64->64": (64, 64, 20, 20, (3, 3), {"pads": [1, 1, 1, 1]}),
    "nude.model8 1x1 384->256": (384, 256, 10, 10, (1, 1), {}),
}
#: variant -> (sparsity, bits)
VARIANTS = {"u8": (0.0, 8), "u6": (0.0, 6), "u4": (0.0, 4), "p50": (0.5, 6), "p90": (0.9, 6),
            "p10": (0.1, 8), "p60": (0.6, 6), "p70": (0.7, 6), "p80": (0.8, 6), "p95": (0.95, 6)}
ALL_VARIANTS = {f"s{int(s * 100)}b{b}": (s, b) for s in (0.0, 0.5, 0.9) for b in (4, 6, 8)}
REAL_CONV_MODELS = ("ppocr-mobile-v2-cls", "ppocrv4-det", "ppocrv4-rec", "nudenet-320n")


def _model(node: onnx.NodeProto, initializers: list, x_shape: tuple) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx_dc", 1)])
    model.ir_version = 8
    return model


def conv_model(weight: np.ndarray, bias: np.ndarray, attributes: dict, x_shape: tuple) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attributes)
    return _model(node, [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")], x_shape)


def dc_conv_model(container: bytes, bias: np.ndarray, attributes: dict, x_shape: tuple) -> onnx.ModelProto:
    node = helper.make_node("DCConv", ["x", "w.dc", "b"], ["y"], domain="ai.onnx_dc", name="conv", **attributes)
    initializers = [numpy_helper.from_array(np.frombuffer(container, dtype=np.uint8).copy(), "w.dc"),
                    numpy_helper.from_array(bias, "b")]
    return _model(node, initializers, x_shape)


def session(model: onnx.ModelProto | bytes | str, threads: int, library: str | None,
            profile_prefix: str | None = None) -> ort.InferenceSession:
    """A session with default options (ORT_ENABLE_ALL) but the thread count."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if library:
        options.register_custom_ops_library(library)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def relative_error(y: np.ndarray, reference: np.ndarray) -> float:
    scale = float(np.abs(reference).max())
    return float(np.abs(y.astype(np.float64) - reference).max() / scale) if scale else 0.0


def timed_medians(runs: dict, *, rounds: int, runs_per_block: int, warmup: int, seed: int, clock: str,
                  stat: str = "median") -> dict:
    """Median (or minimum) seconds per run of each ``(session, feed)``, blocks interleaved in a fresh random
    order per round.

    ``clock = "wall"``: ``time.perf_counter`` (latency); ``"cpu"``: ``time.process_time``, the CPU time of
    every thread of the process (with one intra-op thread: the run's own CPU time, which time slices of
    other jobs on a shared machine do not inflate). ``stat = "min"``: the fastest block, for latencies with
    two threads on a machine whose other jobs deschedule one of them at random (their delays only add).
    """
    import random

    for s, feed in runs.values():
        for _ in range(warmup):
            s.run(None, feed)
    samples: dict = {key: [] for key in runs}
    order = list(runs)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            s, feed = runs[key]
            clock_fn = time.process_time if clock == "cpu" else time.perf_counter
            started = clock_fn()
            for _ in range(runs_per_block):
                s.run(None, feed)
            samples[key].append((clock_fn() - started) / runs_per_block)
    return {key: (min(values) if stat == "min" else statistics.median(values)) for key, values in samples.items()}


def _block(sessions: dict, feed: dict, min_block_ms: float) -> int:
    slowest = 0.0
    for s in sessions.values():
        started = time.perf_counter()
        s.run(None, feed)
        slowest = max(slowest, time.perf_counter() - started)
    return max(1, int(min_block_ms / 1e3 / max(slowest, 1e-6)))


def run_layers(args: argparse.Namespace) -> int:
    library = ops_library_path()
    variants = ALL_VARIANTS if args.variants == ["all"] else {v: VARIANTS[v] for v in args.variants}
    rng = np.random.default_rng(args.seed)
    columns = ["ort"] + [f"dc {v}" for v in variants] + ([f"old {v}" for v in variants] if args.baseline_library else [])
    print(f"onnxruntime {ort.__version__}; {args.stat}s of {args.rounds} interleaved rounds ({args.clock} clock); "
          "ms per run and ratio to onnxruntime's Conv (below 1 = faster)")
    print(f"{'layer':30s} {'thr':>3} " + " ".join(f"{c:>15}" for c in columns))
    errors: dict[str, float] = defaultdict(float)
    names = args.layers or list(LAYERS)
    for name in names:
        c, m, h, w, kernel, attributes = LAYERS[name]
        group = int(attributes.get("group", 1))
        shape = (m, c // group) + kernel
        fan_in = shape[1] * kernel[0] * kernel[1]
        weight = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        bias = (rng.standard_normal(m) * 0.1).astype(np.float32)
        x = rng.standard_normal((1, c, h, w)).astype(np.float32)
        models = {"ort": (conv_model(weight, bias, attributes, x.shape), None, weight)}
        for variant, (sparsity, bits) in variants.items():
            compressed = compress_tensor(weight, TensorSettings(bits=bits, sparsity=sparsity or None, seed=args.seed))
            model = dc_conv_model(compressed.container, bias, attributes, x.shape)
            decoded = decode_container(compressed.container)
            models[f"dc {variant}"] = (model, library, decoded)
            if args.baseline_library:
                models[f"old {variant}"] = (model, args.baseline_library, decoded)
        for threads in args.threads:
            sessions = {key: session(model, threads, lib) for key, (model, lib, _) in models.items()}
            feed = {"x": x}
            if threads == args.threads[0]:
                for key, (_, _, used) in models.items():
                    if key == "ort":
                        continue
                    reference = session(conv_model(used, bias, attributes, x.shape), 1, None).run(None, feed)[0]
                    kind = key.split()[0]
                    errors[kind] = max(errors[kind], relative_error(sessions[key].run(None, feed)[0],
                                                                    reference.astype(np.float64)))
            block = _block(sessions, feed, args.min_block_ms)
            medians = timed_medians({k: (s, feed) for k, s in sessions.items()}, rounds=args.rounds,
                                    runs_per_block=block, warmup=2, seed=args.seed, clock=args.clock,
                                    stat=args.stat)
            base = medians["ort"]
            cells = [f"{medians[k] * 1e3:7.3f} {medians[k] / base:5.2f}x" for k in columns]
            print(f"{name:30s} {threads:>3} " + " ".join(f"{cell:>15}" for cell in cells), flush=True)
            del sessions
    print("max err vs Conv on the decoded weight: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    return 0


def profile_node_times(path: str) -> tuple[dict[str, tuple[str, float]], int]:
    """Per node of an onnxruntime profile: (operator, median kernel microseconds over the runs), and the run count.

    Medians rather than sums: on a shared machine a run that was preempted inflates one sample, not the table.
    """
    events = json.loads(Path(path).read_text())
    samples: dict[str, list] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        samples.setdefault(node, [e.get("args", {}).get("op_name", "?"), []])[1].append(e["dur"])
    runs = max((len(v[1]) for v in samples.values()), default=0)
    return {node: (op, statistics.median(times)) for node, (op, times) in samples.items()}, runs


def _profile_table(path: str, top: int) -> str:
    """Time per operator type and the slowest nodes of an onnxruntime profile (median kernel time per run)."""
    nodes, runs = profile_node_times(path)
    per_type: dict[str, float] = defaultdict(float)
    for op, us in nodes.values():
        per_type[op] += us
    total = sum(per_type.values())
    lines = [f"    {runs} runs, {total / 1e3:.2f} ms of kernel time per run (sum of per-node medians)"]
    for op, us in sorted(per_type.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {op:28s} {us / 1e3:8.3f} ms  {us / total:6.1%}")
    lines.append("    slowest nodes:")
    for node, (op, us) in sorted(nodes.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"      {node[:60]:60s} {op:14s} {us / 1e3:8.3f} ms")
    return "\n".join(lines)


def _conv_key(node: str) -> str:
    """The original node name behind an onnxruntime NCHWc / fused node name."""
    for suffix in ("_output_0_nchwc", "_nchwc"):
        if node.endswith(suffix):
            node = node[: -len(suffix)] + ("_output_0" if suffix == "_output_0_nchwc" else "")
    return node.replace("_output_0", "")


def conv_comparison(nodes: dict, top: int) -> str:
    """Per DCConv node of each compressed variant: its median time beside the original's Conv of the same name."""
    original = {}
    for node, (op, us) in nodes.get("original", {}).items():
        if op in ("Conv", "FusedConv"):
            original[_conv_key(node)] = us
    lines = []
    for key, table in nodes.items():
        if key == "original":
            continue
        convs = sorted(((us, node) for node, (op, us) in table.items() if op == "DCConv"), reverse=True)
        total = sum(us for us, _ in convs)
        lines.append(f"  {key}: DCConv {total / 1e3:.2f} ms per run against the original's Conv {sum(original.values()) / 1e3:.2f} ms")
        for us, node in convs[:top]:
            ref = original.get(node)
            lines.append(f"    {node[:50]:50s} {us / 1e3:7.3f} ms" + (f"  original {ref / 1e3:7.3f} ms  {us / ref:5.2f}x" if ref else ""))
    return "\n".join(lines)


#: the compressed rows of ``models``: label -> how to compress
MODEL_SETTINGS = ("defaults", "s0b8", "calibrated", "automatic")


def compress_setting(name: str, path: str, setting: str, calib_samples: int | None = None):
    """``onnx_dc.compress`` of the real model ``name`` with one of :data:`MODEL_SETTINGS`.

    ``defaults``: data-free defaults; ``s0b8``: ``Recipe(sparsity=0, bits=8)``; ``calibrated`` /
    ``automatic``: the recipes of ``benchmarks/dc_settings.py`` with the calibration inputs
    ``compare.py`` uses (the model's ``calib`` split, ``compare_cases.FULL_SIZES``; never the
    evaluation input that is timed).
    """
    import onnx_dc
    from onnx_dc.api.recipe import Recipe

    if setting == "defaults":
        return onnx_dc.compress(path)
    if setting == "s0b8":
        return onnx_dc.compress(path, recipe=Recipe(sparsity=0, bits=8))
    from compare_cases import FULL_SIZES
    from dc_settings import settings_for
    from model_zoo import real

    settings = settings_for(name)
    count = calib_samples or FULL_SIZES[name].calib
    calib = real.get(name).make_inputs("calib", count, seed=0)
    chosen = settings.calibrated if setting == "calibrated" else settings.automatic
    if chosen is None:
        raise SystemExit(f"bench_conv: {name} has no {setting} settings in dc_settings.py")
    return onnx_dc.compress(path, recipe=chosen.recipe(), calib=calib)


def run_models(args: argparse.Namespace) -> int:
    from model_zoo import real

    library = ops_library_path()
    print(f"onnxruntime {ort.__version__}; default session options (ORT_ENABLE_ALL); batch 1; "
          f"{args.stat}s of {args.rounds} interleaved rounds ({args.clock} clock); ms per run and ratio to the original")
    for name in args.models:
        entry = real.get(name)
        path = str(entry.path())
        feed = entry.make_inputs("eval", 1, seed=0)[0]
        models: dict[str, tuple[bytes, str | None]] = {"original": (Path(path).read_bytes(), None)}
        for label in args.settings:
            cached = Path(args.cache) / f"{name}.{label}.dc.onnx" if args.cache else None
            if cached is not None and cached.exists():
                data = cached.read_bytes()
            else:
                started = time.perf_counter()
                result = compress_setting(name, path, label, args.calib_samples)
                data = result.model.SerializeToString()
                dense = sum(t.n_weights for t in result.report.tensors) * 4
                print(f"{name:20s} {label}: compressed in {time.perf_counter() - started:.0f} s "
                      f"({dense / 1e6:.2f} MB of dense weights compressed)", flush=True)
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    cached.write_bytes(data)
            models[f"dc {label}"] = (data, library)
            if args.baseline_library:
                models[f"old {label}"] = (data, args.baseline_library)
        for threads in args.threads:
            sessions = {k: session(d, threads, lib) for k, (d, lib) in models.items()}
            block = _block(sessions, feed, args.min_block_ms)
            medians = timed_medians({k: (s, feed) for k, s in sessions.items()}, rounds=args.rounds,
                                    runs_per_block=block, warmup=2, seed=args.seed, clock=args.clock,
                                    stat=args.stat)
            base = medians["original"]
            cells = "  ".join(f"{k} {medians[k] * 1e3:8.2f} ms {medians[k] / base:5.2f}x" for k in sessions)
            print(f"{name:20s} thr {threads}: {cells}", flush=True)
            del sessions
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            nodes = {}
            for key in [k for k in models if k != "original"] + ["original"]:
                data, lib = models[key]
                prefix = str(Path(args.profile) / f"{name}.{key.replace(' ', '_')}")
                s = session(data, 1, lib, profile_prefix=prefix)
                for _ in range(args.profile_runs):
                    s.run(None, feed)
                profile = s.end_profiling()
                nodes[key] = profile_node_times(profile)[0]
                print(f"  profile {name} / {key} (1 thread):\n" + _profile_table(profile, args.top))
            print(conv_comparison(nodes, args.top))
    return 0


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def _measure_memory(model_path: str, library: str | None) -> int:
    """Resident bytes creating a session of the model adds (run in a fresh process)."""
    import gc

    warm_weight = np.ones((1, 1, 1, 1), np.float32)
    warm = session(conv_model(warm_weight, np.zeros(1, np.float32), {}, (1, 1, 2, 2)), 1, library)
    warm.run(None, {"x": np.ones((1, 1, 2, 2), np.float32)})
    gc.collect()
    before = resident_bytes()
    s = session(Path(model_path).read_bytes(), 1, library)
    gc.collect()
    after = resident_bytes()
    del s
    return after - before


def session_memory_bytes(model: bytes, library: str | None) -> int:
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model)
        command = [sys.executable, __file__, "memory", "--measure", str(path)] + (["--library", library] if library else [])
        result = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


def layout_bytes(tensor) -> int:
    """Bytes the DCConv layout of one compressed conv weight holds (runtime/src/conv.cc BuildConvWeights):
    index layout below 25 % kept (4 per kept weight, 8 per output channel); else 1 byte per weight, half a
    byte with at most 16 values (4-bit codes), plus 1 bit per weight when pruned weights have no zero
    index (a 256-value codebook, or 16 values with 4-bit codes); 1 KiB of codebook."""
    n, kept = tensor.n_weights, tensor.n_kept
    if kept < 0.25 * n:
        return 4 * kept + 8 * tensor.shape[0] + 1024
    values = tensor.codebook_size
    nibbles = values <= 16
    pruned = kept < n
    masked = pruned and values >= (16 if nibbles else 256)
    return (n + 1) // 2 * nibbles + n * (not nibbles) + (n + 7) // 8 * masked + 1024


def run_memory(args: argparse.Namespace) -> int:
    import onnx_dc
    from model_zoo import real
    from onnx_dc.api.recipe import Recipe

    if args.measure:
        print(_measure_memory(args.measure, args.library))
        return 0
    library = ops_library_path()
    print("resident memory a session adds (fresh process), MB; weights: dense float32, containers, DCConv layouts")
    recipes = (("defaults", None), ("s0 b8", Recipe(sparsity=0, bits=8)), ("s50 b4", Recipe(sparsity=0.5, bits=4)))
    for name in args.models:
        path = str(real.get(name).path())
        original = Path(path).read_bytes()
        base = session_memory_bytes(original, None)
        print(f"{name:20s} original: session +{base / 1e6:7.2f} MB")
        for label, recipe in recipes:
            result = onnx_dc.compress(path) if recipe is None else onnx_dc.compress(path, recipe=recipe)
            convs = [t for t in result.report.tensors if len(t.shape) == 4]
            dense = sum(4 * t.n_weights for t in convs)
            containers = sum(t.compressed_bytes for t in convs)
            layouts = sum(layout_bytes(t) for t in convs)
            rss = session_memory_bytes(result.model.SerializeToString(), library)
            print(f"{'':20s} {label:9s}: session +{rss / 1e6:7.2f} MB ({rss / base:4.2f}x the original's); conv weights "
                  f"dense {dense / 1e6:6.2f} MB, containers {containers / 1e6:5.2f} MB ({containers / dense:4.1%}), "
                  f"layouts {layouts / 1e6:5.2f} MB ({layouts / dense:4.1%}), both {(containers + layouts) / dense:4.1%}")
    return 0


LEVELS = {
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def run_levels(args: argparse.Namespace) -> int:
    import onnx_dc
    from model_zoo import real

    library = ops_library_path()
    for name in args.models:
        entry = real.get(name)
        feed = entry.make_inputs("eval", 1, seed=0)[0]
        data = onnx_dc.compress(str(entry.path())).model.SerializeToString()
        sessions, outputs, ops = {}, {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for level, value in LEVELS.items():
                options = ort.SessionOptions()
                options.intra_op_num_threads = args.threads[0]
                options.graph_optimization_level = value
                options.log_severity_level = 3
                options.optimized_model_filepath = str(Path(tmp) / f"{level}.onnx")
                options.register_custom_ops_library(library)
                sessions[level] = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
                outputs[level] = sessions[level].run(None, feed)
                graph = onnx.load(options.optimized_model_filepath).graph
                ops[level] = defaultdict(int)
                for node in graph.node:
                    ops[level][node.op_type] += 1
        block = _block(sessions, feed, args.min_block_ms)
        medians = timed_medians({k: (s, feed) for k, s in sessions.items()}, rounds=args.rounds, runs_per_block=block,
                                warmup=2, seed=args.seed, clock=args.clock, stat=args.stat)
        print(f"{name}:")
        for level in LEVELS:
            diff = max(float(np.abs(a - b).max()) if a.size else 0.0
                       for a, b in zip(outputs[level], outputs["disable_all"]))
            custom = {op: n for op, n in ops[level].items() if op.startswith("DC")}
            added = {op: n - ops["disable_all"].get(op, 0) for op, n in ops[level].items()
                     if n != ops["disable_all"].get(op, 0) and not op.startswith("DC")}
            print(f"  {level:12s} {medians[level] * 1e3:8.2f} ms  max |diff| {diff:.1e}  custom ops {dict(custom)}  "
                  f"other ops changed vs disable_all {dict(added)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    layers = sub.add_parser("layers")
    layers.add_argument("--layers", nargs="+", choices=list(LAYERS))
    layers.add_argument("--variants", nargs="+", default=["u8", "u6", "u4", "p50", "p90"],
                        choices=list(VARIANTS) + ["all"])
    layers.add_argument("--min-block-ms", type=float, default=20.0)
    models = sub.add_parser("models")
    models.add_argument("--models", nargs="+", default=list(REAL_CONV_MODELS))
    models.add_argument("--min-block-ms", type=float, default=50.0)
    models.add_argument("--profile", metavar="DIR")
    models.add_argument("--profile-runs", type=int, default=10)
    models.add_argument("--top", type=int, default=12)
    models.add_argument("--settings", nargs="+", choices=MODEL_SETTINGS, default=["defaults", "s0b8", "calibrated"],
                        help="compressed rows (automatic: the automatic mode's search, slow)")
    models.add_argument("--cache", metavar="DIR", help="keep the compressed models here and reuse them")
    models.add_argument("--calib-samples", type=int, help="calibration inputs (default: compare.py's count)")
    levels = sub.add_parser("levels")
    levels.add_argument("--models", nargs="+", default=list(REAL_CONV_MODELS))
    levels.add_argument("--min-block-ms", type=float, default=50.0)
    memory = sub.add_parser("memory")
    memory.add_argument("--models", nargs="+", default=list(REAL_CONV_MODELS))
    memory.add_argument("--measure", help=argparse.SUPPRESS)
    memory.add_argument("--library", help=argparse.SUPPRESS)
    for p in (layers, models, levels):
        p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
        p.add_argument("--rounds", type=int, default=15)
        p.add_argument("--baseline-library", help="another build of the library, measured beside this one")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                       help="cpu: process CPU time instead of wall time (1 thread on a loaded machine)")
        p.add_argument("--stat", choices=["median", "min"], default="median",
                       help="min: the fastest block (2 threads on a loaded machine)")
    args = parser.parse_args(argv)
    if args.command == "memory":
        return run_memory(args)
    if args.command == "levels":
        return run_levels(args)
    return run_layers(args) if args.command == "layers" else run_models(args)


if __name__ == "__main__":
    sys.exit(main())
