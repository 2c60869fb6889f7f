"""The ``onnx-dc`` command line (also ``python -m onnx_dc``).

Subcommands::

    onnx-dc compress IN -o OUT [--sparsity S] [--quality Q] [--bits B] [--index-bits I]
                               [--init M] [--exclude GLOB] [--min-elements N] [--seed N] [--json]
    onnx-dc decompress IN -o OUT
    onnx-dc inspect MODEL [--json]
    onnx-dc validate ORIGINAL COMPRESSED [--inputs F.npz] [--json] [--max-abs-diff X] [--min-cosine Y]
                                         [--library | --no-library]
    onnx-dc sensitivity MODEL --calib C.npz [--eval E.npz] -o OUT.json [--plot OUT.png]

``compress --calib C.npz`` fits the layers to calibration data; adding a budget
(``--min-cosine Y``, or ``--eval E.npz --max-drop PP``) searches per-layer
sparsity and bits (docs/CALIBRATION.md).

Exit codes: 0 success; 1 ``validate`` ran but a threshold was violated;
2 a user mistake (missing file, not ONNX, bad setting...), reported as one
line on stderr; 130 interrupted (no partial output is left behind).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, NoReturn

from onnx_dc import __version__
from onnx_dc.errors import OnnxDcError, SettingsError, caused_by_interrupt, out_of_memory
from onnx_dc.graph.defaults import DEFAULT_MIN_ELEMENTS, describe_default
from onnx_dc.progress import current_stage

if TYPE_CHECKING:  # imported where used: ``onnx-dc --help`` loads neither numpy nor onnx
    from onnx_dc.api.recipe import CalibrationRecipe, Recipe

EXIT_OK = 0
EXIT_THRESHOLD = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_SETTING_HELP = (
    "one value for every tensor, or KEY=VALUE,... where KEY is a kind (fc, conv, other), "
    "a tensor name or a glob; the most specific match wins"
)


_PROGRESS_HELP = "no progress on stderr (default: a bar on a terminal, else one line per stage)"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as one line (exit code 2) instead of usage plus message."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``onnx-dc``."""
    parser = _Parser(prog="onnx-dc", description="Deep Compression for ONNX models.")
    parser.add_argument("--version", action="version", version=f"onnx-dc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("compress", help="compress a model's weights (prune, share, Huffman-code)")
    p.add_argument("input", metavar="IN", help="ONNX model to compress")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="compressed model to write")
    p.add_argument("--recipe", metavar="FILE",
                   help="start from a recipe: a JSON file (as --json prints under 'recipe') or a model onnx-dc "
                   "compressed (its recorded recipe); the flags below override its settings")
    p.add_argument("--sparsity", metavar="S",
                   help=f"fraction of weights pruned by magnitude, 0 <= S < 1 or none: {_SETTING_HELP} "
                   f"(default {describe_default('sparsity')})")
    p.add_argument("--quality", metavar="Q", help=f"prune |w| < Q * std(w) (the paper's rule) instead: {_SETTING_HELP}")
    p.add_argument("--bits", metavar="B",
                   help=f"bits per shared weight, 1..8: {_SETTING_HELP} (default {describe_default('bits')})")
    p.add_argument("--index-bits", metavar="I",
                   help=f"bits per relative index, 1..16: {_SETTING_HELP} (default {describe_default('index_bits')})")
    p.add_argument("--init", metavar="M", help=f"k-means initialisation (linear, density, random, kmeans++): "
                   f"{_SETTING_HELP} (default linear)")
    p.add_argument("--exclude", metavar="GLOB", action="append", help="leave matching tensors dense (repeatable)")
    p.add_argument("--min-elements", metavar="N",
                   help=f"leave tensors with fewer elements dense (default {DEFAULT_MIN_ELEMENTS})")
    p.add_argument("--seed", metavar="N", type=int, help="random seed (random/kmeans++ init, held-out splits; default 0)")
    p.add_argument("--precision", choices=("bf16x3", "float"),
                   help="arithmetic of the compressed MatMuls: bf16x3 (default) uses AMX bfloat16 passes where the CPU "
                   "has them, within 1e-5 of the largest output; float keeps float32 throughout")
    p.add_argument("--external-data", action="store_true", help="always write tensors to OUT.data beside the model")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--no-progress", action="store_true", help=_PROGRESS_HELP)
    p.add_argument("--jobs", metavar="N", type=int,
                   help="worker processes compressing tensors at once, and threads of a calibration's fits "
                   "(default: every core; the output is the same)")
    _add_calibration_arguments(p)
    p.add_argument("--eval", metavar="E.npz", help="held-out inputs and 'labels' for the budget (not used for fitting)")
    p.add_argument("--min-cosine", metavar="Y", type=float, help="budget: search settings keeping every output's cosine >= Y")
    p.add_argument("--max-drop", metavar="PP", type=float, help="budget: search settings losing at most PP points of top-1 on --eval")
    p.add_argument("--drop-margin-se", metavar="Z", type=float,
                   help="with --max-drop: the searched settings must meet the budget by Z standard errors of their "
                   "measured drop (e.g. 1), so it holds beyond the --eval data")
    p.add_argument("--metric", metavar="MODULE:FUNCTION",
                   help="task metric for the budget: FUNCTION(original_outputs, compressed_outputs) -> float score "
                   "(lists of arrays in the model's output order, higher is better); used with --min-metric")
    p.add_argument("--min-metric", metavar="X", type=float,
                   help="budget: search settings keeping --metric's score >= X on the held-out (or --eval) inputs")
    p.add_argument("--search-sparsities", metavar="LIST", help="sparsities the budget search tries (comma-separated)")
    p.add_argument("--search-bits", metavar="LIST", help="weight bits the budget search tries (comma-separated)")

    p = sub.add_parser("decompress", help="turn a compressed model back into standard ONNX")
    p.add_argument("input", metavar="IN", help="compressed ONNX model")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="standard ONNX model to write")
    p.add_argument("--external-data", action="store_true", help="always write tensors to OUT.data beside the model")

    p = sub.add_parser("inspect", help="per-layer table of a compressed model")
    p.add_argument("model", metavar="MODEL", help="ONNX model compressed by onnx-dc")
    p.add_argument("--json", action="store_true", help="machine-readable report")

    p = sub.add_parser("validate", help="compare a compressed model's outputs with the original's")
    p.add_argument("original", metavar="ORIGINAL", help="the ONNX model before compression (the reference)")
    p.add_argument("compressed", metavar="COMPRESSED", help="the compressed ONNX model to compare with it")
    p.add_argument("--inputs", metavar="FILE.npz", help="inputs keyed by input name (default: generated from the "
                   "input specs, random)")
    p.add_argument("--max-abs-diff", metavar="X", type=_threshold, default=None,
                   help="fail (exit 1) when an output differs by more than X (default: not checked)")
    p.add_argument("--min-cosine", metavar="Y", type=_threshold, default="default",
                   help="fail (exit 1) when a float output's cosine with the original's is below Y "
                   "(default 0.99; 'none': not checked)")
    p.add_argument("--min-top1-agreement", metavar="A", type=_threshold, default="default",
                   help="fail (exit 1) when a classifier-shaped output (last axis >= 2, the classes) picks the "
                   "original's class on less than this share of rows, 0..1 (default 0.95 with --inputs; on "
                   "generated inputs only reported; 'none': not checked)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--library", dest="library", action="store_true", default=None, help="require the custom operator library")
    group.add_argument("--no-library", dest="library", action="store_false", help="run the decompressed model instead")
    p.add_argument("--json", action="store_true", help="machine-readable report")

    p = sub.add_parser("sensitivity", help="per-layer output error (and top-1) vs sparsity and vs bits")
    p.add_argument("model", metavar="MODEL", help="ONNX model to measure (not compressed)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.json", help="JSON report to write")
    p.add_argument("--plot", metavar="OUT.png", help="also plot the curves (needs matplotlib)")
    p.add_argument("--eval", metavar="E.npz", help="inputs (and optional 'labels') the model-level effect is measured on")
    p.add_argument("--sparsities", metavar="LIST", help="sparsities to measure (comma-separated)")
    p.add_argument("--bits", metavar="LIST", help="weight bits to measure (comma-separated)")
    p.add_argument("--method", choices=("calibrated", "plain"), default="calibrated",
                   help="calibrated refits (default) or the paper's magnitude pruning and k-means")
    p.add_argument("--no-progress", action="store_true", help=_PROGRESS_HELP)
    _add_calibration_arguments(p, required=True)
    return parser


