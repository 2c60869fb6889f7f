"""onnx-dc side by side with the tools users would pick instead, on the zoo's models (issue 6).

    python benchmarks/compare.py [--models a,b,...] [--quick] [--out DIR]

For each model (the two Fashion-MNIST LeNets and the real models of
``model_zoo.real``) it builds, in one process:

* the original file and the original compressed with zstd -19;
* onnxruntime's ``quantize_dynamic`` (int8 weights), on the file as it is and, for
  models whose weights are Constant nodes, after turning them into initializers;
* onnxruntime's 4-bit ``MatMulNBits`` quantizer, where the model has MatMul weights;
* onnx-dc with its data-free defaults; with calibration data and the per-model
  settings of ``benchmarks/dc_settings.py`` (chosen on calibration material only,
  ``benchmarks/check_dc_settings.py``); and in automatic mode (a per-layer search
  within a budget: top-1 drop on held-out labelled training images for the LeNets,
  output cosine on held-out calibration inputs otherwise), where that runs in
  reasonable time;

and measures for each: stored size and ratio to the original file, the task metric
(top-1 test accuracy for the LeNets; agreement of boxes / strings / orientations
with the original for the real models), tensor fidelity of the outputs against the
original (cosine, max abs diff over every output of every evaluation input), and
batch-1 latency with one intra-op thread relative to the original (onnx-dc through
its operator library; its decompressed model too). Latency: every session is
warmed up, then rounds of timed blocks of runs visit the sessions in a fresh random
order each round (so machine noise hits all of them alike); the median block is
reported.

It writes ``compare.md`` and ``compare.json`` (the table) and one PNG per model
(ratio on a log axis against the task metric, one point per method) to ``--out``
(default ``benchmarks/results``), and prints the table. ``--quick`` uses small
splits and a short latency budget (a few minutes for every model; used by the tests).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import compare_methods as methods  # noqa: E402
from benchmarks.compare_cases import (  # noqa: E402
    LENET_MODELS,
    REAL_MODELS,
    TRANSFORMER_MODELS,
    BenchCase,
    load_case,
)
from benchmarks.compare_report import (  # noqa: E402,F401 - check_targets and the targets are part of this script's API
    LATENCY_TARGET,
    PRESERVED_METRIC,
    PRESERVED_RATIO_TARGET,
    RATIO_VS_QDYN_TARGET,
    check_targets,
    write_outputs,
)
from benchmarks.dc_settings import ModelSettings, settings_for  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# --quick runs write here unless --out is given, so a smoke run never replaces the measured results.
QUICK_RESULTS_DIR = RESULTS_DIR / "quick"

FULL_LATENCY_SECONDS = 40.0
QUICK_LATENCY_SECONDS = 4.0
_BLOCK_SECONDS = 0.02  # a timed block repeats fast models until it lasts about this long
_MAX_BLOCK_RUNS = 50


# --------------------------------------------------------------------------- sessions and timing


def make_session(model_bytes: bytes, *, library: bool, threads: int = 1, optimization: str = "all"):
    """An onnxruntime CPU session with ``threads`` intra-op threads, optionally with the onnx-dc library."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[optimization]
    options.log_severity_level = 3
    if threads > 1:
        # Idle sessions must not spin: the timing rounds interleave sessions, and a spinning
        # worker of the previous one would take the CPU the timed one needs (2-core machine).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if library:
        import onnx_dc

        options.register_custom_ops_library(onnx_dc.ops_library_path())
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


@dataclass
class Timing:
    """Latency samples of one session (seconds per run, one sample per timed block)."""

    samples: list[float] = field(default_factory=list)
    runs_per_block: int = 1

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples) * 1000.0

    def quantile_ms(self, q: float) -> float:
        return float(np.quantile(self.samples, q)) * 1000.0


