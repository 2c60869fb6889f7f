"""The automatic search at several ``--min-cosine`` budgets on zoo transformers, checked on inputs it never saw.

    python benchmarks/bench_search_budgets.py [--models whisper-tiny-encoder ...] [--budgets 0.999 0.995 0.99]
                                              [--quick] [--json rows.json]

For each model and budget: ``onnx_dc.compress`` with compare.py's automatic
settings for the model (:mod:`benchmarks.dc_settings`) at that budget, on
compare.py's calibration split (:func:`benchmarks.compare_cases.load_case`;
the search holds a fifth of it out for its budget), then the written model,
decompressed, on the evaluation split: file ratio, the budget's measure there
(one cosine over every output value of every evaluation input), whether the
budget holds on those inputs, the model's task metric and its details, and
the compression's wall and CPU seconds (this process). ``--quick`` uses
compare.py's small splits.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

DEFAULT_MODELS = ("whisper-tiny-encoder",)
DEFAULT_BUDGETS = (0.999, 0.995, 0.99)


def _runner(model: onnx.ModelProto):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)


def measure(name: str, min_cosine: float, *, quick: bool = False) -> dict:
    """One row: the automatic search of ``name`` at ``min_cosine``, measured on the evaluation split."""
    import onnx_dc
    from benchmarks.compare import output_fidelity
    from benchmarks.compare_cases import load_case
    from benchmarks.dc_settings import settings_for

    case = load_case(name, quick=quick)
    automatic = settings_for(name).automatic
    if automatic is None:
        raise SystemExit(f"error: {name} has no automatic settings in benchmarks/dc_settings.py")
    settings = replace(automatic, min_cosine=min_cosine, max_drop=None)
    model = onnx.load_from_string(case.original_bytes)
    started, cpu_started = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
    result = onnx_dc.compress(model, recipe=settings.recipe(), calib=case.calib_feeds)
    wall = time.perf_counter() - started
    cpu = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu_started
    restored = onnx_dc.decompress(result.model)
    reference = _runner(model)
    evaluation = case.evaluate(reference, _runner(restored))
    cosine, _ = output_fidelity(case.reference_outputs(reference), evaluation.outputs)
    return {
        "model": name, "min_cosine": min_cosine, "ratio": len(case.original_bytes) / len(result.model.SerializeToString()),
        "eval_cosine": cosine, "budget_held": cosine >= min_cosine, "metric_name": case.metric_name,
        "metric": evaluation.metric, "details": evaluation.details, "n_calib": len(case.calib_feeds),
        "n_eval": len(case.eval_feeds), "wall_s": wall, "cpu_s": cpu,
    }


def format_table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| model | --min-cosine | ratio | cosine on evaluation inputs | held | task metric | details | calib / eval | wall s | CPU s |",
        "|---|---:|---:|---:|---|---:|---|---|---:|---:|",
    ]
    for r in rows:
        details = ", ".join(f"{k} {v:.4g}" for k, v in r["details"].items())
        lines.append(
            f"| {r['model']} | {r['min_cosine']:g} | {r['ratio']:.2f}x | {r['eval_cosine']:.6f} | "
            f"{'yes' if r['budget_held'] else 'NO'} | {r['metric_name']} {r['metric']:.4f} | {details} | "
            f"{r['n_calib']} / {r['n_eval']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="zoo transformers")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(DEFAULT_BUDGETS), help="--min-cosine values")
    parser.add_argument("--quick", action="store_true", help="compare.py's small splits")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    from benchmarks.compare_cases import TRANSFORMER_MODELS

    unknown = [m for m in args.models if m not in TRANSFORMER_MODELS]
    if unknown:
        print(f"error: not a zoo transformer: {', '.join(unknown)} (one of {', '.join(TRANSFORMER_MODELS)})",
              file=sys.stderr)
        return 2
    bad = [b for b in args.budgets if not 0.0 < b < 1.0]
    if bad:
        print(f"error: budgets must be in (0, 1), got {bad}", file=sys.stderr)
        return 2
    rows = []
    for name in args.models:
        for budget in args.budgets:
            rows.append(measure(name, budget, quick=args.quick))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
