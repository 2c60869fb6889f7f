"""onnx-dc settings on the zoo's sentence encoder (all-MiniLM-L6-v2): data-free grid and the automatic search.

    python benchmarks/transformer_settings.py defaults [--eval-sentences 200] [--settings JSON ...]
    python benchmarks/transformer_settings.py search --min-cosine 0.999 [--calib-sentences 96] [--eval-sentences 200]
    python benchmarks/transformer_settings.py search [--calib-sentences 96]     # --calib alone, the default settings
    python benchmarks/transformer_settings.py search --settings '{"bits": "fc=4,other=4"}'   # --calib alone, other settings

``defaults`` compresses ``minilm-l6`` with each data-free setting (a JSON dict of
:class:`onnx_dc.api.recipe.Recipe` fields; default: the built-in defaults and a
small grid around them) and onnxruntime's int8 ``quantize_dynamic``; ``search``
runs ``--calib`` with a ``--min-cosine`` budget on the zoo's calibration
sentences. Each row: file ratio (original file / compressed file), the mean
embedding cosine with the original and the nearest-neighbour agreement on
held-out evaluation sentences (disjoint from the calibration ones), the
search's budget measure on them (``budget_cosine``: per output one cosine over
all values, token states included, the lowest over the outputs), and the
compression's wall and CPU seconds (this process and its finished child processes;
the data-free rows compress in this process, ``jobs=1``). The
compressed models are evaluated decompressed (standard operators, the same
weights), which is faster than the operator library.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import onnx_dc  # noqa: E402
from onnx_dc.api.recipe import Recipe, SearchRecipe  # noqa: E402
from onnx_dc.calibration.metrics import compare_outputs  # noqa: E402

DEFAULT_GRID = [
    {},
    {"sparsity": "fc=0", "bits": "fc=8"},
    {"sparsity": "fc=0", "bits": "fc=7"},
    {"sparsity": "fc=0", "bits": "fc=6"},
    {"sparsity": "fc=0", "bits": "fc=5"},
    {"sparsity": "fc=0.1", "bits": "fc=6"},
    {"sparsity": "fc=0", "bits": "fc=5,other=6"},
    {"sparsity": "fc=0", "bits": "fc=4,other=6"},
]


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _budget_cosine(reference: ort.InferenceSession, candidate: ort.InferenceSession, inputs) -> float:
    """The search's budget measure on ``inputs``: per output one cosine over every value, the lowest of them."""
    names = [o.name for o in reference.get_outputs()]
    outputs = [(reference.run(None, feed), candidate.run(None, feed)) for feed in inputs]
    stacked_reference = {n: np.concatenate([r[i] for r, _ in outputs]) for i, n in enumerate(names)}
    stacked_candidate = {n: np.concatenate([c[i] for _, c in outputs]) for i, n in enumerate(names)}
    return compare_outputs(stacked_reference, stacked_candidate).cosine


def _row(label: str, path: str, written: str, plain: onnx.ModelProto, zoo_model, reference, inputs, wall, cpu) -> dict:
    candidate = _session(plain)
    metric = zoo_model.task_metric(reference, candidate, inputs)
    row = {
        "setting": label,
        "file_ratio": round(os.path.getsize(path) / os.path.getsize(written), 3),
        "embedding_cosine": round(metric["embedding_cosine"], 5),
        "neighbour_agreement": round(metric["neighbour_agreement"], 4),
        "budget_cosine": round(_budget_cosine(reference, candidate, inputs), 6),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def run_defaults(args: argparse.Namespace) -> list[dict]:
    """The data-free grid and int8 ``quantize_dynamic`` on the same evaluation sentences."""
    from model_zoo import real

    zoo_model = real.get("minilm-l6")
    path = str(zoo_model.path())
    inputs = zoo_model.make_inputs("eval", args.eval_sentences)
    reference = _session(path)
    grid = [json.loads(text) for text in args.settings] if args.settings else DEFAULT_GRID
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        written = str(Path(tmp) / "out.onnx")
        if not args.no_int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            wall, cpu = time.perf_counter(), _cpu_seconds()
            quantize_dynamic(path, written, weight_type=QuantType.QInt8)
            rows.append(_row("int8 quantize_dynamic", path, written, onnx.load(written), zoo_model, reference, inputs,
                             time.perf_counter() - wall, _cpu_seconds() - cpu))
        for fields in grid:
            wall, cpu = time.perf_counter(), _cpu_seconds()
            result = onnx_dc.compress(path, written, Recipe(**fields), jobs=1)  # in this process: its CPU counted
            wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
            label = "defaults" if not fields else " ".join(f"--{k.replace('_', '-')} {v}" for k, v in fields.items())
            rows.append(_row(label, path, written, onnx_dc.decompress(result.model), zoo_model, reference, inputs, wall, cpu))
    return rows


def run_search(args: argparse.Namespace) -> list[dict]:
    """``--calib`` with a ``--min-cosine`` budget (held-out part of the calibration sentences), or alone without
    one, then held-out evaluation."""
    from model_zoo import real
    from model_zoo.real.base import stack_feeds

    zoo_model = real.get("minilm-l6")
    path = str(zoo_model.path())
    calib = stack_feeds(zoo_model.make_inputs("calib", args.calib_sentences))
    inputs = zoo_model.make_inputs("eval", args.eval_sentences)
    reference = _session(path)
    fields = json.loads(args.settings) if args.settings else {}
    search = SearchRecipe(min_cosine=args.min_cosine) if args.min_cosine is not None else None
    recipe = Recipe(**fields, search=search)
    with tempfile.TemporaryDirectory() as tmp:
        written = str(Path(tmp) / "out.onnx")
        wall, cpu = time.perf_counter(), _cpu_seconds()
        result = onnx_dc.compress(path, written, recipe, calib=calib, progress=True)
        wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
        if args.min_cosine is not None:
            print(result.calibration.format_summary(), file=sys.stderr)
        label = f"--calib ({args.calib_sentences} sentences)" + (
            f" --min-cosine {args.min_cosine:g}" if args.min_cosine is not None else ""
        ) + "".join(f" --{k.replace('_', '-')} {v}" for k, v in fields.items())
        return [_row(label, path, written, onnx_dc.decompress(result.model), zoo_model, reference, inputs, wall, cpu)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = sub.add_parser("defaults", help="data-free settings and int8 quantize_dynamic")
    defaults.add_argument("--settings", nargs="*", metavar="JSON", help="Recipe fields per setting, e.g. '{\"bits\": \"fc=6\"}'")
    defaults.add_argument("--no-int8", action="store_true", help="leave out the int8 quantize_dynamic row")
    search = sub.add_parser("search", help="--calib with a --min-cosine budget, or alone")
    search.add_argument("--min-cosine", type=float, help="the budget (default: none, --calib alone)")
    search.add_argument("--settings", metavar="JSON", help="Recipe fields, e.g. '{\"bits\": \"fc=4,other=4\"}'")
    search.add_argument("--calib-sentences", type=int, default=96)
    for p in (defaults, search):
        p.add_argument("--eval-sentences", type=int, default=200)
    args = parser.parse_args(argv)
    run_defaults(args) if args.command == "defaults" else run_search(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