def measure_latency(sessions: dict[str, object], feed: dict, *, budget_seconds: float, min_rounds: int, seed: int = 0) -> dict[str, Timing]:
    """Interleaved batch-1 latency of several sessions on one feed.

    Each session is run twice untimed (warm-up) and its single-run time estimated;
    a session's timed block repeats the run until the block lasts about 20 ms (1 to
    50 runs), preceded by one untimed run when the model is fast (so each block sees
    the model's steady state, not the cache left by another session). Rounds visit
    every session once, in a new random order each round, until ``budget_seconds``
    have passed and at least ``min_rounds`` rounds are done.
    """
    timings: dict[str, Timing] = {}
    for key, session in sessions.items():
        session.run(None, feed)
        started = time.perf_counter()
        session.run(None, feed)
        single = time.perf_counter() - started
        timings[key] = Timing(runs_per_block=int(min(_MAX_BLOCK_RUNS, max(1, math.ceil(_BLOCK_SECONDS / max(single, 1e-6))))))
    order = list(sessions)
    rng = random.Random(seed)
    started = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or time.perf_counter() - started < budget_seconds:
        rng.shuffle(order)
        for key in order:
            session, timing = sessions[key], timings[key]
            if timing.runs_per_block > 1:
                session.run(None, feed)
            block_start = time.perf_counter()
            for _ in range(timing.runs_per_block):
                session.run(None, feed)
            timing.samples.append((time.perf_counter() - block_start) / timing.runs_per_block)
        rounds += 1
    return timings


def output_fidelity(reference: list[np.ndarray], candidate: list[np.ndarray]) -> tuple[float, float]:
    """Cosine similarity and max absolute difference over all outputs of all evaluation inputs.

    Sums in float64 one evaluation input at a time (outputs are stored as float32; a
    language model's are hundreds of MB).
    """
    if len(reference) != len(candidate) or any(a.shape != b.shape for a, b in zip(reference, candidate)):
        return float("nan"), float("nan")
    dot = norm_a = norm_b = largest = 0.0
    identical = True
    for a32, b32 in zip(reference, candidate):
        a, b = np.asarray(a32, dtype=np.float64), np.asarray(b32, dtype=np.float64)
        dot += float(np.dot(a, b))
        norm_a += float(np.dot(a, a))
        norm_b += float(np.dot(b, b))
        if a.size:
            largest = max(largest, float(np.max(np.abs(a - b))))
        identical = identical and np.array_equal(a, b)
    denominator = float(np.sqrt(norm_a) * np.sqrt(norm_b))
    cosine = dot / denominator if denominator > 0 else (1.0 if identical else 0.0)
    if identical:
        cosine = 1.0  # rounding can put identical outputs at 1 +- 2e-16
    return min(1.0, max(-1.0, cosine)), largest


# --------------------------------------------------------------------------- candidates