def _add_calibration_arguments(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    p.add_argument("--calib", metavar="C.npz", required=required,
                   help="calibration inputs keyed by model input name (axis 0 indexes samples; docs/CALIBRATION.md)")
    p.add_argument("--calib-samples", metavar="N", type=int, help="use at most N calibration samples (default 4096)")
    p.add_argument("--criterion", choices=("auto", "magnitude", "activation", "obs"), default=None,
                   help="pruning criterion with calibration (default auto: the lowest reconstruction error per layer)")
    p.add_argument("--refit-rounds", metavar="N", type=int, help="rounds of centroid refit and re-assignment (default 8, 0 = plain k-means)")
    p.add_argument("--no-weight-refit", action="store_true", help="do not refit the surviving weights before clustering")
    p.add_argument("--no-sequential", action="store_true", help="capture every layer from the original model (faster)")
    p.add_argument("--no-bias-correction", action="store_true", help="leave the biases as they are")
    p.add_argument("--no-downstream-weighting", action="store_true",
                   help="weigh every output of a layer alike in its fit (default: by its effect on the next layer)")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="memory budget of calibration capture, e.g. 2G or 512M (default 1G): bounds the statistics "
                   "captured per pass and the samples per run; a layer whose statistics exceed it is fitted "
                   "without the sequential terms, or compressed data-free (docs/USAGE.md)")