def build_candidates(
    case: BenchCase, settings: ModelSettings, workdir: Path, log, *, quick: bool = False
) -> list[methods.Candidate]:
    """Every method's candidate for one model, in table order (``quick``: without the automatic mode)."""
    import onnx_dc
    from onnx_dc.api.recipe import Recipe

    original = case.original_bytes
    model = onnx.load_from_string(original)
    log(f"  zstd -{methods.ZSTD_LEVEL} ...")
    candidates = [methods.original_candidate(original), methods.zstd_candidate(original)]
    log("  quantize_dynamic ...")
    candidates.append(methods.quantize_dynamic_candidate(model, workdir, pre_step=False))
    if methods.has_constant_weights(model):
        candidates.append(methods.quantize_dynamic_candidate(model, workdir, pre_step=True))
    for bits in (4, 8):
        log(f"  MatMulNBits {bits}-bit ...")
        candidates.append(methods.matmul_nbits_candidate(model, bits=bits))

    # The model's exclusions (e.g. a fixed positional table) are part of every onnx-dc row's recipe.
    exclude = list(settings.exclude) or None
    excluded = f"; --exclude {' '.join(repr(glob) for glob in settings.exclude)} ({settings.exclude_why})" if exclude else ""
    log("  onnx-dc defaults ...")
    candidates.append(
        methods.onnx_dc_candidate(
            "onnx-dc defaults", model, lambda m: onnx_dc.compress(m, recipe=Recipe.build(exclude=exclude)),
            notes=["data-free, built-in defaults" + excluded],
        )
    )
    log("  onnx-dc --sparsity 0 --bits 8 ...")
    candidates.append(
        methods.onnx_dc_candidate(
            "onnx-dc --sparsity 0 --bits 8", model,
            lambda m: onnx_dc.compress(m, recipe=Recipe.build(sparsity=0, bits=8, exclude=exclude)),
            notes=["data-free, no pruning, 8-bit weight sharing" + excluded],
        )
    )
    calibrated_rows = [("onnx-dc calibrated", settings.calibrated)]
    if settings.compact is not None:
        calibrated_rows.append(("onnx-dc calibrated compact", settings.compact))
    if settings.skip_calibrated:
        for method in [name for name, _ in calibrated_rows] + ["onnx-dc automatic"]:
            candidates.append(methods.Candidate(method, "onnx-dc", failure=settings.skip_calibrated))
        return candidates
    for method, dc in calibrated_rows:
        log(f"  {method} ...")
        candidates.append(
            methods.onnx_dc_candidate(
                method,
                model,
                lambda m, dc=dc: onnx_dc.compress(m, recipe=dc.recipe(), calib=case.calib_feeds),
                notes=[f"{dc.describe()}; {case.sizes.calib} calibration inputs. Why: {dc.why}"],
            )
        )
    automatic = settings.automatic
    if automatic is None or quick:
        reason = "not run in --quick mode (the search takes minutes)" if quick else settings.automatic_skipped
        candidates.append(methods.Candidate("onnx-dc automatic", "onnx-dc", failure=reason))
        return candidates
    log("  onnx-dc automatic ...")
    extra = {"eval_data": case.search_data} if automatic.max_drop is not None else {}
    searched_on = (
        f"{len(case.search_data['labels'])} held-out labelled training images"
        if extra
        else "a held-out 20 % of the calibration inputs"
    )
    candidates.append(
        methods.onnx_dc_candidate(
            "onnx-dc automatic",
            model,
            lambda m: onnx_dc.compress(m, recipe=automatic.recipe(), calib=case.calib_feeds, **extra),
            notes=[f"{automatic.describe()}; budget checked on {searched_on}. Why: {automatic.why}"],
        )
    )
    return candidates


# --------------------------------------------------------------------------- one model


def run_case(
    case: BenchCase, settings: ModelSettings, *, latency_seconds: float, min_rounds: int, quick: bool, log,
    extra_threads: tuple[int, ...] = (),
) -> dict:
    """Build every candidate of one model, measure it, and return the model's result dict.

    ``extra_threads``: further intra-op thread counts at which every row (through the
    operator library, not the decompressed models) is timed again, in a round of its own.
    """
    with tempfile.TemporaryDirectory(prefix="onnx-dc-compare-") as tmp:
        candidates = build_candidates(case, settings, Path(tmp), log, quick=quick)

    reference_session = make_session(case.original_bytes, library=False)
    reference = lambda feed: reference_session.run(None, feed)  # noqa: E731
    reference_outputs = case.reference_outputs(reference)
    original_size = len(case.original_bytes)

    rows: list[dict] = []
    latency_sessions: dict[str, object] = {}
    for candidate in candidates:
        row = {
            "method": candidate.method,
            "family": candidate.family,
            "status": "ok" if candidate.ok else candidate.failure,
            "stored_bytes": candidate.stored_bytes if candidate.ok else None,
            "ratio": original_size / candidate.stored_bytes if candidate.ok else None,
            "build_seconds": round(candidate.build_seconds, 2),
            "notes": candidate.notes,
            "details": candidate.details,
        }
        rows.append(row)
        if not candidate.ok:
            continue
        log(f"  evaluating {candidate.method} ...")
        try:
            session = (
                reference_session
                if candidate.family == "original"
                else make_session(candidate.model_bytes, library=candidate.needs_library)
            )
            evaluation = case.evaluate(reference, lambda feed, s=session: s.run(None, feed))
        except Exception as exc:  # a peer's model that onnxruntime cannot load or run: report it
            row["status"] = f"runtime failure: {type(exc).__name__}: {_first_line(exc)}"
            continue
        row["metric"] = evaluation.metric
        row["metric_details"] = evaluation.details
        row["cosine"], row["max_abs_diff"] = output_fidelity(reference_outputs, evaluation.outputs)
        # Timed on fresh sessions: one that ran the evaluation batches (1000 rows for the LeNets)
        # was measured up to 4x slower at batch 1 than a fresh one, which would favour no method fairly.
        latency_sessions[candidate.method] = make_session(candidate.model_bytes, library=candidate.needs_library)
        if candidate.decompressed_bytes is not None:
            plain_session = make_session(candidate.decompressed_bytes, library=False)
            plain = case.evaluate(reference, lambda feed, s=plain_session: s.run(None, feed))
            row["metric_decompressed"] = plain.metric
            row["library_vs_decompressed_max_abs_diff"] = float(
                max(np.max(np.abs(x - y)) if x.size else 0.0 for x, y in zip(evaluation.outputs, plain.outputs))
            )
            row["validate"] = _validate(case, candidate)
            latency_sessions[candidate.method + " [decompressed]"] = make_session(candidate.decompressed_bytes, library=False)

    log(f"  latency ({len(latency_sessions)} sessions, ~{latency_seconds:.0f} s) ...")
    timings = measure_latency(latency_sessions, case.latency_feed, budget_seconds=latency_seconds, min_rounds=min_rounds)
    base = timings["original"].median_ms
    for row in rows:
        timing = timings.get(row["method"])
        if timing is None:
            continue
        row["latency_ms"] = timing.median_ms
        row["latency_iqr_ms"] = [timing.quantile_ms(0.25), timing.quantile_ms(0.75)]
        row["latency_samples"] = len(timing.samples)
        row["latency_rel"] = timing.median_ms / base
        plain_timing = timings.get(row["method"] + " [decompressed]")
        if plain_timing is not None:
            row["latency_decompressed_ms"] = plain_timing.median_ms
            row["latency_decompressed_rel"] = plain_timing.median_ms / base
    for threads in extra_threads:
        timed = [c for c in candidates if c.method in timings]
        log(f"  latency with {threads} threads ({len(timed)} sessions) ...")
        threaded = {c.method: make_session(c.model_bytes, library=c.needs_library, threads=threads) for c in timed}
        timings = measure_latency(threaded, case.latency_feed, budget_seconds=latency_seconds, min_rounds=min_rounds)
        del threaded
        for row in rows:
            if row["method"] in timings:
                row[f"latency_{threads}_threads_ms"] = timings[row["method"]].median_ms
                row[f"latency_{threads}_threads_rel"] = timings[row["method"]].median_ms / timings["original"].median_ms

    result = {
        "model": case.name,
        "description": case.description,
        "metric_name": case.metric_name,
        "agreement_metric": case.agreement_metric,
        "original_bytes": original_size,
        "calib_samples": case.sizes.calib,
        "eval_samples": case.sizes.eval,
        "settings": settings.to_dict(),
        "detail_keys": case.detail_keys,
        "extra_threads": list(extra_threads),
        "rows": rows,
    }
    if case.name in REAL_MODELS:
        result["targets"] = check_targets(rows, transformer=case.name in TRANSFORMER_MODELS)
    if not quick:
        calibrated = next((c for c in candidates if c.method == "onnx-dc calibrated" and c.ok), None)
        if calibrated is not None:
            log("  latency breakdown ...")
            result["latency_breakdown"] = latency_breakdown(case, calibrated, budget_seconds=latency_seconds / 2)
    return result


def _validate(case: BenchCase, candidate: methods.Candidate) -> dict:
    """``onnx_dc.validate`` (through the operator library) on the first evaluation input."""
    import onnx_dc
    from onnx_dc.errors import OnnxDcError

    try:
        report = onnx_dc.api.validate(
            onnx.load_from_string(case.original_bytes),
            onnx.load_from_string(candidate.model_bytes),
            inputs=case.eval_feeds[0],
            min_cosine=None,  # no thresholds: the task metric judges fidelity; this checks that the model runs
            min_top1_agreement=None,
            use_library=True,
        )
    except OnnxDcError as exc:
        return {"passed": False, "error": str(exc)}
    data = report.to_dict()
    return {"passed": bool(report.passed), "report": data}