def _calibration_recipe(args: argparse.Namespace, base: CalibrationRecipe) -> CalibrationRecipe:
    """``base`` with the calibration flags that were given; they need ``--calib``."""
    changes = {
        "criterion": args.criterion,
        "refit_rounds": args.refit_rounds,
        "refit_weights": False if args.no_weight_refit else None,
        "sequential": False if args.no_sequential else None,
        "bias_correction": False if args.no_bias_correction else None,
        "downstream_weighting": False if args.no_downstream_weighting else None,
        "max_memory_bytes": None if args.max_memory is None else parse_size(args.max_memory, "--max-memory"),
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.calib is None and (changes or args.calib_samples is not None):
        raise SettingsError(
            "--criterion, --refit-rounds, --no-* calibration flags, --max-memory and --calib-samples need --calib"
        )
    options = replace(base.options, **changes) if changes else base.options
    samples = base.samples if args.calib_samples is None else args.calib_samples
    return replace(base, samples=samples, options=options)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The :class:`~onnx_dc.api.recipe.Recipe` of ``compress``'s flags (over ``--recipe`` when given)."""
    from onnx_dc.api.recipe import Recipe, SearchRecipe, load_recipe

    base = load_recipe(args.recipe) if args.recipe else Recipe()
    budget_flags = (args.min_cosine, args.max_drop, args.drop_margin_se, args.search_sparsities, args.search_bits,
                    args.metric, args.min_metric)
    if args.calib is None and (args.eval is not None or any(v is not None for v in budget_flags)):
        raise SettingsError("--eval, --min-cosine, --max-drop, --metric, --min-metric, --drop-margin-se and --search-* "
                            "need --calib")
    search = base.search
    if any(v is not None for v in budget_flags):
        previous = search or SearchRecipe(min_cosine=args.min_cosine, max_drop=args.max_drop, metric=args.metric,
                                          min_metric=args.min_metric)
        search = SearchRecipe(
            min_cosine=args.min_cosine if args.min_cosine is not None else previous.min_cosine,
            max_drop=args.max_drop if args.max_drop is not None else previous.max_drop,
            drop_margin_se=args.drop_margin_se if args.drop_margin_se is not None else previous.drop_margin_se,
            sparsities=_number_list(args.search_sparsities, "--search-sparsities", float) or previous.sparsities,
            bits=_number_list(args.search_bits, "--search-bits", int) or previous.bits,
            metric=args.metric if args.metric is not None else previous.metric,
            min_metric=args.min_metric if args.min_metric is not None else previous.min_metric,
        )
    recipe = Recipe.build(
        base,
        sparsity=args.sparsity,
        quality=args.quality,
        bits=args.bits,
        index_bits=args.index_bits,
        init=args.init,
        exclude=tuple(args.exclude) if args.exclude else None,
        min_elements=None if args.min_elements is None else _int_flag(args.min_elements, "--min-elements"),
        seed=args.seed,
        precision=args.precision,
    )
    return replace(recipe, calibration=_calibration_recipe(args, recipe.calibration), search=search)


_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
               "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_size(text: str, flag: str) -> int:
    """Bytes of a size such as ``512M``, ``2G``, ``1.5GiB`` or ``1000000`` (units are powers of 1024)."""
    value = str(text).strip().lower()
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = value[len(number):].strip()
    try:
        size = float(number) * _SIZE_UNITS[unit]
    except (KeyError, ValueError):
        raise SettingsError(f"{flag}: {text!r} is not a size (e.g. 512M, 2G)") from None
    if not size >= 1:
        raise SettingsError(f"{flag}: {text!r} must be at least 1 byte")
    return int(size)


def _threshold(text: str) -> float | str | None:
    """A validate threshold: a number, ``none`` (not checked) or ``default`` (the default rule)."""
    word = text.strip().lower()
    if word == "none":
        return None
    if word == "default":
        return "default"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid threshold {text!r} (a number or none)") from None


def _int_flag(text: str, flag: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise SettingsError(f"{flag}: {text!r} is not an integer") from None


def _number_list(text: str | None, flag: str, kind: type) -> list | None:
    if text is None:
        return None
    values = []
    for item in text.split(","):
        item = item.strip()
        try:
            values.append(kind(item))
        except ValueError:
            raise SettingsError(f"{flag}: {item!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not values:
        raise SettingsError(f"{flag}: empty list")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (also used by the console script)."""
    previous = _install_sigterm_handler()
    try:
        try:
            args = build_parser().parse_args(argv)
        except _UsageError as exc:
            _error(str(exc))
            return EXIT_USAGE
        if args.command is None:
            _error("missing command (compress, decompress, inspect, validate or sensitivity); see onnx-dc --help")
            return EXIT_USAGE
        output = getattr(args, "output", None)
        before = _file_identity(output)
        try:
            return _COMMANDS[args.command](args)
        except KeyboardInterrupt:
            if output is not None and _file_identity(output) != before:
                _error(f"interrupted after {output} was written completely")
            else:
                _error("interrupted; no output was written")
            return EXIT_INTERRUPTED
    except OnnxDcError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except MemoryError as exc:  # where no step said what it was doing: the current stage does
        _error(str(out_of_memory(f"while {current_stage() or 'running'}", exc,
                                 hint="--jobs 1 (compress) or a smaller --max-memory (calibration) needs less")))
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted; no output was written")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:
        if caused_by_interrupt(exc):  # a signal inside an import or a C call, re-raised as another error
            _error("interrupted; no output was written")
            return EXIT_INTERRUPTED
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _compress(args: argparse.Namespace) -> int:
    from onnx_dc.api.functions import compress

    result = compress(
        args.input,
        args.output,
        recipe_from_args(args),
        calib=args.calib,
        eval_data=args.eval,
        progress=not args.no_progress,
        external_data=True if args.external_data else None,
        jobs=args.jobs,
    )
    budget_met = getattr(result.calibration, "budget_met", True)
    if args.json:
        document = result.report.to_dict()
        if result.calibration is not None and hasattr(result.calibration, "to_dict"):
            document["calibration"] = result.calibration.to_dict()
        print(json.dumps(document, indent=2))
    else:
        print(result.report.format_table())
        if result.calibration is not None:
            from onnx_dc.api.calibrated import describe_calibration

            print(describe_calibration(result.calibration))
        print(f"wrote {args.output}")
    for warning in result.warnings:
        print(f"onnx-dc: warning: {warning}", file=sys.stderr)
    if not budget_met:
        print("onnx-dc: warning: the budget is not met even by the least compressed setting searched", file=sys.stderr)
        return EXIT_THRESHOLD
    return EXIT_OK


def _decompress(args: argparse.Namespace) -> int:
    from onnx_dc.api.functions import decompress

    decompress(args.input, args.output, external_data=True if args.external_data else None)
    print(f"wrote {args.output}")
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    from onnx_dc.api.functions import inspect

    report = inspect(args.model)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_table())
    return EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    from onnx_dc.api.functions import validate

    report = validate(
        args.original,
        args.compressed,
        args.inputs,
        max_abs_diff=args.max_abs_diff,
        min_cosine=args.min_cosine,
        min_top1_agreement=args.min_top1_agreement,
        use_library=args.library,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format_table())
    return EXIT_OK if report.passed else EXIT_THRESHOLD


def _sensitivity(args: argparse.Namespace) -> int:
    from onnx_dc.api.functions import sensitivity
    from onnx_dc.api.recipe import CalibrationRecipe
    from onnx_dc.calibration.sensitivity import plot_sensitivity, write_json_atomic
    from onnx_dc.graph.model_io import check_output_path

    check_output_path(args.output, [args.model])
    if args.plot is not None:
        check_output_path(args.plot, [args.model])
        try:
            import matplotlib  # noqa: F401  (fail before the work, not after)
        except ImportError:
            raise SettingsError(
                "--plot needs matplotlib, an optional dependency: pip install matplotlib (or onnx-dc[plot])"
            ) from None
    report = sensitivity(
        args.model,
        args.calib,
        eval_data=args.eval,
        calib_samples=args.calib_samples,
        sparsities=_number_list(args.sparsities, "--sparsities", float),
        bits=_number_list(args.bits, "--bits", int),
        method=args.method,
        calibration=_calibration_recipe(args, CalibrationRecipe()).options,
        progress=not args.no_progress,
    )
    print(report.format_table())
    write_json_atomic(report.to_dict(), args.output)
    print(f"wrote {args.output}")
    if args.plot is not None:
        plot_sensitivity(report, args.plot)
        print(f"wrote {args.plot}")
    return EXIT_OK


_COMMANDS = {
    "compress": _compress,
    "decompress": _decompress,
    "inspect": _inspect,
    "validate": _validate,
    "sensitivity": _sensitivity,
}


def _error(message: str) -> None:
    text = " ".join(message.split())  # one line, whatever the message contained
    print(f"onnx-dc: error: {text}", file=sys.stderr)


def _file_identity(path: str | None) -> tuple[int, int, int] | None:
    """(device, inode, mtime) of a file, None when absent: an atomic rename changes the inode."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


def _install_sigterm_handler():
    """Turn SIGTERM into KeyboardInterrupt so temporary files are removed on the way out."""

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        return None


if __name__ == "__main__":
    sys.exit(main())