def latency_breakdown(case: BenchCase, candidate: methods.Candidate, *, budget_seconds: float) -> dict:
    """Where onnx-dc's extra batch-1 latency through the operator library comes from.

    Times, interleaved: the original and the compressed model at onnxruntime's full
    optimization level and at ``ORT_ENABLE_EXTENDED`` (which leaves out the NCHWc
    layout transformer and the other level-3 rewrites that only apply to Conv
    weights that are initializers), and a model made of the compressed model's
    ``DCDecompress*`` nodes alone (the per-run cost of producing the dense weights).
    """
    compressed = onnx.load_from_string(candidate.model_bytes)
    decompress_only, dense_bytes = _decompress_nodes_only(compressed)
    sessions = {
        "original (ORT_ENABLE_ALL)": make_session(case.original_bytes, library=False),
        "original (ORT_ENABLE_EXTENDED)": make_session(case.original_bytes, library=False, optimization="extended"),
        "onnx-dc (ORT_ENABLE_ALL)": make_session(candidate.model_bytes, library=True),
        "onnx-dc (ORT_ENABLE_EXTENDED)": make_session(candidate.model_bytes, library=True, optimization="extended"),
    }
    feeds = {key: case.latency_feed for key in sessions}
    if decompress_only is not None:
        sessions["DCDecompress nodes only"] = make_session(decompress_only.SerializeToString(), library=True)
        feeds["DCDecompress nodes only"] = {}
    timings = {}
    # One feed per session: measure_latency takes one feed, so time the groups separately but interleaved by rounds.
    grouped = measure_latency(
        {k: _FeedBound(s, feeds[k]) for k, s in sessions.items()}, {}, budget_seconds=budget_seconds, min_rounds=5
    )
    for key, timing in grouped.items():
        timings[key] = round(timing.median_ms, 3)
    counts = {}
    for node in compressed.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {
        "median_ms": timings,
        "dense_bytes_produced_per_run": dense_bytes,
        "decompress_nodes": sum(v for k, v in counts.items() if k.startswith("DCDecompress")),
        "dcmatmul_nodes": counts.get("DCMatMul", 0),
        "conv_nodes": counts.get("Conv", 0) + counts.get("ConvTranspose", 0),
    }


class _FeedBound:
    """A session whose ``run`` ignores the feed it is given and uses its own (for mixed-input timing)."""

    def __init__(self, session, feed: dict) -> None:
        self.session = session
        self.feed = feed

    def run(self, output_names, _feed):
        return self.session.run(output_names, self.feed)


def _decompress_nodes_only(model: onnx.ModelProto) -> tuple[onnx.ModelProto | None, int]:
    """The ``DCDecompress*`` nodes of ``model`` (with the Constants/initializers they read) as a model of their own."""
    from onnx import helper

    graph = model.graph
    decompress = [n for n in graph.node if n.domain == "ai.onnx_dc" and n.op_type.startswith("DCDecompress")]
    if not decompress:
        return None, 0
    needed = {n.input[0] for n in decompress}
    constants = [n for n in graph.node if n.op_type == "Constant" and n.output[0] in needed]
    initializers = [t for t in graph.initializer if t.name in needed]
    elem = {
        "DCDecompress": onnx.TensorProto.FLOAT,
        "DCDecompressFloat16": onnx.TensorProto.FLOAT16,
        "DCDecompressDouble": onnx.TensorProto.DOUBLE,
        "DCDecompressBFloat16": onnx.TensorProto.BFLOAT16,
    }
    outputs = [helper.make_tensor_value_info(n.output[0], elem[n.op_type], None) for n in decompress]
    new_graph = helper.make_graph(constants + decompress, "decompress_only", [], outputs, initializers)
    only = helper.make_model(new_graph, opset_imports=list(model.opset_import))
    only.ir_version = model.ir_version
    session = make_session(only.SerializeToString(), library=True)
    dense_bytes = sum(int(np.asarray(o).nbytes) for o in session.run(None, {}))
    return only, dense_bytes


def _machine(quick: bool, seconds: float) -> dict:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "quick": quick,
        "seconds": seconds,
    }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (2 for a bad argument or a model that cannot be loaded)."""
    from onnx_dc.errors import OnnxDcError

    parser = argparse.ArgumentParser(prog="python benchmarks/compare.py", description=__doc__.splitlines()[0])
    all_models = LENET_MODELS + REAL_MODELS
    parser.add_argument("--models", default=",".join(all_models), help=f"comma-separated (default: all of {', '.join(all_models)})")
    parser.add_argument("--quick", action="store_true", help="small splits and a short latency budget")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="directory for compare.md/.json and the PNGs (default benchmarks/results, benchmarks/results/quick with --quick)",
    )
    parser.add_argument("--latency-seconds", type=float, default=None, help="latency budget per model (default 40, quick 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the input generators and the calibration split")
    parser.add_argument(
        "--skip-automatic", default="", metavar="MODELS",
        help="comma-separated models whose automatic row is not run (the table says so), to bound a run's time",
    )
    parser.add_argument(
        "--skip-calibrated", default="", metavar="MODELS",
        help="comma-separated models whose calibrated and automatic rows are not run (the table says so)",
    )
    parser.add_argument(
        "--latency-threads", default="", metavar="N,...",
        help="further intra-op thread counts to time every row at (e.g. 2), besides the 1-thread column",
    )
    parser.add_argument("--render-only", action="store_true", help="rewrite compare.md and the PNGs from --out's compare.json")
    parser.add_argument(
        "--merge", nargs="+", type=Path, metavar="DIR",
        help="write --out's outputs from the compare.json of several runs (models split over several invocations; "
        "a model in several runs is taken from the last one given)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = QUICK_RESULTS_DIR if args.quick else RESULTS_DIR

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    skip_automatic = {n.strip() for n in args.skip_automatic.split(",") if n.strip()}
    skip_calibrated = {n.strip() for n in args.skip_calibrated.split(",") if n.strip()}
    unknown = [n for n in names + sorted(skip_automatic | skip_calibrated) if n not in all_models]
    if unknown or not names:
        print(f"compare.py: error: unknown model(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(all_models)}", file=sys.stderr)
        return 2
    try:
        extra_threads = tuple(int(t) for t in args.latency_threads.split(",") if t.strip())
    except ValueError:
        extra_threads = (0,)
    if any(t < 1 for t in extra_threads):
        print(f"compare.py: error: --latency-threads takes positive integers, got {args.latency_threads!r}", file=sys.stderr)
        return 2
    latency_seconds = args.latency_seconds or (QUICK_LATENCY_SECONDS if args.quick else FULL_LATENCY_SECONDS)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    results: list[dict] = []
    if args.render_only or args.merge:
        sources = [Path(d) / "compare.json" for d in (args.merge or [args.out])]
        documents = []
        for source in sources:
            try:
                documents.append(json.loads(source.read_text()))
            except (OSError, ValueError) as exc:
                print(f"compare.py: error: {source}: cannot read it ({exc})", file=sys.stderr)
                return 2
        machine = dict(documents[0]["machine"])
        machine["seconds"] = sum(d["machine"]["seconds"] for d in documents)
        machine["runs"] = len(documents)
        # A model measured in several of the runs: the run given last wins (a re-run replaces a model).
        latest = {m["model"]: m for d in documents for m in d["models"]}
        models = list(latest.values())
        print(write_outputs(models, machine, args.out))
        return 0
    for name in names:
        log(f"{name}: preparing inputs ...")
        model_started = time.perf_counter()
        try:
            case = load_case(name, quick=args.quick, seed=args.seed)
        except OnnxDcError as exc:
            print(f"compare.py: error: {name}: {exc}", file=sys.stderr)
            return 2
        settings = settings_for(name)
        if name in skip_automatic and settings.automatic is not None:
            settings = replace(settings, automatic=None, automatic_skipped="not run in this run of the benchmark (--skip-automatic)")
        if name in skip_calibrated:
            settings = replace(settings, skip_calibrated="not run in this run of the benchmark (--skip-calibrated)")
        result = run_case(
            case, settings, latency_seconds=latency_seconds, min_rounds=3 if args.quick else 7,
            quick=args.quick, log=log, extra_threads=extra_threads,
        )
        result["seconds"] = round(time.perf_counter() - model_started, 1)
        results.append(result)
        log(f"{name}: done in {result['seconds']:.0f} s")
        # Written after every model, so a long run interrupted later keeps what it measured.
        markdown = write_outputs(results, _machine(args.quick, time.perf_counter() - started), args.out)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
